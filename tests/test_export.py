"""Q/DQ ONNX export of a tiny random wav2vec2: graph form, scales against the torch quantizers,
ONNX Runtime against torch fake-quant, W6 container, failure modes, TensorRT gate, ORT evaluation."""

import copy
import os
import re
import warnings

import modelopt.torch.quantization as mtq
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from oracles import SR, activation_step, dq_nodes, enabled_quantizers, quantized_tiny, quantizer_of, torch_logits

from recipes.export import onnx as export
from recipes.export.onnx import ExportError, build_trt_engine, export_onnx, quantize_like_ort, read_metadata
from recipes.export.onnx_runner import OnnxCTCModel, cpu_session_options, lower_qdq_conv_for_ort, run_eval_onnx
from recipes.speech.models import random_model, remove_weight_norm

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    sm = quantized_tiny()
    path = export_onnx(sm, tmp_path_factory.mktemp("int8") / "tiny.onnx")["path"]
    return sm, path, onnx.load(path)


@pytest.fixture(scope="module")
def w6(tmp_path_factory):
    sm = quantized_tiny(weight_bits=6)
    # One weight quantizer with a deliberately small amax, so clipping to the 6-bit range bites.
    q = sm.model.wav2vec2.encoder.layers[0].attention.q_proj.weight_quantizer
    q.amax = q.amax * 0.5
    path = export_onnx(sm, tmp_path_factory.mktemp("w6") / "tiny_w6.onnx")["path"]
    return sm, path, onnx.load(path)


# ----------------------------------------------------------------------------- graph form


def test_weights_are_int8_initialisers_feeding_dequantize(int8):
    sm, _, proto = int8
    consts = export.constant_values(proto.graph)
    inits = {i.name: i for i in proto.graph.initializer}
    for q in (n for n in proto.graph.node if n.op_type == "QuantizeLinear"):
        assert q.input[0] not in consts, f"{q.name}: float constant still fed to QuantizeLinear"
    weight_dqs = [n for n in dq_nodes(proto) if n.input[0] in inits]
    expected = {n for n in enabled_quantizers(sm.model) if n.endswith("weight_quantizer")}
    assert {quantizer_of(n) for n in weight_dqs} == expected
    for n in weight_dqs:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT8
    # No fp32 copy of a quantized weight survives in the file.
    assert not any(name.endswith(".weight") and "lm_head" not in name and "norm" not in name
                   for name in inits)


def test_linear_weights_feed_matmul_without_transpose(int8):
    _, _, proto = int8
    inits = {i.name for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    matmul_weights = [producers.get(n.input[1]) for n in proto.graph.node if n.op_type == "MatMul"]
    weight_dqs = [p for p in matmul_weights if p is not None and p.op_type == "DequantizeLinear"
                  and p.input[0] in inits]
    assert len(weight_dqs) == 2 * 6 + 1  # 6 Linear per layer x 2 layers + feature projection


def test_scales_are_amax_over_127_and_zero_points_zero(int8):
    sm, _, proto = int8
    consts = export.constant_values(proto.graph)
    quantizers = enabled_quantizers(sm.model)
    seen = set()
    for n in dq_nodes(proto):
        name = quantizer_of(n)
        q = quantizers[name]  # oracle: the torch quantizer's own amax
        scale, zero = consts[n.input[1]], consts[n.input[2]]
        amax = q.amax.detach().numpy().astype(np.float32)
        np.testing.assert_allclose(scale, (amax / 127).reshape(scale.shape), rtol=1e-6)
        assert zero.dtype == np.int8 and not zero.any()
        if name.endswith("weight_quantizer"):
            # Output-channel axis: 0 of a Conv weight [out, in, k], 1 of a MatMul weight [in, out]
            # (nn.Linear's [out, in] is stored transposed, as MatMul consumes it).
            axis = next(a.i for a in n.attribute if a.name == "axis")
            ints = consts[n.input[0]]
            assert axis == (0 if ints.ndim == 3 else 1)
            assert scale.shape == (amax.size,) == (ints.shape[axis],) and amax.size > 1
        else:
            assert scale.shape == () and not any(a.name == "axis" for a in n.attribute)
        seen.add(name)
    assert seen == set(quantizers)


def test_int8_weights_reproduce_torch_fake_quant(int8):
    """int8 * scale must equal ModelOpt's fake-quantized weight: same levels, same clipping."""
    sm, _, proto = int8
    for ints, scale, fake in stored_and_fake_weights(sm, proto):
        scale = scale.reshape((-1,) + (1,) * (fake.ndim - 1))
        np.testing.assert_allclose(ints * scale, fake, rtol=1e-5, atol=1e-7)


def stored_and_fake_weights(sm, proto):
    """(stored weight values in nn layout, DQ scale, ModelOpt's fake-quantized weight) per weight DQ."""
    modules = dict(sm.model.named_modules())
    consts = export.constant_values(proto.graph)
    for n in dq_nodes(proto):
        name = quantizer_of(n)
        if not name.endswith("weight_quantizer"):
            continue
        layer = modules[name.removesuffix(".weight_quantizer")]
        with torch.no_grad():
            fake = layer.weight_quantizer(layer.weight).numpy()
        stored = consts[n.input[0]]
        stored = stored.T if stored.ndim == 2 else stored  # MatMul layout [in, out] -> nn.Linear [out, in]
        yield stored, consts[n.input[1]], fake


def test_no_attention_mask_is_traced(int8):
    """The export has no mask input: no all-valid mask may be built (Range/Where/Expand) and
    added to the attention scores; test_ort_matches_torch_fake_quant_* checks the logits."""
    sm, _, proto = int8
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Range", "Where", "Expand", "IsNaN"}, ops
    softmax_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "Softmax"}
    producers = {o: n for n in proto.graph.node for o in n.output}
    assert {producers[i].op_type for i in softmax_inputs} == {"Mul"}  # scores * scale, no + mask
    assert sm.model.config._attn_implementation == "sdpa"  # restored after the export


