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

Block-quantized weights (one scale per block of the reduction dim) are exported the same way,
packed INT4 feeding ``DequantizeLinear`` with ``axis`` and ``block_size`` (opset 21, which ONNX
Runtime >= 1.18 runs on the CPU and fuses with MatMul into ``MatMulNBits``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.onnx import symbolic_helper

from recipes.export.graph import ExportError, attr, consumer_index, graph_index, prune_unused

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
    consumers = consumer_index(graph)
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
        prune_unused(graph)
    return packed


# ----------------------------------------------------------------------------- block-quantized weights

BLOCK_DOMAIN = "sq_plugin"
BLOCK_OP = "BlockDequantize"  # placeholder in the traced graph, replaced by lower_block_weights


def weight_block_spec(model: torch.nn.Module, name: str, q) -> tuple[int, int]:
    """(axis, size) of a block quantizer that the export can write: a 4-bit weight's static blocks
    along one axis that divide it; ExportError naming the quantizer and the reason otherwise."""
    from sq_plugin.quantizers import is_weight_quantizer

    blocks = {k: v for k, v in q.block_sizes.items() if k != "type"}
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    weight = getattr(owner, "weight", None)
    why = None
    if not is_weight_quantizer(name) or not isinstance(weight, torch.Tensor):
        why = "only weights can be block-quantized in the export (activations: per-tensor)"
    elif q.block_sizes.get("type", "static") != "static" or len(blocks) != 1 or \
            not all(isinstance(k, int) and isinstance(v, int) for k, v in blocks.items()):
        why = "only static blocks along one axis are exported"
    elif q.num_bits != 4:
        why = "block-quantized weights are exported as packed INT4 only (num_bits 4)"
    elif weight.shape[next(iter(blocks)) % weight.dim()] % next(iter(blocks.values())):
        why = f"blocks must divide the weight's axis (shape {tuple(weight.shape)}), no padded blocks"
    if why:
        raise ExportError(f"{name}: block quantization {q.block_sizes} is not supported: {why}")
    (axis, size), = blocks.items()
    return axis % weight.dim(), size


def block_codes(blocks: np.ndarray, amax: np.ndarray, num_bits: int, narrow_range: bool) -> np.ndarray:
    """ModelOpt's integer codes of a signed fake quant: round(x · (max_bound / amax)) half to even,
    clamped, in float32 as ``fastquant.fake_quant_int`` (amax at or below 2**-24 gives code 0).
    numpy, so that nothing of it is traced into the graph."""
    max_bound = np.float32(2.0 ** (num_bits - 1) - 1.0)
    min_bound = -max_bound if narrow_range else -max_bound - np.float32(1.0)
    amax = np.asarray(amax, dtype=np.float32)
    with np.errstate(divide="ignore"):
        scale = np.where(amax > np.float32(1.0 / (1 << 24)), max_bound / amax, np.float32(0.0)).astype(np.float32)
    return np.clip(np.rint(np.asarray(blocks, dtype=np.float32) * scale), min_bound, max_bound).astype(np.int8)


class _BlockQDQ(torch.autograd.Function):
    """Fake quant of a block-quantized weight in torch; in ONNX a placeholder holding its codes and
    scales (opset 17, which the trace uses, has no blocked DequantizeLinear)."""

    @staticmethod
    def forward(ctx, blocks, amax, codes, scale, num_bits, narrow_range, axis, block):
        from recipes.search.fastquant import fake_quant_int

        return fake_quant_int(blocks, amax, num_bits, False, narrow_range)

    @staticmethod
    @symbolic_helper.parse_args("v", "v", "t", "t", "i", "b", "i", "i")
    def symbolic(g, blocks, amax, codes, scale, num_bits, narrow_range, axis, block):
        out = g.op(f"{BLOCK_DOMAIN}::{BLOCK_OP}", g.op("Constant", value_t=codes), g.op("Constant", value_t=scale),
                   axis_i=axis, block_size_i=block)
        out.setType(blocks.type())
        return out


def block_qdq(blocks: torch.Tensor, quantizer) -> torch.Tensor:
    """Export backend of a static block weight quantizer: ``blocks`` is the weight in ModelOpt's block
    layout (ModelOpt reshapes it before the backend and back after). Codes and scales are computed
    here from the weight's values (constants of the graph) and carried by the placeholder."""
    from sq_plugin.modelopt_private import amax_for

    amax = amax_for(quantizer, blocks)
    (axis, block), = [(k, v) for k, v in quantizer.block_sizes.items() if isinstance(k, int)]
    values, amax_np = blocks.detach().cpu().numpy(), amax.detach().float().cpu().numpy()  # constants, not traced
    codes = block_codes(values, amax_np, quantizer.num_bits, quantizer.narrow_range)
    scale = amax_np / np.float32(2.0 ** (quantizer.num_bits - 1) - 1.0)
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)  # as ModelOpt's own ONNX export does
    return _BlockQDQ.apply(blocks, amax, torch.from_numpy(codes), torch.from_numpy(scale), quantizer.num_bits,
                           quantizer.narrow_range, axis, block)


