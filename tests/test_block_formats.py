"""Block-wise INT4 weight formats: the block rule, per-block MSE scales against brute force, the
fast fake quant bit for bit against ModelOpt's own block quantizer, mixed precision with block
formats re-applied by a fresh mtq.quantize, and the packed block INT4 ONNX (codes are ModelOpt's
integers, ONNX Runtime's DequantizeLinear gives its fake-quant weights, the model runs like torch)."""

from __future__ import annotations

import copy
import json
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import sq_plugin  # noqa: F401
from calibrators import per_block_mse_amax, weight_block, weight_blocks
from recipes.evaluation.asr import forward_logits
from recipes.search.engine import DevScorer, Settings
from recipes.search.fastquant import eligible, fake_quant_blocks, fast_fake_quant
from recipes.search.formats import MENU, model_weight_bits
from recipes.search.layerwise import LogitDivergence
from recipes.search.mixed import run_mixed
from recipes.search.qconfig import calibration_loop, config_from_json, load_config
from recipes.speech.models import random_model, remove_weight_norm

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization.config import QuantizerAttributeConfig  # noqa: E402
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
SR = 16000


def test_block_rule_comes_from_the_shape():
    """Hand-worked: the largest of 128/64/32 dividing the input channels with >= 2 blocks per output
    channel; convs with too few input channels per group block their kernel axis; else none."""
    assert weight_block((192, 768)) == (1, 128)
    assert weight_block((192, 192)) == (1, 64)  # 128 does not divide 192
    assert weight_block((192, 128)) == (1, 64)  # one block of 128 per row would be per-channel
    assert weight_block((128, 128, 3)) == (1, 128)  # 3 blocks per output channel (one per tap)
    assert weight_block((192, 12, 64)) == (2, 64)  # grouped positional conv: 12 channels per group
    assert weight_block((128, 1, 10)) is None
    assert weight_block((32, 32)) is None
    assert weight_block((64, 48)) is None