def test_opset_checker_and_metadata(int8):
    sm, path, proto = int8
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    onnx.checker.check_model(str(path))
    meta = read_metadata(path)
    assert meta["vocab"] == sm.vocab and meta["blank_id"] == sm.blank_id
    assert meta["sampling_rate"] == 16000 and meta["do_normalize"] is True
    assert meta["bits"] == [8] and "container_note" not in meta


def test_quantize_like_ort_is_bit_exact_with_onnxruntime():
    """Ties (k + 0.5 steps) round to even and saturation clips, exactly as ORT's QuantizeLinear."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    scale = np.array([0.02, 0.5, 1e-3], dtype=np.float32)
    w = rng.normal(0, 1, (3, 64)).astype(np.float32)
    w[:, :8] = (np.arange(-4, 4) + 0.5)[None] * scale[:, None]  # exact ties
    w[:, 8] = 1000.0 * scale  # saturates
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=0)], "q",
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape)],
        [helper.make_tensor_value_info("q", TensorProto.INT8, w.shape)],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.zeros(3, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(quantize_like_ort(w, scale, 0), sess.run(None, {"w": w})[0])


# ----------------------------------------------------------------------------- numerics


def assert_close_to_torch(sm, path, shapes):
    """Torch multiplies by 127/amax, ORT divides by amax/127: an element sitting on a rounding
    tie can land one int8 step apart in some quantizer, and that step propagates. So no logit
    may move by more than one step of the coarsest activation quantizer (on average far less).
    No token-agreement count: float GEMM rounding differs by CPU, and the random model's top-2
    logits are mostly within two steps, so a flipped near-tie says nothing (it failed on an
    AVX2-only EPYC at 73 of 74 frames); the demo's transcripts are compared in test_cli."""
    runner = OnnxCTCModel(path)
    tol = activation_step(sm)
    for shape in shapes:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        ref, got = torch_logits(sm, x), runner.logits(x.numpy())
        assert got.shape == ref.shape
        err = np.abs(got - ref)
        assert err.max() <= tol and err.mean() <= tol / 10, (err.max(), tol)


def test_ort_matches_torch_fake_quant_on_dynamic_shapes(int8):
    sm, path, _ = int8
    assert_close_to_torch(sm, path, [(1, 8000), (3, 21_337)])