def lower_block_weights(proto: onnx.ModelProto) -> int:
    """Placeholder -> Reshape(weight shape) [-> Transpose -> MatMul] becomes packed ``INT4`` weight ->
    ``DequantizeLinear(axis, block_size)`` (opset 21), in the weight's own layout; a Linear's
    weight is stored transposed ([in, out], blocks on axis 0), the layout MatMul and ONNX Runtime's
    MatMulNBits fusion take. Returns how many; raises ExportError when the graph cannot be raised
    to opset 21 or a placeholder is not followed by ModelOpt's reshape back to the weight shape.
    """

    graph = proto.graph
    placeholders = [n for n in graph.node if n.domain == BLOCK_DOMAIN and n.op_type == BLOCK_OP]
    if not placeholders:
        return 0
    changed = sorted({n.op_type for n in graph.node if n.domain in ("", "ai.onnx")} & CHANGED_AFTER_17)
    if _default_opset(proto).version < INT4_OPSET and changed:
        raise ExportError(f"block-quantized weights need DequantizeLinear's block_size (opset {INT4_OPSET}), "
                          f"but the graph uses {changed}, whose meaning changed after its opset")
    consts, _, consumers = graph_index(graph)
    dead, new_nodes, new_inits = set(), {}, []
    for node in placeholders:
        codes, scale = consts[node.input[0]], consts[node.input[1]]
        axis, block = attr(node, "axis"), attr(node, "block_size")
        users = consumers.get(node.output[0], [])
        reshape = users[0] if len(users) == 1 else None
        if reshape is None or reshape.op_type != "Reshape" or reshape.input[1] not in consts:
            raise ExportError(f"{node.name}: block-quantized weight not followed by its reshape to the weight shape")
        shape = tuple(int(n) for n in consts[reshape.input[1]])
        axis %= len(shape)
        codes = codes.reshape(shape)
        scale = scale.reshape(shape[:axis] + (shape[axis] // block,) + shape[axis + 1:])
        out, drop = reshape.output[0], [node, reshape]
        after = consumers.get(out, [])
        if len(shape) == 2 and len(after) == 1 and after[0].op_type == "Transpose" and \
                list(attr(after[0], "perm", [1, 0])) == [1, 0]:  # nn.Linear: store W^T, MatMul's layout
            codes, scale, axis = codes.T, scale.T, 1 - axis
            out, drop = after[0].output[0], drop + [after[0]]
        base = f"{node.name or node.output[0]}_int4"
        new_inits += [int4_tensor(np.ascontiguousarray(codes), base),
                      numpy_helper.from_array(np.ascontiguousarray(scale, dtype=np.float32), f"{base}_scale")]
        new_nodes[id(node)] = helper.make_node("DequantizeLinear", [base, f"{base}_scale"], [out],
                                               name=f"{base}_dq", axis=axis, block_size=block)
        dead.update(id(n) for n in drop)
    kept = []
    for n in graph.node:
        if id(n) in new_nodes:
            kept.append(new_nodes[id(n)])
        elif id(n) not in dead:
            kept.append(n)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    prune_unused(graph)
    for o in list(proto.opset_import):
        if o.domain == BLOCK_DOMAIN:
            proto.opset_import.remove(o)
    _default_opset(proto).version = max(_default_opset(proto).version, INT4_OPSET)
    return len(placeholders)