@pytest.mark.parametrize("shape, axis, block", [((6, 64), 1, 32), ((5, 64, 3), 1, 32), ((4, 3, 64), 2, 32)])
def test_per_block_mse_amax_is_the_brute_force_optimum(shape, axis, block):
    """Oracle: every block sliced out of the original weight by index, all 76 clip multipliers
    tried in float64; our amax must reach the smallest error (to float32 rounding)."""
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3
    amax = per_block_mse_amax(w, axis, block, 4)
    blocks, dim = weight_blocks(w, axis, block)
    assert amax.shape == tuple(1 if d == dim else n for d, n in enumerate(blocks.shape))
    ours = amax.reshape(-1).tolist()
    wn = w.double().numpy()
    k = 0
    for index in np.ndindex(*[n // block if d == axis else n for d, n in enumerate(shape)]):
        sl = tuple(slice(i * block, (i + 1) * block) if d == axis else i for d, i in enumerate(index))
        x = wn[sl].reshape(-1)

        def err(a):
            step = a / 7
            return ((np.clip(np.rint(x / step), -7, 7) * step - x) ** 2).sum()

        best = min(err(m * np.abs(x).max()) for m in np.arange(25, 101) / 100)
        assert err(ours[k]) <= best * (1 + 1e-5) + 1e-12, (index, err(ours[k]), best)
        k += 1
    assert k == len(ours)


@pytest.mark.parametrize("shape, block_sizes", [((48, 96), {-1: 32}), ((16, 64, 3), {-2: 32}),
                                                 ((16, 4, 64), {-1: 64})])
def test_block_fake_quant_is_modelopt_bitwise(shape, block_sizes):
    """ModelOpt's own block quantizer is the oracle: its max calibration gives our per-block max,
    and its fake quant equals ours bit for bit, at its amax and at an MSE amax set through the glue."""
    from sq_plugin.quantizers import set_weight_format

    g = torch.Generator().manual_seed(len(shape))
    w = torch.randn(*shape, generator=g) * 2
    w[0].zero_()  # all-zero blocks: amax 0 quantizes to 0
    (key, size), = block_sizes.items()
    axis = key % len(shape)
    q = TensorQuantizer(QuantizerAttributeConfig(num_bits=4, block_sizes={**block_sizes, "type": "static"}))
    q.disable_quant()
    q.enable_calib()
    q(w)
    q.load_calib_amax()
    q.disable_calib()
    q.enable_quant()
    blocks, dim = weight_blocks(w, axis, size)
    assert torch.equal(q.amax.reshape(-1), blocks.abs().amax(dim=dim, keepdim=True).reshape(-1))
    with torch.no_grad():
        assert torch.equal(q(w), fake_quant_blocks(w, blocks.abs().amax(dim=dim, keepdim=True), axis, size, 4,
                                                   q.narrow_range))
        mse = per_block_mse_amax(w, axis, size, 4)
        set_weight_format(q, w, 4, mse, {**block_sizes, "type": "static"})
        ours = fake_quant_blocks(w, mse, axis, size, 4, q.narrow_range)
        assert torch.equal(q(w), ours) and torch.equal(q(w).signbit(), ours.signbit())
        assert eligible(q)


def block_config(int8_ffn: bool = False) -> dict:
    """INT8 everywhere, 4-bit block weights on the CNN (input channels) and the FFNs (W4A16 unless
    ``int8_ffn``), as the mixed menu writes them."""
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    cfg["quant_cfg"] += [
        {"quantizer_name": "*conv_layers.[1-6].conv.weight_quantizer",
         "cfg": {"num_bits": 4, "block_sizes": {-2: 32, "type": "static"}}},
        {"quantizer_name": "*feed_forward.output_dense.weight_quantizer",
         "cfg": {"num_bits": 4, "block_sizes": {-1: 32, "type": "static"}}},
        {"quantizer_name": "*layer_norm*", "enable": False},
    ]
    if not int8_ffn:
        cfg["quant_cfg"].append({"quantizer_name": "*feed_forward.output_dense.input_quantizer", "enable": False})
    return cfg


def block_tiny(seed=0, int8_ffn=False):
    sm = random_model("tiny", seed=seed)
    remove_weight_norm(sm.model)
    calib = torch.randn(2, SR, generator=torch.Generator().manual_seed(seed))
    mtq.quantize(sm.model, block_config(int8_ffn), lambda m: m(calib))
    return sm


def test_fast_fake_quant_takes_block_quantizers_bitwise():
    sm = block_tiny()
    blocked = [q for q in sm.model.modules() if isinstance(q, TensorQuantizer) and q.is_enabled and q.block_sizes]
    assert len(blocked) == 8 and all(eligible(q) for q in blocked)
    x = torch.randn(2, 7000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = sm.model(x).logits
        with fast_fake_quant(sm.model):
            assert all(q.backend for q in blocked)
            fast = sm.model(x).logits
    assert torch.equal(ref, fast)


def test_mixed_block_formats_budget_and_config_round_trip(setup, tmp_path):
    """Menu float / W8A8 / W4A16-blk at 6.2 bits on the tiny model: only the 6 CNN convs (32 input
    channels, g32) and the 2 FFN output projections (64 inputs, g32) take blocks, at 4 + 16/32 = 4.5
    bits; the rest must then be W8A8 (hand-worked: (20480·4.5 + 18752·8) / 39232 = 6.17 ≤ 6.2 and
    any other choice exceeds it). The config, through JSON, re-applied by a fresh mtq.quantize,
    gives the same quantizers, amaxes, dev KL and WER."""
    sm, calib, dev = setup
    result = run_mixed(sm, calib, dev, 6.2, Settings(num_bins=256), progress=False, pareto_budgets=(),
                       menu=("float", "W8A8", "W4A16-blk"))
    blocked = {c.layer for c in result.choices if c.format == "W4A16-blk"}
    assert blocked == {f"wav2vec2.feature_extractor.conv_layers.{i}.conv" for i in range(1, 7)} | \
        {f"wav2vec2.encoder.layers.{i}.feed_forward.output_dense" for i in range(2)}
    assert {c.format for c in result.choices if c.layer not in blocked} == {"W8A8"}
    assert all(c.block == [1, 32] and c.bits == 4.5 for c in result.choices if c.layer in blocked)
    assert result.avg_weight_bits == pytest.approx((20480 * 4.5 + 18752 * 8) / 39232)
    assert result.avg_weight_bits_no_scales == pytest.approx((20480 * 4 + 18752 * 8) / 39232)
    # the same count read back from the quantized model's weight quantizers
    assert model_weight_bits(result.model.model) == pytest.approx(result.avg_weight_bits)
    assert model_weight_bits(result.model.model, scale_bits=0) == pytest.approx(result.avg_weight_bits_no_scales)
    # the layers no block fits are not offered one
    assert "W4A16-blk" not in result.sensitivity["wav2vec2.feature_extractor.conv_layers.0.conv"]

    path = tmp_path / "modelopt_config.json"
    path.write_text(json.dumps(result.config))
    raw = json.loads(path.read_text())
    fresh = remove_weight_norm(copy.deepcopy(sm.model))
    with pytest.raises(Exception, match="block_sizes"):  # why config_from_json exists (ModelOpt 0.47)
        mtq.quantize(fresh, copy.deepcopy(raw), calibration_loop(calib))
    assert load_config(path) == config_from_json(raw)
    model = remove_weight_norm(copy.deepcopy(sm.model))
    mtq.quantize(model, load_config(path), calibration_loop(calib))
    mine = dict(result.model.model.named_modules())
    for name, q in model.named_modules():
        if isinstance(q, TensorQuantizer):
            assert q.is_enabled == mine[name].is_enabled, name
            if q.is_enabled:
                assert q.num_bits == mine[name].num_bits and q.block_sizes == mine[name].block_sizes, name
                assert torch.equal(q.amax, mine[name].amax), name
    with torch.inference_mode():
        ref = [forward_logits(sm.model, b) for b in dev]
        out = [forward_logits(model, b) for b in dev]
        with fast_fake_quant(model):
            fast = [forward_logits(model, b) for b in dev]
    assert all(torch.equal(a, b) for a, b in zip(out, fast))
    assert LogitDivergence(ref)(out) == pytest.approx(result.final_kl, rel=1e-5)
    assert DevScorer(sm, dev).wer(out) == result.final_wer


def test_model_weight_bits_counts_modelopt_int4_blockwise_with_its_padding():
    """auto_quantize's INT4_BLOCKWISE_WEIGHT_ONLY_CFG blocks the last axis by 128, padding it: a
    conv's 3 kernel taps get one fp16 scale (4 + 16/3 bits per weight), a 192-wide row two. Oracle:
    that rule by hand from the shapes (ModelOpt itself counts every such weight as 4 bits)."""
    import math

    sm = random_model("tiny", seed=4)
    remove_weight_norm(sm.model)
    calib = torch.randn(1, SR, generator=torch.Generator().manual_seed(0))
    mtq.quantize(sm.model, mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, lambda m: m(calib))
    sizes, honest, grid = [], [], []
    for _name, m in sm.model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)):
            w = m.weight
            on = m.weight_quantizer.is_enabled
            blocks = w.numel() // w.shape[-1] * math.ceil(w.shape[-1] / 128)
            sizes.append(w.numel())
            honest.append(4 + 16 * blocks / w.numel() if on else 16)
            grid.append(4 if on else 16)
    assert any(b > 9 for b in honest)  # the k=3 convs
    assert model_weight_bits(sm.model) == pytest.approx(sum(n * b for n, b in zip(sizes, honest)) / sum(sizes))
    assert model_weight_bits(sm.model, 0) == pytest.approx(sum(n * b for n, b in zip(sizes, grid)) / sum(sizes))


# ----------------------------------------------------------------------------- ONNX export


@pytest.fixture(scope="module")
def blk(tmp_path_factory):
    from recipes.export.onnx import export_onnx

    sm = block_tiny(int8_ffn=True)
    info = export_onnx(sm, tmp_path_factory.mktemp("blk") / "tiny_blk.onnx")
    return sm, info, onnx.load(info["path"])


def _block_dqs(proto):
    return [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
            and any(a.name == "block_size" for a in n.attribute)]


def test_block_weights_packed_int4_dequantize_to_modelopt_fake_quant(blk):
    """The packed INT4 codes are exactly ModelOpt's integers (round(fake · 7/amax)); ONNX Runtime's
    blocked DequantizeLinear alone gives its fake-quant weights up to 2 float32 ulp (torch divides
    the integer by 7/amax, DQ multiplies it by amax/7)."""
    import onnxruntime as ort

    from recipes.export.int4 import int4_values

    sm, info, proto = blk
    assert info["int4_weights"] == 8 and max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert not any(o.domain == "sq_plugin" for o in proto.opset_import)
    inits = {i.name: i for i in proto.graph.initializer}
    modules = dict(sm.model.named_modules())
    dqs = _block_dqs(proto)
    assert len(dqs) == 8
    for n in dqs:
        name = n.name.strip("/").rsplit("/", 1)[0].replace("/", ".").removeprefix("model.")
        layer = modules[name.removesuffix(".weight_quantizer")]
        q = layer.weight_quantizer
        attrs = {a.name: a.i for a in n.attribute}
        init, scale = inits[n.input[0]], inits[n.input[1]]
        assert init.data_type == TensorProto.INT4 and attrs["block_size"] == 32
        with torch.no_grad():
            fake = q(layer.weight).numpy()
        # per-element amax, from ModelOpt's per-block amax (oracle layout: the weight's own blocks)
        (key, size), = [(k, v) for k, v in q.block_sizes.items() if k != "type"]
        blocks, dim = weight_blocks(torch.from_numpy(fake), key % fake.ndim, size)
        amax = torch.broadcast_to(q.amax.reshape([1 if d == dim else m for d, m in enumerate(blocks.shape)]),
                                  blocks.shape).reshape(fake.shape).numpy()
        codes = np.rint(fake * (np.float32(7) / amax)).astype(np.int8)
        ints = int4_values(init)
        transposed = ints.ndim == 2  # nn.Linear stored as W^T [in, out], blocks on axis 0
        assert np.array_equal(ints.T if transposed else ints, codes), name
        assert attrs["axis"] == (0 if transposed else 1)
        g = helper.make_graph(
            [helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=attrs["axis"], block_size=32)], "dq", [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(init.dims))],
            [init, numpy_helper.from_array(numpy_helper.to_array(scale), "s")])
        g.initializer[0].name = "w"
        dq = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
                                  .SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        np.testing.assert_array_max_ulp(dq.T if transposed else dq, fake, maxulp=2)


