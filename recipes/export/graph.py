"""ONNX graph helpers shared by the exporter, packed-INT4 lowering and the ONNX Runtime runner."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class ExportError(ValueError):
    """The model cannot be exported as asked (the message names the quantizer or the reason)."""

def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant tensor of the graph by name: initialisers and Constant-node outputs."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    for node in graph.node:  # the exporter shares equal initialisers through Identity nodes
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values

def consumer_index(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor, by tensor name."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for inp in n.input:
            consumers.setdefault(inp, []).append(n)
    return consumers


def graph_index(graph: onnx.GraphProto) -> tuple[dict, dict, dict]:
    """(constant values, producer node by output name, consumer nodes by input name)."""
    producers = {out: n for n in graph.node for out in n.output}
    return constant_values(graph), producers, consumer_index(graph)

def replace_nodes(graph: onnx.GraphProto, dead: set[int], new_inits: list) -> None:
    """Drop the nodes whose id() is in ``dead`` and add the new initialisers."""
    kept = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)

def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default

def prune_unused(graph: onnx.GraphProto, any_node: bool = False) -> None:
    """Drop initialisers and Constant nodes nothing reads any more (the fp32 weights), repeatedly;
    ``any_node``: every node whose outputs nobody reads (replaced subgraphs)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if (any_node or n.op_type == "Constant")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
