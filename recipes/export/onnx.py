"""Deployment export: ModelOpt fake-quant CTC model -> Q/DQ ONNX with int8 weights -> TensorRT.

The ONNX file is what ONNX Runtime and TensorRT consume: symmetric int8 QuantizeLinear /
DequantizeLinear (zero point 0), per-channel weight scales on the output-channel axis, per-tensor
activation scales, and weights stored as int8 initialisers feeding DequantizeLinear so the file
is ~4x smaller than fp32 (nn.Linear weights are stored transposed, [in, out] with the scale on
axis 1, the layout MatMul consumes, so no runtime has to transpose int8 weights at load time).
Quantizers narrower than 8 bits (W6/W4) are stored in the int8
container: scale amax/31 or amax/7 and values clipped to the narrow range, which reproduces the
fake-quant numerics exactly; the file's metadata says so. FP8 E4M3 quantizers (per tensor, ModelOpt's
``num_bits=(4, 3)``) become float8 Q/DQ (opset 19, scale amax/448, saturating) with FLOAT8E4M3FN
weight initialisers: ONNX Runtime's CPU EP dequantizes them to fp32, TensorRT on Ada/Hopper
runs them in FP8.

We emit the Q/DQ nodes with our own ONNX symbolic (through ModelOpt's quant-backend hook) rather
than ModelOpt's ``export_int8``, because that one only accepts 8 bits, cannot express the narrow
integer range, and adds a float->float Cast after every activation quantizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.onnx import symbolic_helper

from recipes.export.graph import (  # noqa: F401 (re-exported)
    ExportError,
    attr,
    constant_values,
    consumer_index,
    graph_index,
    prune_unused,
    replace_nodes,
)
from recipes.export.int4 import block_qdq, lower_block_weights, pack_int4_weights, weight_block_spec
from recipes.runtime.atomic import atomic_output

log = logging.getLogger(__name__)

EXPORT_BACKEND = "sq_onnx_qdq"
INT8_MIN, INT8_MAX = -128, 127
E4M3_MAX = 448.0  # FP8 E4M3's largest finite value
MIN_OPSET = 17
FP8_OPSET = 19  # float8 QuantizeLinear/DequantizeLinear
META_PREFIX = "sq."


# ----------------------------------------------------------------------------- quantizer specs


@dataclass(frozen=True)
class QuantSpec:
    """What one enabled TensorQuantizer means in integer terms."""

    name: str
    num_bits: int
    qmin: int  # lowest integer level the fake-quant produces
    qmax: int
    axis: int | None  # per-channel axis, None = per-tensor
    amax: torch.Tensor  # as stored by ModelOpt (keepdims shape for per-channel)
    shift: float = 0.0  # one-sided range: x - shift is quantized, shift added back after DQ
    fp8: bool = False  # E4M3 (qmin/qmax are then -448/448)
    block: tuple[int, int] | None = None  # a block-quantized weight: (axis, block size), packed INT4

    @property
    def scale(self) -> torch.Tensor:
        """amax / qmax, with 1.0 where amax is 0 (as ModelOpt's own ONNX export does)."""
        scale = self.amax.detach().float() / self.qmax
        return scale.masked_fill(scale == 0, 1.0)

    @property
    def needs_clip(self) -> bool:
        """Narrower than int8's saturation range, so an explicit clip must come first."""
        return not self.fp8 and (self.qmin, self.qmax) != (INT8_MIN, INT8_MAX)


def int_range(num_bits: int, narrow_range: bool) -> tuple[int, int]:
    """Integer levels ModelOpt's signed fake-quant uses: [-2^(b-1), 2^(b-1)-1], or symmetric."""
    qmax = (1 << (num_bits - 1)) - 1
    return (-qmax if narrow_range else -qmax - 1), qmax


def _single_axis(quantizer, name: str) -> int | None:
    axis = quantizer.axis
    if isinstance(axis, (tuple, list)):
        if len(axis) != 1:
            raise ExportError(f"{name}: quantization over axes {tuple(axis)} cannot be expressed "
                              "in ONNX (one per-channel axis at most)")
        axis = axis[0]
    return axis


def quant_specs(model: nn.Module) -> dict[str, QuantSpec]:
    """Validate every enabled quantizer for int8-container Q/DQ export and describe it.

    Raises ExportError naming the first quantizer that is not symmetric signed 4..8-bit integer
    with a calibrated (static) amax.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    from sq_plugin.modelopt_private import quantizes, static_amax
    from sq_plugin.quantizers import E4M3, is_float_format

    specs = {}
    for name, q in model.named_modules():
        if not isinstance(q, TensorQuantizer) or not q.is_enabled or not quantizes(q):
            continue
        bits = q.num_bits
        fp8 = is_float_format(q) and tuple(bits) == E4M3
        if not fp8 and (not isinstance(bits, int) or not 4 <= bits <= 8):
            raise ExportError(f"{name}: num_bits={bits!r} is not supported; Q/DQ export needs "
                              "integer quantization with 4..8 bits or FP8 E4M3 (4, 3)")
        if q.unsigned:
            raise ExportError(f"{name}: unsigned quantization is not supported (symmetric int8 "
                              "with zero point 0 only)")
        shift = 0.0
        if q.bias is not None and fp8:
            raise ExportError(f"{name}: FP8 with a bias/shift is not supported")
        if q.bias is not None:
            value = getattr(q, "bias_value", None) if q.bias.get("type", "static") == "static" else None
            if value is None or value.numel() != 1:
                raise ExportError(f"{name}: asymmetric quantization (bias {q.bias}) is not supported; "
                                  "zero point must be 0 (only a static per-tensor shift is)")
            shift = float(value)
        block = weight_block_spec(model, name, q) if q.block_sizes else None
        if getattr(q, "backend", None) not in (None, EXPORT_BACKEND):
            raise ExportError(f"{name}: custom quant backend {q.backend!r} has no ONNX form")
        if q.rotate_is_enabled:
            raise ExportError(f"{name}: rotated (Hadamard) quantization is not supported")
        amax = static_amax(q)
        if amax is None:
            raise ExportError(f"{name}: no amax (not calibrated or dynamic); calibrate and load "
                              "amax before export")
        if not torch.isfinite(amax).all() or (amax < 0).any():
            raise ExportError(f"{name}: amax has negative or non-finite values")
        if fp8 and amax.numel() > 1:
            raise ExportError(f"{name}: FP8 E4M3 export needs a per-tensor amax (ModelOpt traces E4M3 "
                              f"per tensor only); this one has shape {tuple(amax.shape)}")
        axis = _single_axis(q, name) if amax.numel() > 1 and block is None else None
        levels = (-E4M3_MAX, E4M3_MAX) if fp8 else int_range(bits, q.narrow_range)
        specs[name] = QuantSpec(name, 8 if fp8 else bits, *levels, axis, amax.detach().clone(),
                                shift, fp8, block)
    return specs


# ----------------------------------------------------------------------------- ONNX symbolic


class _QDQ(torch.autograd.Function):
    """Fake-quant in torch (ModelOpt's own kernel), Clip? -> QuantizeLinear -> DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx, inputs, amax, num_bits, narrow_range, axis, qmin, qmax, shift, fp8):
        from modelopt.torch.quantization.tensor_quant import fake_tensor_quant, scaled_e4m3

        from sq_plugin.quantizers import E4M3

        if fp8:
            return scaled_e4m3(inputs, amax, None, *E4M3)
        bias = torch.tensor(shift, dtype=inputs.dtype, device=inputs.device) if shift else None
        return fake_tensor_quant(inputs, amax, bias, num_bits, False, narrow_range)

    @staticmethod
    @symbolic_helper.parse_args("v", "t", "i", "b", "i", "f", "f", "f", "b")
    def symbolic(g, inputs, amax, num_bits, narrow_range, axis, qmin, qmax, shift, fp8):
        spec = QuantSpec("", num_bits, qmin, qmax, axis, amax, fp8=fp8)
        if shift:  # a one-sided range: Sub -> Q -> DQ -> Add (the Add folds into the next layer)
            shift_c = g.op("Constant", value_t=torch.tensor(shift, dtype=torch.float32))
            inputs = g.op("Sub", inputs, shift_c)
        scale_kd = spec.scale  # keepdims shape: broadcasts against the input for the clip
        if spec.needs_clip:
            hi = g.op("Constant", value_t=scale_kd * qmax)
            lo = g.op("Constant", value_t=scale_kd * qmin)
            inputs = g.op("Max", g.op("Min", inputs, hi), lo)
        scale = scale_kd.reshape(-1) if axis is not None else scale_kd.reshape(())
        scale_c = g.op("Constant", value_t=scale)
        zero_dtype = torch.float8_e4m3fn if fp8 else torch.int8
        zero_c = g.op("Constant", value_t=torch.zeros(scale.shape, dtype=zero_dtype))
        axis_kw = {} if axis is None else {"axis_i": axis}
        quantized = g.op("QuantizeLinear", inputs, scale_c, zero_c, **axis_kw)
        out = g.op("DequantizeLinear", quantized, scale_c, zero_c, **axis_kw)
        return g.op("Add", out, shift_c) if shift else out


def _export_entrypoint(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    from sq_plugin.modelopt_private import amax_for, bias_for
    from sq_plugin.quantizers import is_float_format

    if quantizer.block_sizes:  # a weight in ModelOpt's block layout (checked by quant_specs)
        return block_qdq(inputs, quantizer)

    amax = amax_for(quantizer, inputs)
    bits, narrow = quantizer.num_bits, quantizer.narrow_range
    axis = _single_axis(quantizer, "quantizer") if amax.numel() > 1 else None
    if is_float_format(quantizer):  # E4M3 (quant_specs refused every other float format)
        return _QDQ.apply(inputs, amax, 8, False, axis, -E4M3_MAX, E4M3_MAX, 0.0, True)
    bias = bias_for(quantizer, inputs)
    return _QDQ.apply(inputs, amax, bits, narrow, axis, *int_range(bits, narrow),
                      0.0 if bias is None else float(bias), False)


@contextlib.contextmanager
def _qdq_backend(model: nn.Module, specs: dict[str, QuantSpec]) -> Iterator[None]:
    """Route the enabled quantizers through our symbolic for the duration of the export."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )

    if not is_registered_quant_backend(EXPORT_BACKEND):
        register_quant_backend(EXPORT_BACKEND, _export_entrypoint)
    modules = dict(model.named_modules())
    saved = {name: getattr(modules[name], "backend", None) for name in specs}
    try:
        for name in specs:
            modules[name].backend = EXPORT_BACKEND
        yield
    finally:
        for name, backend in saved.items():
            modules[name].backend = backend


# ----------------------------------------------------------------------------- graph rewrite


def _broadcast_scale(scale: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """A float32 scale shaped to broadcast against an ``ndim`` tensor (1-D scales lie on ``axis``)."""
    scale = np.asarray(scale, dtype=np.float32)
    if axis is not None and scale.ndim == 1:
        shape = [1] * ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
    return scale


def quantize_like_ort(x: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """int8 QuantizeLinear exactly as ONNX Runtime computes it: x / scale, round half to even,
    saturate to [-128, 127], all in float32."""
    q = np.rint(x.astype(np.float32) / _broadcast_scale(scale, axis, x.ndim))
    return np.clip(q, INT8_MIN, INT8_MAX).astype(np.int8)


def quantize_e4m3_like_ort(x: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """float8 E4M3 QuantizeLinear as ONNX Runtime computes it (saturate=1): x / scale in float32,
    clamp to ±448, round to nearest even. Returns the float8 bytes as uint8."""
    scaled = x.astype(np.float32) / _broadcast_scale(scale, axis, x.ndim)
    q = torch.from_numpy(np.clip(scaled, -E4M3_MAX, E4M3_MAX))
    return q.to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def e4m3_initializer(raw: np.ndarray, name: str) -> onnx.TensorProto:
    """A FLOAT8E4M3FN initialiser from float8 bytes (uint8 view)."""
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT8E4M3FN, dims=raw.shape)
    tensor.raw_data = np.ascontiguousarray(raw, dtype=np.uint8).tobytes()
    return tensor


def _fold_constant_clip(name: str, producers, consts) -> tuple[np.ndarray, list] | None:
    """Value of `name` if it is a constant, possibly through our Min/Max clip; plus those nodes."""
    if name in consts:
        return consts[name], []
    node = producers.get(name)
    if node is None or node.op_type not in ("Min", "Max") or len(node.input) != 2:
        return None
    a = _fold_constant_clip(node.input[0], producers, consts)
    if a is None or node.input[1] not in consts:
        return None
    op = np.minimum if node.op_type == "Min" else np.maximum
    return op(a[0], consts[node.input[1]]).astype(np.float32), a[1] + [node]


def fold_weight_quantizers(model_proto: onnx.ModelProto, levels: dict[str, tuple[int, int]] | None = None) -> int:
    """Replace each constant-weight -> [clip] -> QuantizeLinear by an int8 initialiser.

    The DequantizeLinear stays, so the graph keeps the Q/DQ meaning while the file stores int8.
    ``levels`` (optional) receives each new initialiser's integer range (qmin, qmax), read from
    the narrow-grid clip (int8's own range without one), so 4-bit weights can be packed later.
    Returns how many weights were folded.
    """
    graph = model_proto.graph
    consts, producers, consumers = graph_index(graph)

    dead, new_inits, folded = set(), [], 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        found = _fold_constant_clip(node.input[0], producers, consts)
        if found is None:
            continue  # activation: computed at run time
        weight, clip_nodes = found
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            raise ExportError(f"{node.name}: weight QuantizeLinear not followed by DequantizeLinear")
        scale = consts[node.input[1]]
        axis = attr(node, "axis", 1) if scale.ndim == 1 else None
        base = node.input[0] if node.input[0] in consts else clip_nodes[0].input[0]
        zero = consts.get(node.input[2]) if len(node.input) > 2 else None
        fp8 = zero is not None and zero.dtype.name == "float8_e4m3fn"
        int8_name = f"{base}_fp8" if fp8 else f"{base}_int8"
        if fp8:
            new_inits.append(e4m3_initializer(quantize_e4m3_like_ort(weight, scale, axis), int8_name))
        else:
            new_inits.append(numpy_helper.from_array(quantize_like_ort(weight, scale, axis), int8_name))
            if levels is not None:
                levels[int8_name] = _clip_levels(clip_nodes, consts, scale, axis, weight.ndim)
        for user in users:
            user.input[0] = int8_name
        dead.update(id(n) for n in [node, *clip_nodes])
        folded += 1

    replace_nodes(graph, dead, new_inits)
    prune_unused(graph)
    return folded


def _clip_levels(clip_nodes, consts, scale, axis, ndim) -> tuple[int, int]:
    """(qmin, qmax) of a narrow grid from its Min/Max clip constants (scale·qmax, scale·qmin)."""
    qmin, qmax = INT8_MIN, INT8_MAX
    scale = _broadcast_scale(scale, axis, ndim)
    for node in clip_nodes:
        bound = np.rint(consts[node.input[1]] / scale)
        if node.op_type == "Min":
            qmax = int(bound.max())
        else:
            qmin = int(bound.min())
    return qmin, qmax


def absorb_weight_transposes(model_proto: onnx.ModelProto) -> int:
    """int8 W[out,in] -> DQ(axis 0) -> Transpose -> MatMul becomes W^T[in,out] -> DQ(axis 1) -> MatMul.

    The exporter writes nn.Linear as a transpose of the weight. Left in, ONNX Runtime has to
    push the Transpose through the DQ and fold it at load time before it can fuse the integer
    GEMM, which costs ~0.8 GB of transient memory on a base-size model. The scale axis is still
    the output-channel axis, now last as MatMul's weight layout has it. Returns how many.
    """
    graph = model_proto.graph
    inits = {init.name: init for init in graph.initializer}
    consumers = consumer_index(graph)
    dead, absorbed = set(), 0
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        users = consumers.get(dq.output[0], [])
        weight = inits[dq.input[0]]
        if len(users) != 1 or users[0].op_type != "Transpose" or len(weight.dims) != 2 or \
                list(attr(users[0], "perm", [1, 0])) != [1, 0] or \
                len(consumers.get(dq.input[0], [])) != 1:
            continue
        transpose = users[0]
        weight.CopyFrom(numpy_helper.from_array(
            np.ascontiguousarray(numpy_helper.to_array(weight).T), weight.name))
        for a in dq.attribute:
            if a.name == "axis":
                a.i = 1 - (a.i % 2)
        for n in consumers.get(transpose.output[0], []):
            for i, name in enumerate(n.input):
                if name == transpose.output[0]:
                    n.input[i] = dq.output[0]
        for out in graph.output:
            if out.name == transpose.output[0]:
                raise ExportError(f"{transpose.name}: weight transpose is a graph output")
        dead.add(id(transpose))
        absorbed += 1
    kept = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(kept)
    return absorbed


# ----------------------------------------------------------------------------- export


def _speech_metadata(speech, net: nn.Module, family) -> dict[str, str]:
    """Decoder and front-end facts (vocab, blank id, sampling rate, normalisation, CNN strides)
    so the .onnx is self-describing."""
    fields = {"vocab": "vocab", "blank_id": "blank_id", "word_delimiter": "word_delimiter",
              "sampling_rate": "sampling_rate", "do_normalize": "do_normalize",
              "return_attention_mask": "return_attention_mask", "arch": "arch", "name": "model_name"}
    meta = {}
    for field, key in fields.items():
        if speech is not None and hasattr(speech, field):
            meta[key] = getattr(speech, field)
    geometry = family.conv_geometry(net)
    meta["conv_kernel"], meta["conv_stride"] = [k for k, _ in geometry], [s for _, s in geometry]
    return {META_PREFIX + k: json.dumps(v) for k, v in meta.items()}


def _container_note(specs: dict[str, QuantSpec]) -> str | None:
    from collections import Counter

    grids = Counter((s.num_bits, s.qmin, s.qmax) for s in specs.values() if s.num_bits < 8)
    if not grids:
        return None
    parts = [f"{bits}-bit quantizers use the int8 container: scale=amax/{qmax}, integers clipped "
             f"to [{qmin}, {qmax}] ({count} quantizers)"
             for (bits, qmin, qmax), count in sorted(grids.items())]
    return "; ".join(parts) + ". Storage and compute are int8; accuracy is that of the narrow grid."


def _dequantized_weight(name: str, producers, consts) -> np.ndarray | None:
    """Float value of a weight stored as int8 -> DequantizeLinear (None if it is not one)."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in consts:
        return None
    w, scale = consts[dq.input[0]].astype(np.float32), consts[dq.input[1]].astype(np.float32)
    if scale.ndim == 1:
        shape = [1] * w.ndim
        shape[attr(dq, "axis", 1)] = scale.size
        scale = scale.reshape(shape)
    return w * scale


def fold_input_shifts(model_proto: onnx.ModelProto) -> int:
    """DQ -> Add(shift) -> Conv/MatMul becomes DQ -> Conv/MatMul with ``shift * sum(W)`` in the bias.

    A shifted (one-sided) activation range is exported as Sub -> Q -> DQ -> Add; TensorRT fuses
    Q/DQ into an int8 layer only when DQ feeds the layer directly. W (q + c) = W q + c W 1 exactly,
    so the Add moves into the layer's bias (a Conv without padding; a MatMul followed by its bias
    Add). Where that is not possible the Add stays (still correct, the layer then runs in float).
    Returns how many shifts were folded.
    """
    graph = model_proto.graph
    consts, producers, consumers = graph_index(graph)
    dead, new_inits, folded = set(), [], 0
    for add in list(graph.node):
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        src, shift_name = add.input
        if getattr(producers.get(src), "op_type", None) != "DequantizeLinear" or shift_name not in consts \
                or consts[shift_name].size != 1:
            continue
        shift = float(consts[shift_name].reshape(()))
        users = consumers.get(add.output[0], [])
        plans = []
        for user in users:
            plan = None
            if user.op_type == "Conv" and user.input[0] == add.output[0] and not any(attr(user, "pads", [0])):
                w = _dequantized_weight(user.input[1], producers, consts)
                if w is not None and (len(user.input) < 3 or user.input[2] in consts):
                    bias = (consts[user.input[2]] if len(user.input) > 2 and user.input[2]
                            else np.zeros(w.shape[0], np.float32))
                    plan = (user, 2, bias + shift * w.reshape(w.shape[0], -1).sum(axis=1))
            elif user.op_type == "MatMul" and user.input[0] == add.output[0]:
                w = _dequantized_weight(user.input[1], producers, consts)
                after = consumers.get(user.output[0], [])
                if w is not None and w.ndim == 2 and len(after) == 1 and after[0].op_type == "Add":
                    k = 1 if after[0].input[0] == user.output[0] else 0
                    if after[0].input[k] in consts and consts[after[0].input[k]].shape == (w.shape[1],):
                        plan = (after[0], k, consts[after[0].input[k]] + shift * w.sum(axis=0))
            if plan is None:
                break
            plans.append((user, plan))
        if not users or len(plans) != len(users):
            continue
        for user, (node, index, bias) in plans:
            user.input[0] = src
            name = f"{node.name or node.output[0]}_shift_bias"
            new_inits.append(numpy_helper.from_array(bias.astype(np.float32), name))
            if index < len(node.input):
                node.input[index] = name
            else:
                node.input.append(name)
        dead.add(id(add))
        folded += 1
    replace_nodes(graph, dead, new_inits)
    prune_unused(graph)
    return folded


def _export_target(model, opset: int) -> tuple[object | None, nn.Module]:
    """(SpeechModel or None, the module to trace), after refusing an opset our Q/DQ cannot use."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} < {MIN_OPSET}: per-channel int8 Q/DQ needs opset >= 13 "
                          f"and LayerNormalization >= 17")
    speech = None if isinstance(model, nn.Module) else model  # a SpeechModel: has decoder facts
    net = model if speech is None else getattr(speech, "model", None)
    if not isinstance(net, nn.Module):
        raise TypeError(f"expected an nn.Module or SpeechModel, got {type(model).__name__}")
    return speech, net


def _precision_notes(specs: dict[str, QuantSpec], allow_fp32: bool,
                     opset: int) -> tuple[str | None, str | None, int]:
    """(container note, FP8 note, opset): what the file's storage means, and the opset FP8 needs.

    Refuses a model without quantizers unless a float export was asked for; warns about narrow
    grids in the int8 container, since their accuracy is not int8's.
    """
    if not specs and not allow_fp32:
        raise ExportError("model has no enabled quantizer with a calibrated amax; quantize it "
                          "first (mtq.quantize) or pass allow_fp32=True for a float export")
    note = _container_note({n: s for n, s in specs.items() if s.block is None})  # blocks: always INT4
    if note:
        log.warning("ONNX export: %s", note)

    fp8, fp8_note = sum(spec.fp8 for spec in specs.values()), None
    if fp8:
        opset = max(opset, FP8_OPSET)
        fp8_note = (f"{fp8} quantizers are FP8 E4M3 (scale amax/448, float8 weights): ONNX Runtime's "
                    "CPU EP computes them in fp32 after DequantizeLinear; TensorRT runs FP8 on Ada/Hopper.")
        note = " ".join(filter(None, [note, fp8_note]))
    return note, fp8_note, opset


def _precision(specs: dict[str, QuantSpec]) -> str:
    """The file's precision label: int8-qdq, fp8-qdq, int8+fp8-qdq, or fp32 without quantizers."""
    fp8 = sum(spec.fp8 for spec in specs.values())
    return ("int8-qdq" if not fp8 else "fp8-qdq" if fp8 == len(specs) else "int8+fp8-qdq") \
        if specs else "fp32"


def _file_metadata(specs: dict[str, QuantSpec], speech, net: nn.Module, family, note: str | None,
                   bits_note: str | None, metadata: dict[str, str] | None) -> dict[str, str]:
    """The metadata_props the file carries, so it is self-describing: precision, quantizer count,
    bit widths, decoder/front-end facts, the storage notes, then the caller's own key/values."""
    meta = {META_PREFIX + "precision": _precision(specs),
            META_PREFIX + "num_quantizers": str(len(specs)),
            META_PREFIX + "bits": json.dumps(sorted({s.num_bits for s in specs.values()}))}
    meta.update(_speech_metadata(speech, net, family))
    if note or bits_note:
        meta[META_PREFIX + "container_note"] = " ".join(filter(None, [note, bits_note]))
    meta.update(metadata or {})
    return meta


def _trace_sample(net: nn.Module, speech, sample_seconds: float) -> torch.Tensor:
    """Random audio to trace with, on the model's device: at least 400 samples (one frame of a
    wav2vec2-style conv front end), and batch 2 so nothing gets specialised to a single-item batch."""
    sampling_rate = int(getattr(speech, "sampling_rate", 16000))
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    return torch.randn(2, max(int(sample_seconds * sampling_rate), 400), device=device)


def _trace(net: nn.Module, family, specs: dict[str, QuantSpec], sample: torch.Tensor, path: Path,
           opset: int) -> None:
    """torch.onnx.export of the family's export module, every enabled quantizer emitting our Q/DQ;
    batch and length stay dynamic."""
    with torch.no_grad(), _qdq_backend(net, specs), family.export_context(net), warnings.catch_warnings():
        # Shape checks in HF code are traced as constants; the dynamic axes are tested.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            family.export_module(net), (sample,), str(path), input_names=["input_values"],
            output_names=["logits"], opset_version=opset, dynamo=False,
            dynamic_axes={"input_values": {0: "batch", 1: "samples"},
                          "logits": {0: "batch", 1: "frames"}},
        )


def _rewrite_graph(proto: onnx.ModelProto, pack_int4: bool) -> tuple[int, int, int]:
    """The traced graph made deployable: weights stored quantized (int8/FP8 initialisers in MatMul
    layout), shifts folded into biases so TensorRT can fuse, 4-bit weights packed as INT4.

    Returns (weights folded, weights packed INT4 from the int8 container, block weights lowered).
    """
    levels: dict[str, tuple[int, int]] = {}
    folded = fold_weight_quantizers(proto, levels)
    absorb_weight_transposes(proto)
    fold_input_shifts(proto)
    packed = pack_int4_weights(proto, levels) if pack_int4 else 0
    blocked = lower_block_weights(proto)  # block weights are always packed INT4
    return folded, packed, blocked


def _note_int4_storage(meta: dict[str, str], specs: dict[str, QuantSpec], packed: int, blocked: int,
                       fp8_note: str | None, bits_note: str | None) -> None:
    """Rewrite the container note once weights are packed INT4: the int8-container note then
    describes only the quantizers that stayed in int8."""
    key = META_PREFIX + "container_note"
    rest = _container_note({n: s for n, s in specs.items()
                            if not (n.endswith("weight_quantizer") and s.num_bits <= 4)})
    meta[key] = " ".join(filter(None, [f"{packed + blocked} weights on 4-bit grids are stored packed "
                                       "as ONNX INT4 (opset 21), two per byte"
                                       + (f" ({blocked} with one scale per block)." if blocked else "."),
                                       rest, fp8_note, bits_note]))
    meta[META_PREFIX + "int4_weights"] = str(packed + blocked)


def _write_checked(proto: onnx.ModelProto, meta: dict[str, str], path: Path) -> None:
    """Metadata and producer into the model, save it, and have the ONNX checker read the file back."""
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "sq-plugin"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))


def export_onnx(model, out_path: str | Path, *, sample_seconds: float = 1.0, opset: int = MIN_OPSET,
                allow_fp32: bool = False, bits_note: str | None = None,
                metadata: dict[str, str] | None = None, pack_int4: bool = True) -> dict:
    """Export a ModelOpt-quantized CTC model of any family (or a SpeechModel) to Q/DQ ONNX with int8 weights.

    Input ``input_values`` [batch, samples] (already normalised if the model expects it), output
    ``logits`` [batch, frames, vocab]; both batch and length are dynamic. ``bits_note`` is extra
    free text stored with the int8-container note; ``metadata`` adds string key/values to the
    file's metadata_props. Weights of 4 bits or fewer are stored packed as ONNX INT4 (opset 21,
    :mod:`recipes.export.int4`) unless ``pack_int4=False``. The file appears atomically or not at all.
    Returns a summary dict (path, precision, quantizer count, int8 weights, bits, size).
    """
    from recipes.speech import family_of, remove_weight_norm

    speech, net = _export_target(model, opset)
    # Weight-norm parametrization would be exported as its g*v/|v| computation on every run.
    remove_weight_norm(net)
    specs = quant_specs(net)
    note, fp8_note, opset = _precision_notes(specs, allow_fp32, opset)
    family = family_of(net)
    meta = _file_metadata(specs, speech, net, family, note, bits_note, metadata)

    out_path = Path(out_path)
    sample = _trace_sample(net, speech, sample_seconds)
    was_training = net.training
    try:
        net.eval()
        with atomic_output(out_path) as tmp:
            _trace(net, family, specs, sample, tmp, opset)
            proto = onnx.load(str(tmp))
            folded, packed, blocked = _rewrite_graph(proto, pack_int4)
            if packed or blocked:
                _note_int4_storage(meta, specs, packed, blocked, fp8_note, bits_note)
            fp8_weights = sum(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in proto.graph.initializer)
            _write_checked(proto, meta, tmp)
    finally:
        net.train(was_training)
    log.info("ONNX export: %s (%d quantizers, %d weights stored as int8)", out_path, len(specs),
             folded)
    return {"path": str(out_path), "precision": meta[META_PREFIX + "precision"],
            "quantizers": len(specs), "int8_weights": folded - packed - fp8_weights,
            "int4_weights": packed + blocked, "fp8_weights": fp8_weights,
            "bits": sorted({s.num_bits for s in specs.values()}),
            "container_note": meta.get(META_PREFIX + "container_note"),
            "size_bytes": out_path.stat().st_size}


def load_onnx(path: str | Path, **kwargs) -> onnx.ModelProto:
    """onnx.load with a one-line error naming the file for anything that is not an ONNX model."""
    try:
        return onnx.load(str(path), **kwargs)
    except FileNotFoundError:
        raise FileNotFoundError(f"ONNX model not found: {path}") from None
    except Exception as e:  # protobuf DecodeError, truncated file, ...
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'corrupt'})") from None


