"""Run an exported CTC .onnx with ONNX Runtime, and score it with the same evaluator as torch models.

OnnxCTCModel is a speech model of its own family (:mod:`recipes.speech.onnx_ctc`: logits from the
session, frame counts from the exported conv geometry), so recipes.evaluation.asr.evaluate needs no
ONNX-specific branch; it imitates no other family's methods, so no other family claims it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recipes.export.graph import constant_values, prune_unused
from recipes.export.onnx import load_onnx, read_metadata

MIN_IM2COL_DEPTH = 64  # Cin*kernel below this (the 1-channel waveform conv) gains nothing


@dataclass
class _Output:
    logits: torch.Tensor


# ----------------------------------------------------------------------------- ORT lowering


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _qdq_conv_parts(conv, producers, consts):
    """(float input, x scale, int8 weight, w scale, bias) of a 1-D DQ->Conv, else None."""
    if any(d != 1 for d in _attrs(conv).get("dilations", [1])):
        return None
    x_dq, w_dq = producers.get(conv.input[0]), producers.get(conv.input[1])
    if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or \
            w_dq.op_type != "DequantizeLinear" or "block_size" in _attrs(w_dq):  # blocks: ORT's DQ -> Conv
        return None
    x_q = producers.get(x_dq.input[0])
    weight = consts.get(w_dq.input[0])
    if weight is not None and weight.dtype.name == "int4":  # packed INT4 file: same integers, int8 GEMM
        weight = weight.astype(np.int8)
    sx = consts.get(x_dq.input[1])
    if x_q is None or x_q.op_type != "QuantizeLinear" or weight is None or weight.ndim != 3 or \
            sx is None or sx.size != 1 or weight.dtype != np.int8 or len(x_dq.input) > 2 and \
            np.any(consts.get(x_dq.input[2], 1) != 0):
        return None
    if weight.shape[1] * weight.shape[2] < MIN_IM2COL_DEPTH:
        return None
    bias = consts.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    return x_q.input[0], x_dq.input[1], weight, consts[w_dq.input[1]], bias


def _initializer(prefix: str, new_inits: list):
    """init(name, value) -> the name of a new initializer `prefix/name` holding `value`."""
    from onnx import numpy_helper

    def init(name, value):
        new_inits.append(numpy_helper.from_array(np.asarray(value), f"{prefix}/{name}"))
        return f"{prefix}/{name}"

    return init


def _im2col_nodes(conv, attrs, parts, consts, new_inits) -> list:
    """Q(x, zp 128) -> [B,T,C] uint8 taps -> MatMulIntegerToFloat (+bias) -> [B,C,T]."""
    from onnx import helper

    x_float, sx_name, weight, sw, bias = parts
    cout, cin, kernel = weight.shape
    stride = attrs.get("strides", [1])[0]
    p = f"{conv.name or conv.output[0]}/ort_int8"
    init = _initializer(p, new_inits)
    zp_u8 = init("x_zero_point", np.array(128, dtype=np.uint8))
    # rows of the im2col weight: kernel tap major, then input channel (matches the Concat)
    w_cols = init("w_cols", np.ascontiguousarray(weight.transpose(2, 1, 0).reshape(kernel * cin, cout)))
    sw_vec = init("w_scale", np.broadcast_to(np.asarray(sw, np.float32).reshape(-1), (cout,)).copy())
    nodes = [helper.make_node("QuantizeLinear", [x_float, sx_name, zp_u8], [f"{p}/x_u8"]),
             helper.make_node("Transpose", [f"{p}/x_u8"], [f"{p}/x_t"], perm=[0, 2, 1])]
    taps = []
    for k in range(kernel):
        starts, ends = init(f"start{k}", np.array([k])), init(f"end{k}", np.array([2**62]))
        axes, steps = init(f"axes{k}", np.array([1])), init(f"step{k}", np.array([stride]))
        nodes.append(helper.make_node("Slice", [f"{p}/x_t", starts, ends, axes, steps],
                                      [f"{p}/tap{k}"]))
        taps.append(f"{p}/tap{k}")
    if kernel > 1:  # earlier taps are up to one frame longer: cut them to the last one's length
        nodes.append(helper.make_node("Shape", [taps[-1]], [f"{p}/frames"], start=1, end=2))
        zero, axis1 = init("zero", np.array([0])), init("axis1", np.array([1]))
        for k in range(kernel - 1):
            nodes.append(helper.make_node("Slice", [taps[k], zero, f"{p}/frames", axis1],
                                          [f"{p}/tap{k}_cut"]))
            taps[k] = f"{p}/tap{k}_cut"
        nodes.append(helper.make_node("Concat", taps, [f"{p}/cols"], axis=2))
        cols = f"{p}/cols"
    else:
        cols = taps[0]
    mm_inputs = [cols, w_cols, sx_name, sw_vec, zp_u8, ""]
    if bias is not None:
        mm_inputs.append(init("bias", np.asarray(bias, np.float32)))
    return nodes + [helper.make_node("MatMulIntegerToFloat", mm_inputs, [f"{p}/y"], domain="com.microsoft"),
                    helper.make_node("Transpose", [f"{p}/y"], [conv.output[0]], perm=[0, 2, 1])]


def _conv_integer_nodes(conv, attrs, parts, consts, new_inits) -> list:
    """Q(x, zp 128) -> ConvInteger(uint8 w, zp 128) -> Cast * (sx * sw) (+ bias), same attributes."""
    from onnx import TensorProto, helper

    x_float, sx_name, weight, sw, bias = parts
    cout = weight.shape[0]
    p = f"{conv.name or conv.output[0]}/ort_int8"
    init = _initializer(p, new_inits)
    zp_u8 = init("zero_point", np.array(128, dtype=np.uint8))
    w_u8 = init("w_u8", (weight.astype(np.int16) + 128).astype(np.uint8))
    scale = np.asarray(consts[sx_name], np.float64) * np.broadcast_to(
        np.asarray(sw, np.float64).reshape(-1), (cout,))
    keep = {k: v for k, v in attrs.items() if k in ("group", "pads", "strides", "kernel_shape")}
    nodes = [helper.make_node("QuantizeLinear", [x_float, sx_name, zp_u8], [f"{p}/x_u8"]),
             helper.make_node("ConvInteger", [f"{p}/x_u8", w_u8, zp_u8, zp_u8], [f"{p}/acc"], **keep),
             helper.make_node("Cast", [f"{p}/acc"], [f"{p}/acc_f"], to=TensorProto.FLOAT)]
    out = conv.output[0]
    scaled = f"{p}/scaled" if bias is not None else out
    nodes.append(helper.make_node("Mul", [f"{p}/acc_f", init("scale", scale.astype(np.float32).reshape(1, cout, 1))],
                                  [scaled]))
    if bias is not None:
        nodes.append(helper.make_node("Add", [scaled, init("bias", np.asarray(bias, np.float32).reshape(1, cout, 1))],
                                      [out]))
    return nodes


def lower_qdq_conv_for_ort(proto) -> int:
    """Rewrite each int8 DQ->Conv1d as an integer conv with float output, in memory.

    ORT's CPU EP fuses Q/DQ around MatMul into an integer GEMM, but Conv only when the conv
    output is quantized too (QLinearConv), which a faithful export of ModelOpt's fake-quant
    never has; so the wav2vec2 CNN front end (~35% of the work) and the grouped positional conv
    (~4%) would run in fp32. MLAS's integer kernels are only fast for uint8 activations, so x is
    re-quantized with zero point 128: the same integer grid shifted. Plain strided convs become
    uint8 im2col + MatMulIntegerToFloat; grouped or padded ones become ConvInteger, whose fast
    path also wants uint8 weights (int8 + 128, zero point 128; measured 8x slower with int8
    weights), then Cast * (sx * sw) + bias. Exact: int32 accumulation, then the DQ scales.
    The .onnx file itself stays plain Q/DQ (TensorRT reads it as is). Returns convs lowered.
    """
    from onnx import helper

    graph = proto.graph
    consts = constant_values(graph)
    producers = {o: n for n in graph.node for o in n.output}
    new_nodes, new_inits, lowered = {}, [], 0
    for conv in graph.node:
        parts = _qdq_conv_parts(conv, producers, consts) if conv.op_type == "Conv" else None
        if parts is None:
            continue
        attrs = _attrs(conv)
        plain = attrs.get("group", 1) == 1 and not any(attrs.get("pads", [0]))
        build = _im2col_nodes if plain else _conv_integer_nodes
        new_nodes[id(conv)] = build(conv, attrs, parts, consts, new_inits)
        lowered += 1
    if not lowered:
        return 0
    rebuilt = []
    for node in graph.node:
        rebuilt.extend(new_nodes.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_inits)
    prune_unused(graph, any_node=True)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return lowered


AVX2_PRECISION = "session.x64quantprecision"  # ORT: exact u8s8 GEMMs on AVX2 CPUs without VNNI


def cpu_session_options(session_options=None):
    """Session options for the CPU EP with ORT's AVX2 high-precision mode on, unless the caller set it.

    On x86 CPUs without VNNI, ORT turns int8 activations into uint8 and MLAS's u8*s8 kernel adds
    pairs of products in int16, which saturates (2 * 255 * 127 > 32767): on an AVX2-only EPYC it
    moved logits by two activation steps. With ``session.x64quantprecision=1`` the integer GEMMs are
    exact there, as they are on VNNI CPUs, where the setting changes nothing."""
    import onnxruntime as ort

    session_options = session_options or ort.SessionOptions()
    try:
        session_options.get_session_config_entry(AVX2_PRECISION)  # the caller's choice stands
    except RuntimeError:  # not set
        session_options.add_session_config_entry(AVX2_PRECISION, "1")
    return session_options


def make_session(path: str | Path, providers: list[str] | None = None, session_options=None,
                 lower_conv: bool = True):
    """ONNX Runtime session for an exported file; int8 convs lowered for the CPU EP (in memory),
    whose integer GEMMs are exact on every x86 CPU (:func:`cpu_session_options`)."""
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    if providers[0] == "CPUExecutionProvider":
        session_options = cpu_session_options(session_options)
    model = str(path)
    if lower_conv and providers[0] == "CPUExecutionProvider":
        proto = load_onnx(model)
        if lower_qdq_conv_for_ort(proto):
            model = proto.SerializeToString()
        del proto  # not held while ORT builds the session (peak memory)
    try:
        return ort.InferenceSession(model, sess_options=session_options, providers=providers)
    except Exception as e:  # ORT's Fail / InvalidGraph / NotImplemented: a graph it cannot run
        raise ValueError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None


class OnnxCTCModel:
    """An exported CTC model in an ONNX Runtime session, plus its decoder facts from metadata."""

    def __init__(self, path: str | Path, providers: list[str] | None = None,
                 session_options=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        self.session = make_session(self.path, providers, session_options)
        self.meta = read_metadata(self.path)

    def logits(self, input_values: np.ndarray) -> np.ndarray:
        """[batch, samples] float32 (normalised as the model expects) -> [batch, frames, vocab]."""
        x = np.ascontiguousarray(input_values, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        return self.session.run(["logits"], {"input_values": x})[0]

    # --- what recipes.speech.onnx_ctc asks ------------------------------------------------------

    def __call__(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = input_values.detach().cpu().numpy()
        if attention_mask is None:  # (the export has no mask input)
            return _Output(torch.from_numpy(self.logits(x)))
        # Models trained with a mask must not see padding: run each utterance at its own length
        # and pad the logits back to the batch's frame count.
        lengths = attention_mask.sum(-1).tolist()
        rows = [self.logits(x[i : i + 1, : int(n)])[0] for i, n in enumerate(lengths)]
        frames = self._frames(x.shape[1]) or max(r.shape[0] for r in rows)
        out = np.zeros((len(rows), frames, rows[0].shape[-1]), dtype=np.float32)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return _Output(torch.from_numpy(out))

    def _frames(self, samples: int) -> int | None:
        if "conv_kernel" not in self.meta:
            return None
        return int(self.output_lengths(torch.tensor([samples]))[0])

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid logit frames for ``lengths`` input samples, from the exported conv geometry."""
        from recipes.speech.contract import conv_output_lengths

        if "conv_kernel" not in self.meta:
            raise ValueError(f"{self.path}: metadata lacks conv_kernel/conv_stride; re-export it "
                             "with recipes.export.onnx.export_onnx")
        return conv_output_lengths(lengths, list(zip(self.meta["conv_kernel"], self.meta["conv_stride"])))

    def parameters(self):
        return iter(())

    def speech_model(self, vocab_source=None):
        """A recipes.speech.models.SpeechModel around this session, for evaluate()/transcribe().

        The vocab and preprocessing facts come from the ONNX metadata, or from `vocab_source`
        (a SpeechModel, "demo" or an HF model directory) for files exported without them.
        """
        from recipes.speech.models import SpeechModel, resolve_model

        if vocab_source is not None and not hasattr(vocab_source, "vocab"):
            vocab_source = resolve_model(vocab_source)
        meta = self.meta
        if vocab_source is None and "vocab" not in meta:
            raise ValueError(f"{self.path}: no vocabulary in the ONNX metadata; pass the source "
                             "model directory to take it from")

        def fact(key, attr, default):
            if vocab_source is not None:
                return getattr(vocab_source, attr, default)
            return meta.get(key, default)

        return SpeechModel(
            model=self, arch=str(meta.get("arch", "onnx")), vocab=list(fact("vocab", "vocab", None)),
            blank_id=int(fact("blank_id", "blank_id", 0)),
            word_delimiter=str(fact("word_delimiter", "word_delimiter", "|")),
            sampling_rate=int(fact("sampling_rate", "sampling_rate", 16000)),
            do_normalize=bool(fact("do_normalize", "do_normalize", True)),
            return_attention_mask=bool(fact("return_attention_mask", "return_attention_mask", False)),
            name=self.path.name,
        )