def test_block_onnx_runs_in_ort_like_torch(blk):
    """With MatMulNBits at float accuracy (ORT's default, level 4, also quantizes its float input
    to int8 per block) ONNX Runtime's logits are torch's within one activation step; the convs with
    block weights stay ORT's DQ -> Conv (not lowered to the int8 GEMM, which needs one scale per
    output channel), the per-channel positional conv still is."""
    import onnxruntime as ort
    from oracles import activation_step, torch_logits

    from recipes.export.onnx_runner import OnnxCTCModel, lower_qdq_conv_for_ort

    sm, info, proto = blk
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    runner, default = OnnxCTCModel(info["path"], session_options=so), OnnxCTCModel(info["path"])
    for shape in [(2, 12_000), (1, 20_000)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        ref = torch_logits(sm, x)
        err = np.abs(runner.logits(x.numpy()) - ref)
        assert err.max() <= activation_step(sm) and err.mean() <= activation_step(sm) / 10
        assert (default.logits(x.numpy()).argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    lowered = onnx.load(info["path"])
    assert lower_qdq_conv_for_ort(lowered) == 1  # the per-channel positional conv (conv 0: depth 10)
    producers = {o: n for n in lowered.graph.node for o in n.output}
    kept = [c for c in lowered.graph.node if c.op_type == "Conv" and producers[c.input[1]].op_type == "DequantizeLinear"
            and any(a.name == "block_size" for a in producers[c.input[1]].attribute)]
    assert len(kept) == 6  # the six block-quantized CNN convs stay DQ -> Conv


@pytest.mark.parametrize("change, message", [
    ("activation", "only weights"),
    ("bits", "num_bits 4"),
    ("pad", "divide"),
])
def test_block_export_refuses_what_it_cannot_write(tmp_path, change, message):
    from recipes.export.onnx import ExportError, export_onnx

    sm = random_model("tiny", seed=1)
    remove_weight_norm(sm.model)
    cfg = block_config()
    if change == "activation":
        cfg["quant_cfg"].append({"quantizer_name": "*feed_forward.output_dense.input_quantizer",
                                 "cfg": {"num_bits": 8, "block_sizes": {-1: 32, "type": "static"}}})
    elif change == "bits":
        cfg["quant_cfg"].append({"quantizer_name": "*feed_forward.output_dense.weight_quantizer",
                                 "cfg": {"num_bits": 8, "block_sizes": {-1: 32, "type": "static"}}})
    else:  # blocks of 32 along the kernel taps (3): ModelOpt pads them
        cfg["quant_cfg"].append({"quantizer_name": "*conv_layers.1.conv.weight_quantizer",
                                 "cfg": {"num_bits": 4, "block_sizes": {-1: 32, "type": "static"}}})
    calib = torch.randn(2, SR, generator=torch.Generator().manual_seed(0))
    mtq.quantize(sm.model, cfg, lambda m: m(calib))
    with pytest.raises(ExportError, match=re.escape(message)) as info:
        export_onnx(sm, tmp_path / "bad.onnx")
    assert "quantizer" in str(info.value) and "block quantization" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_menu_block_formats():
    assert MENU["W4A16-blk"].blocks and MENU["W4A16-blk"].abits is None and MENU["W4A8-blk"].abits == 8