@pytest.mark.parametrize("group,pad,stride", [(1, 0, 2), (4, 3, 1)])
def test_ort_conv_lowering_is_the_exact_integer_conv(group, pad, stride):
    """Lowered conv == sum_k (w_k * sw) @ (q(x)_k * sx) on the zero-padded input, per group, to
    float rounding: the plain strided conv (im2col + MatMulIntegerToFloat) and the grouped,
    padded one (ConvInteger, as wav2vec2's positional conv)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    cout, cin, kernel = 8, 32 * group, 3  # depth per group 96 >= MIN_IM2COL_DEPTH
    w = rng.integers(-127, 128, (cout, cin // group, kernel)).astype(np.int8)
    w[0, 0, 0], w[1, 0, 0] = -128, 127  # both ends of the int8 range
    sw, sx = rng.uniform(0.01, 0.02, cout).astype(np.float32), np.float32(0.05)
    bias = rng.normal(size=cout).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
         helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
         helper.make_node("Conv", ["xd", "wd", "b"], ["y"], strides=[stride], group=group,
                          pads=[pad, pad], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(sw, "sw"),
         numpy_helper.from_array(np.zeros(cout, np.int8), "zw"),
         numpy_helper.from_array(np.array(sx), "sx"), numpy_helper.from_array(np.array(0, np.int8), "zx"),
         numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert lower_qdq_conv_for_ort(model) == 1
    assert not any(n.op_type == "Conv" for n in model.graph.node)
    sess = ort.InferenceSession(model.SerializeToString(), cpu_session_options(), providers=["CPUExecutionProvider"])
    cg, og = cin // group, cout // group
    for length in (41, 42):  # both parities of (L - kernel) / stride
        x = rng.standard_normal((2, cin, length)).astype(np.float32)
        x[0, 0, 0] = 100.0  # saturates at 127
        y = sess.run(None, {"x": x})[0]
        xq = np.clip(np.rint(x / sx), -128, 127) * np.float64(sx)
        xq = np.pad(xq, ((0, 0), (0, 0), (pad, pad)))
        frames = (length + 2 * pad - kernel) // stride + 1
        ref = np.concatenate([
            sum(np.einsum("oc,bct->bot",
                          w[g * og:(g + 1) * og, :, k] * sw[g * og:(g + 1) * og, None].astype(np.float64),
                          xq[:, g * cg:(g + 1) * cg, k::stride][:, :, :frames]) for k in range(kernel))
            for g in range(group)], axis=1)
        ref += bias[None, :, None]
        assert y.shape == (2, cout, frames)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


def test_runner_int8_matmul_is_exact_at_full_range(tmp_path):
    """Q/DQ MatMul at the corners of the int8 grid (x = 127, w = ±127): the runner's session gives the
    exact integer product K * 127 * 127. ORT's default on AVX2 CPUs without VNNI adds u8*s8 pairs in
    int16 and saturates here (32767 per pair instead of 2 * 255 * 127), which the runner turns off."""
    from onnx import TensorProto, helper

    from recipes.export.onnx_runner import make_session

    k = 64
    w = np.full((k, 8), 127, np.int8)
    w[:, 1::2] = -127
    one, zero = numpy_helper.from_array(np.float32(1.0), "one"), numpy_helper.from_array(np.int8(0), "zero")
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "one", "zero"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "one", "zero"], ["xd"]),
         helper.make_node("DequantizeLinear", ["w", "one", "zero"], ["wd"]),
         helper.make_node("MatMul", ["xd", "wd"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(w, "w"), one, zero])
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)
    x = np.full((4, k), 127.0, np.float32)
    x[1] = -127.0
    x[2, ::2] = 0.0
    got = make_session(path).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, np.round(x).astype(np.int64) @ w.astype(np.int64))


def test_runner_lowers_the_cnn_front_end(int8):
    _, path, proto = int8
    proto = copy.deepcopy(proto)
    # 6 of the 7 CNN convs (the 1-channel waveform conv is too shallow to gain) and the grouped,
    # padded positional conv.
    assert lower_qdq_conv_for_ort(proto) == 7


# ----------------------------------------------------------------------------- W6 container


def test_w6_uses_int8_container_with_clip_to_31(w6):
    sm, path, proto = w6
    meta = read_metadata(path)
    assert meta["bits"] == [6, 8]
    assert "6-bit" in meta["container_note"] and "amax/31" in meta["container_note"]
    consts = export.constant_values(proto.graph)
    quantizers = enabled_quantizers(sm.model)
    hits = 0
    for n in dq_nodes(proto):
        name = quantizer_of(n)
        if not name.endswith("weight_quantizer"):
            continue
        ints = consts[n.input[0]]
        assert ints.dtype == np.int8 and ints.min() >= -32 and ints.max() <= 31
        amax = quantizers[name].amax.detach().numpy().reshape(-1)
        np.testing.assert_allclose(consts[n.input[1]], amax / 31, rtol=1e-6)
        hits += int(np.abs(ints).max() >= 31)
    assert hits > 0
    test_int8_weights_reproduce_torch_fake_quant(w6)  # clipped q_proj included
    assert_close_to_torch(sm, path, [(2, 12_000)])


def test_narrow_activation_gets_clip_before_quantize(tmp_path):
    sm = quantized_tiny()
    q = sm.model.wav2vec2.encoder.layers[0].feed_forward.intermediate_dense.input_quantizer
    q.num_bits = 4
    path = export_onnx(sm, tmp_path / "a4.onnx")["path"]
    proto = onnx.load(path)
    producers = {o: n for n in proto.graph.node for o in n.output}
    quant = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"
             and quantizer_of(n).endswith("intermediate_dense.input_quantizer")
             and ".layers.0." in n.name.replace("/", ".")]
    assert len(quant) == 1 and producers[quant[0].input[0]].op_type == "Max"
    assert_close_to_torch(sm, path, [(1, 16_000)])


# ----------------------------------------------------------------------------- failure modes


@pytest.mark.parametrize("breakage, message", [
    (lambda q: setattr(q, "num_bits", 3), "num_bits=3"),
    (lambda q: setattr(q, "num_bits", (4, 3)), "FP8 E4M3 export needs a per-tensor amax"),
    (lambda q: setattr(q, "num_bits", (2, 1)), "num_bits=(2, 1)"),
    (lambda q: setattr(q, "unsigned", True), "unsigned"),
    (lambda q: setattr(q, "_bias", {"type": "static"}), "asymmetric"),
])
def test_bad_quantizer_settings_name_the_quantizer(tmp_path, breakage, message):
    sm = quantized_tiny()
    breakage(sm.model.wav2vec2.encoder.layers[1].attention.k_proj.weight_quantizer)
    with pytest.raises(ExportError, match=re.escape(message)) as info:
        export_onnx(sm, tmp_path / "bad.onnx")
    assert "layers.1.attention.k_proj.weight_quantizer" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_unquantized_model_needs_allow_fp32(tmp_path):
    sm = random_model("tiny")
    with pytest.raises(ExportError, match="allow_fp32"):
        export_onnx(sm, tmp_path / "fp32.onnx")
    path = export_onnx(sm, tmp_path / "fp32.onnx", allow_fp32=True)["path"]
    proto = onnx.load(path)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    assert read_metadata(path)["precision"] == "fp32"
    x = torch.randn(2, 9000)
    np.testing.assert_allclose(OnnxCTCModel(path).logits(x.numpy()), torch_logits(sm, x),
                               atol=1e-4, rtol=1e-4)


def test_failed_export_leaves_old_file_and_no_temp(tmp_path, monkeypatch, int8):
    sm, _, _ = int8
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")

    def broken_check(_path):
        raise onnx.checker.ValidationError("simulated failure after writing")

    monkeypatch.setattr(export.onnx.checker, "check_model", broken_check)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(sm, out)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]
    assert out.read_bytes() == b"previous export"


def test_bare_module_export_takes_vocab_from_the_model(int8, tmp_path):
    sm, _, _ = int8
    path = export_onnx(sm.model, tmp_path / "bare.onnx")["path"]
    runner = OnnxCTCModel(path)
    assert "vocab" not in runner.meta and runner.meta["conv_stride"] == list(sm.model.config.conv_stride)
    with pytest.raises(ValueError, match="no vocabulary"):
        runner.speech_model()
    assert runner.speech_model(sm).vocab == sm.vocab


def test_export_restores_quantizer_backends(int8):
    sm, _, _ = int8
    assert all(getattr(q, "backend", None) is None for q in enabled_quantizers(sm.model).values())


# ----------------------------------------------------------------------------- TensorRT


def _trt_missing_reason():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt not importable"
    return None if torch.cuda.is_available() else "no CUDA GPU"


def test_build_trt_engine(int8, tmp_path):
    reason = _trt_missing_reason()
    if reason:
        pytest.skip(f"TensorRT engine build not possible here: {reason}")
    _, path, _ = int8
    engine = build_trt_engine(path, tmp_path / "tiny.engine", opt_seconds=1.0, max_seconds=2.0,
                              max_batch=2)
    assert engine.stat().st_size > 0


def test_build_trt_engine_says_what_is_missing(int8, tmp_path):
    reason = _trt_missing_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present")
    _, path, _ = int8
    expected = "`tensorrt`" if reason.startswith("tensorrt") else "CUDA GPU"
    with pytest.raises(RuntimeError, match=expected) as info:
        build_trt_engine(path, tmp_path / "tiny.engine")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "tiny.engine").exists()


# ----------------------------------------------------------------------------- evaluation


def test_onnx_model_plugs_into_evaluate(int8):
    from recipes.data.readers import Batch
    from recipes.evaluation.asr import evaluate

    sm, path, _ = int8
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([16_000, 11_000])
    x = torch.randn(2, 16_000, generator=gen)
    x[1, 11_000:] = 0
    batches = [Batch(x, None, lengths, ["HELLO WORLD", "A B"], ["u1", "u2"])]
    expected = evaluate(sm, batches, progress=False)
    got = run_eval_onnx(path, batches, progress=False, print_table=False)
    assert got["hyps"] == expected["hyps"] and got["wer"] == expected["wer"]
    # A mask-trained model's runner evaluates each utterance unpadded.
    mask = (torch.arange(16_000)[None] < lengths[:, None]).long()
    onnx_sm = OnnxCTCModel(path).speech_model()
    from recipes.speech import family_of
    from recipes.speech.hf_ctc import FAMILY as HF

    assert family_of(onnx_sm).name == "onnx" and not HF.claims_module(onnx_sm.model)  # whatever the list order
    out = onnx_sm.model(x, attention_mask=mask).logits
    alone = onnx_sm.model.logits(x[1:, :11_000].numpy())[0]
    np.testing.assert_allclose(out[1, : alone.shape[0]].numpy(), alone, atol=1e-6)


def test_equalized_cnn_exports_faithfully(tmp_path):
    """Per-channel equalisation (pre_quant_scale + scaled weights) keeps the float model's output
    and survives export: ONNX Runtime matches the torch fake-quant model."""
    import sq_plugin  # noqa: F401
    from recipes.search.qconfig import CNN_EQUALIZE, stablequant_config

    sm = random_model("tiny", seed=4)
    remove_weight_norm(sm.model)
    calib = torch.randn(2, SR, generator=torch.Generator().manual_seed(4))
    x = torch.randn(1, SR // 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        float_ref = sm.model(x).logits
    cfg = stablequant_config(8, 8, num_bins=256, equalize=CNN_EQUALIZE, equalize_alpha=0.8)
    mtq.quantize(sm.model, cfg, lambda m: m(calib))
    conv1 = sm.model.wav2vec2.feature_extractor.conv_layers[1].conv
    assert conv1.input_quantizer.pre_quant_scale is not None
    assert sm.model.wav2vec2.feature_extractor.conv_layers[0].conv.input_quantizer.pre_quant_scale is None
    # float forward unchanged by the equalisation itself (quantizers off)
    quantizers = enabled_quantizers(sm.model)
    for q in quantizers.values():
        q.disable()
    with torch.no_grad():
        torch.testing.assert_close(sm.model(x).logits, float_ref, rtol=1e-4, atol=1e-4)
    for q in quantizers.values():
        q.enable()
    path = export_onnx(sm, tmp_path / "eq.onnx")["path"]
    assert_close_to_torch(sm, path, [(1, 8000)])


def test_shifted_ranges_export_faithfully(tmp_path):
    """One-sided (shifted) activation ranges: Sub -> Q -> DQ -> Add in ONNX, and ONNX Runtime
    matches the torch fake-quant model."""
    import sq_plugin  # noqa: F401
    from recipes.search.qconfig import quant_cfg

    sm = random_model("tiny", seed=6)
    remove_weight_norm(sm.model)
    calib = torch.randn(2, SR, generator=torch.Generator().manual_seed(6))
    cfg = {"quant_cfg": quant_cfg(8, 8), "algorithm": {"method": "stablequant", "num_bins": 256, "layer_calibrators": {
        "*conv_layers.[1-9]*": {"calibrator": "mse", "shift": True},
        "*output_dense.input_quantizer": {"calibrator": "percentile", "shift": True}}}}
    mtq.quantize(sm.model, cfg, lambda m: m(calib))
    shifted = [n for n, q in enabled_quantizers(sm.model).items() if q.bias]
    assert len(shifted) >= 3
    path = export_onnx(sm, tmp_path / "shift.onnx")["path"]
    proto = onnx.load(path)
    subs = [n for n in proto.graph.node if n.op_type == "Sub" and "input_quantizer" in n.name]
    assert len(subs) == len(shifted)
    # the add-back is folded into the next layer's bias: every activation DQ feeds its layer directly
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    dqs = [n for n in dq_nodes(proto) if "input_quantizer" in n.name]
    assert dqs and all(set(consumers[n.output[0]]) <= {"Conv", "MatMul"} for n in dqs)
    assert_close_to_torch(sm, path, [(1, 8000)])
    # unfolded form (Add kept) computes the same: the fold changes only float rounding
    unfolded = export_onnx(sm, tmp_path / "unfolded.onnx", metadata={})
    assert unfolded["quantizers"] == len(enabled_quantizers(sm.model))


# ----------------------------------------------------------------------------- FP8 E4M3


def test_quantize_e4m3_like_ort_is_bit_exact_with_onnxruntime():
    """float8 bytes of our weight folding == ORT's QuantizeLinear (saturate) on ties, subnormals,
    saturation and ordinary values, per channel."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    scale = np.array([0.02, 0.5, 1e-3], dtype=np.float32)
    w = rng.normal(0, 60, (3, 256)).astype(np.float32) * scale[:, None]
    w[:, 0] = 1e4 * scale  # saturates to 448
    w[:, 1] = -1e4 * scale
    w[:, 2:10] = np.array([1.0625, 1.1875, 17.0, 19.0, 2 ** -7, 2 ** -9, 3 * 2 ** -10, 0.0])[None] * scale[:, None]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=0)], "q",
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape)],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT8E4M3FN, w.shape)],
        [numpy_helper.from_array(scale, "s"), helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [3], [0.0] * 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"w": w})[0]
    ref_bytes = np.asarray(ref).view(np.uint8) if ref.dtype.itemsize == 1 else ref
    np.testing.assert_array_equal(export.quantize_e4m3_like_ort(w, scale, 0), ref_bytes)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    sm = random_model("tiny", seed=3)
    remove_weight_norm(sm.model)
    calib = torch.randn(2, SR, generator=torch.Generator().manual_seed(3))
    mtq.quantize(sm.model, mtq.FP8_DEFAULT_CFG, lambda m: m(calib))
    info = export_onnx(sm, tmp_path_factory.mktemp("fp8") / "tiny_fp8.onnx")
    return sm, info, onnx.load(info["path"])