def read_metadata(onnx_path: str | Path) -> dict[str, object]:
    """The ``sq.*`` metadata written by export_onnx, JSON-decoded where possible."""
    proto = load_onnx(onnx_path, load_external_data=False)
    meta = {}
    for prop in proto.metadata_props:
        if prop.key.startswith(META_PREFIX):
            key = prop.key[len(META_PREFIX):]
            try:
                meta[key] = json.loads(prop.value)
            except json.JSONDecodeError:
                meta[key] = prop.value
    return meta


# ----------------------------------------------------------------------------- TensorRT


def require_tensorrt():
    """TensorRT module, or a one-line RuntimeError naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError(f"TensorRT engine build needs the `tensorrt` Python package, which is "
                           f"not importable here ({e})") from None
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engine build needs a CUDA GPU, and none is visible "
                           "(torch.cuda.is_available() is False)")
    return trt


def build_trt_engine(onnx_path: str | Path, engine_path: str | Path, *,
                     min_seconds: float = 0.5, opt_seconds: float = 10.0, max_seconds: float = 30.0,
                     max_batch: int = 8, sampling_rate: int = 16000,
                     workspace_gib: float = 4.0) -> Path:
    """Build a strongly typed TensorRT 10 engine from the Q/DQ ONNX (int8 where Q/DQ says so).

    Strongly typed: precisions come from the Q/DQ nodes, not from builder flags, so the engine
    runs exactly the int8 ops the ONNX describes.
    """
    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    samples = [int(s * sampling_rate) for s in (min_seconds, opt_seconds, max_seconds)]
    profile.set_shape("input_values", (1, samples[0]), (1, samples[1]), (max_batch, samples[2]))
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    with atomic_output(engine_path) as tmp:
        tmp.write_bytes(serialized)
    return engine_path
