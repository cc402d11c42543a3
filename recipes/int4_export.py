"""Packed INT4 weights in the Q/DQ ONNX: a 4-bit layer's file size is its bits.

The exporter first stores every quantized weight as an int8 initialiser feeding
DequantizeLinear. For weights on a grid of at most 16 levels in [-8, 7] (ModelOpt's signed 4-bit
fake quant: scale amax/7, integers -8..7) the initialiser is rewritten as an ONNX ``INT4``
tensor, two values per byte (first value in the low nibble, as the ONNX spec packs them), with an
``INT4`` zero point; DequantizeLinear takes INT4 from opset 21, so the model's default opset is
raised to 21. ONNX Runtime >= 1.18 runs INT4 DequantizeLinear on the CPU (tested), so no
``MatMulNBits`` rewrite is needed. The integers are the same as in the int8 container, so the
dequantized values are too.

Raising the opset is only valid if no op of the graph changed meaning between its export opset
and 21 (e.g. ReduceMean's axes moved to an input at 18); such graphs keep the int8 container.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

INT4_MIN, INT4_MAX = -8, 7
INT4_OPSET = 21
# default-domain ops whose opset-17 form is invalid or means something else at opset 21
CHANGED_AFTER_17 = frozenset({
    "ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare", "Split", "Pad", "Resize", "ScatterElements", "ScatterND",
    "GroupNormalization", "Col2Im", "CenterCropPad", "BitwiseAnd", "AffineGrid", "DFT",
})


def pack_int4(values: np.ndarray) -> bytes:
    """Integers in [-8, 7] -> ONNX INT4 raw bytes (element 2i in the low nibble of byte i)."""
    v = np.asarray(values).reshape(-1).astype(np.int16)
    if v.size and (v.min() < INT4_MIN or v.max() > INT4_MAX):
        raise ValueError(f"values outside int4 [{INT4_MIN}, {INT4_MAX}]: {v.min()}..{v.max()}")
    nibbles = (v & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, count: int) -> np.ndarray:
    """ONNX INT4 raw bytes -> int8 array of ``count`` values (sign-extended)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    nibbles = np.empty(b.size * 2, dtype=np.uint8)
    nibbles[0::2], nibbles[1::2] = b & 0xF, b >> 4
    v = nibbles[:count].astype(np.int8)
    return np.where(v > 7, v - 16, v).astype(np.int8)


def int4_tensor(values: np.ndarray, name: str) -> TensorProto:
    values = np.asarray(values)
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape), pack_int4(values), raw=True)


def int4_values(tensor: TensorProto) -> np.ndarray:
    """The integers of an INT4 initialiser, shaped (for tests and readers)."""
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return unpack_int4(tensor.raw_data, count).reshape(tuple(tensor.dims))


def _default_opset(proto: onnx.ModelProto):
    return next(o for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def pack_int4_weights(proto: onnx.ModelProto, levels: dict[str, tuple[int, int]]) -> int:
    """Rewrite int8 weight initialisers whose grid fits int4 as packed INT4; returns how many.

    ``levels`` maps initialiser names to the (qmin, qmax) of their quantizer's grid (the
    exporter reads it from the narrow-range clip). Every consumer must be a DequantizeLinear;
    each gets an INT4 zero point of its scale's shape.
    """
    graph = proto.graph
    candidates = {n for n, (lo, hi) in levels.items() if lo >= INT4_MIN and hi <= INT4_MAX}
    if not candidates:
        return 0
    changed = sorted({n.op_type for n in graph.node if n.domain in ("", "ai.onnx")} & CHANGED_AFTER_17)
    if _default_opset(proto).version < INT4_OPSET and changed:
        log.warning("int4 weights kept in the int8 container: the graph uses %s, whose meaning changed "
                    "before opset %d", changed, INT4_OPSET)
        return 0
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(a.t.dims)
    packed, new_inits = 0, []
    for init in graph.initializer:
        if init.name not in candidates:
            continue
        users = consumers.get(init.name, [])
        if not users or any(u.op_type != "DequantizeLinear" or u.input[0] != init.name for u in users):
            continue
        values = numpy_helper.to_array(init)
        init.CopyFrom(int4_tensor(values, init.name))
        for k, dq in enumerate(users):
            zp = f"{init.name}_zero_point_int4_{k}"
            new_inits.append(int4_tensor(np.zeros(shapes.get(dq.input[1], ()), dtype=np.int8), zp))
            if len(dq.input) > 2:
                dq.input[2] = zp
            else:
                dq.input.append(zp)
        packed += 1
    graph.initializer.extend(new_inits)
    if packed:
        _default_opset(proto).version = max(_default_opset(proto).version, INT4_OPSET)
        _prune_constants(graph)
    return packed


def _prune_constants(graph: onnx.GraphProto) -> None:
    """Drop Constant nodes (the old int8 zero points) that nothing reads any more."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for n in dead:
        graph.node.remove(n)