def test_fp8_weights_are_float8_and_dequantize_to_modelopt_fake_quant(fp8):
    """Every weight is a FLOAT8E4M3FN initialiser whose DequantizeLinear value equals ModelOpt's
    own E4M3 fake-quantized weight (its scaled_e4m3 kernel, the oracle): the same E4M3 level,
    up to one float32 rounding of the multiply by the scale."""
    sm, info, proto = fp8
    checked = 0
    for values, scale, fake in stored_and_fake_weights(sm, proto):
        assert values.dtype.name == "float8_e4m3fn"
        values = values.astype(np.float32)
        np.testing.assert_allclose(values * scale, fake, rtol=2e-7, atol=0)
        levels = torch.from_numpy((fake / scale).astype(np.float32)).to(torch.float8_e4m3fn).float().numpy()
        np.testing.assert_array_equal(values, levels)
        checked += 1
    assert checked == info["fp8_weights"] > 0 and info["int8_weights"] == 0
    meta = read_metadata(info["path"])
    assert meta["precision"] == "fp8-qdq" and "E4M3" in meta["container_note"]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 19
    f8 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert all(len(i.raw_data) == np.prod(i.dims) for i in f8)  # one byte per weight


def test_fp8_onnx_runtime_matches_torch_fake_quant(fp8):
    sm, info, _ = fp8
    runner = OnnxCTCModel(info["path"])
    for shape in [(1, 8000), (2, 12_345)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        ref, got = torch_logits(sm, x), runner.logits(x.numpy())
        # Torch and ORT sum the float convs in different orders, so an activation sitting on an
        # E4M3 rounding boundary can land one level apart (measured: 1 of 51k elements); at 3
        # mantissa bits that level is 1/8 of the value and the random model spreads it.
        err = np.abs(got - ref)
        assert err.mean() <= 0.01 * np.abs(ref).max(), err.mean()
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98


def test_other_float_formats_are_refused_by_name(tmp_path):
    sm = random_model("tiny", seed=4)
    remove_weight_norm(sm.model)
    mtq.quantize(sm.model, mtq.FP8_DEFAULT_CFG, lambda m: m(torch.randn(1, SR)))
    sm.model.wav2vec2.encoder.layers[0].feed_forward.output_dense.weight_quantizer.num_bits = (5, 2)
    with pytest.raises(ExportError, match=r"output_dense.weight_quantizer: num_bits=\(5, 2\)"):
        export_onnx(sm, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