def run_eval_onnx(onnx_path: str | Path, data=None, model: str | Path | None = "demo", *,
                  limit: int | None = None, batch_seconds: float = 32.0, skip_bad: bool = False,
                  seed: int = 0, providers: list[str] | None = None, progress: bool = True,
                  print_table: bool = True) -> dict:
    """`stablequant eval --onnx`: WER/CER of an exported .onnx, scored like recipes.evaluation.evaluate.run_eval.

    `data` is a data set path (None: the demo test set when model is "demo") or ready batches.
    `model` supplies the vocabulary only if the .onnx lacks it in its metadata.
    """
    import time

    from recipes.data.readers import make_batches
    from recipes.evaluation.asr import evaluate
    from recipes.evaluation.evaluate import format_table, load_eval_data

    runner = OnnxCTCModel(onnx_path, providers=providers)
    sm = runner.speech_model(None if "vocab" in runner.meta else model)
    if data is None or isinstance(data, (str, Path)):
        utts, data_label = load_eval_data(str(model), data)
        batches = make_batches(utts, sm, batch_seconds=batch_seconds, limit=limit, seed=seed,
                               skip_bad=skip_bad)
    else:
        batches, data_label = data, "batches"
    start = time.perf_counter()
    result = evaluate(sm, batches, progress=progress)
    elapsed = time.perf_counter() - start
    audio_seconds = sum(float(b.lengths.sum()) for b in batches) / sm.sampling_rate
    result.update(model=str(onnx_path), arch=sm.arch, data=data_label, audio_seconds=audio_seconds,
                  precision=runner.meta.get("precision", "unknown"), elapsed_seconds=elapsed)
    if print_table:
        print(format_table([
            ("onnx", f"{onnx_path} ({result['precision']}, ONNX Runtime "
                     f"{runner.session.get_providers()[0]})"),
            ("data", data_label),
            ("utterances", str(result["n"])),
            ("WER", f"{result['wer']:.2f} %"),
            ("CER", f"{result['cer']:.2f} %"),
            ("time", f"{elapsed:.1f} s (RTF {elapsed / max(audio_seconds, 1e-9):.3f})"),
        ]))
    return result
