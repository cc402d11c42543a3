"""sq_plugin glue: the "stablequant" ModelOpt algorithm, bit-width sync, the pluggy registry.

Oracles: the pure search functions on a histogram built independently with NumPy from the
exact tensors the quantizers saw (captured with forward pre-hooks), and ModelOpt's own outputs.
"""

from __future__ import annotations

import copy
import importlib
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

import sq_plugin
from calibrators import StableQuantCalibrator, stablequant_amax
from recipes.speech.models import random_model, remove_weight_norm

mtq = pytest.importorskip("modelopt.torch.quantization")
mto = pytest.importorskip("modelopt.torch.opt")
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

CONV0 = "wav2vec2.feature_extractor.conv_layers.0.conv.input_quantizer"


def _quant_cfg(wbits=8, abits=8, list_style=True):
    if list_style:
        return [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": wbits, "axis": 0}},
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": abits, "axis": None}},
            {"quantizer_name": "*layer_norm*", "enable": False},
        ]
    return {
        "default": {"enable": False},
        "*weight_quantizer": {"num_bits": wbits, "axis": 0},
        "*input_quantizer": {"num_bits": abits, "axis": None},
        "*layer_norm*": {"enable": False},
    }


@pytest.fixture(scope="module")
def tiny():
    sm = random_model("tiny", seed=0)
    remove_weight_norm(sm.model)
    g = torch.Generator().manual_seed(1)
    audio = [torch.randn(2, 4000, generator=g) for _ in range(2)]
    audio[1][0, 100] = 40.0  # one outlier sample, as SFM CNN inputs have
    return sm.model, audio


def _loop(audio):
    def forward_loop(model):
        with torch.no_grad():
            for x in audio:
                model(x)

    return forward_loop


def _captured_inputs(model, audio) -> dict[str, np.ndarray]:
    """|input| of every Conv1d/Linear in the float model, concatenated over the calibration data."""
    seen: dict[str, list] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear)):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach().abs().flatten())))
    _loop(audio)(model)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).double().numpy() for k, v in seen.items()}


def _bin_width(values: np.ndarray, num_bins: int) -> float:
    return 2.0 ** np.ceil(np.log2(values.max())) / num_bins


def _oracle_amax(values: np.ndarray, cutoff: float, bits: int, num_bins: int) -> float:
    """NumPy histogram on the same power-of-two range rule, then the pure search.

    float32 binning inside the calibrator may put a value sitting on an edge into the next
    bin, so callers compare within one bin width.
    """
    top = values.max()
    counts, edges = np.histogram(values, bins=num_bins, range=(0, _bin_width(values, num_bins) * num_bins))
    return stablequant_amax(counts.astype(np.int64), edges, float(top), cutoff, bits, mse=True)


def test_import_registers_once_and_reimport_is_harmless():
    from modelopt.torch.quantization.mode import CalibrateModeRegistry

    assert "stablequant_calibrate" in CalibrateModeRegistry
    importlib.reload(sq_plugin.algorithm)
    importlib.reload(sq_plugin)
    sq_plugin.algorithm.register()
    assert "stablequant_calibrate" in CalibrateModeRegistry


@pytest.mark.parametrize("list_style", [True, False])
def test_stablequant_algorithm_by_name(tiny, list_style):
    model0, audio = tiny
    model = copy.deepcopy(model0)
    cfg = {"quant_cfg": _quant_cfg(list_style=list_style),
           "algorithm": {"method": "stablequant", "cutoff": 0.2, "clip_layers": ["*conv_layers.0.*"],
                         "num_bins": 256}}
    raw = _captured_inputs(model0, audio)
    with torch.no_grad():
        ref = model0(audio[0]).logits
    mtq.quantize(model, cfg, _loop(audio))

    acts = {n: m for n, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and n.endswith("input_quantizer") and m.is_enabled}
    assert len(acts) == len(raw) > 10
    for name, q in acts.items():
        amax = float(q.amax)
        assert np.isfinite(amax) and amax > 0, name
        assert isinstance(q._calibrator, StableQuantCalibrator)
        cutoff = 0.2 if name == CONV0 else 0.0
        assert q._calibrator._cutoff == cutoff
        values = raw[name.rsplit(".", 1)[0]]
        expected = _oracle_amax(values, cutoff, 8, 256)
        assert abs(amax - expected) <= _bin_width(values, 256) * 1.001, name
    # the clipped layer really clipped the outlier; weights keep per-channel max
    assert float(acts[CONV0].amax) < 0.5 * raw[CONV0.rsplit(".", 1)[0]].max()
    w = model.wav2vec2.encoder.layers[0].attention.q_proj
    assert torch.allclose(w.weight_quantizer.amax.flatten(), w.weight.abs().amax(dim=1))
    # close to fp32: a random-weight tiny model amplifies rounding noise, so the yardstick is
    # ModelOpt's own W8A8 max calibration on the same quantizers
    baseline = mtq.quantize(copy.deepcopy(model0), {"quant_cfg": _quant_cfg(list_style=list_style),
                                                     "algorithm": "max"}, _loop(audio))
    with torch.no_grad():
        err = ((model(audio[0]).logits - ref).norm() / ref.norm()).item()
        err_max = ((baseline(audio[0]).logits - ref).norm() / ref.norm()).item()
    assert err <= err_max and err < 0.2, (err, err_max)


def test_calibrate_by_name_and_unknown_pattern(tiny):
    model0, audio = tiny
    model = mtq.quantize(copy.deepcopy(model0), {"quant_cfg": _quant_cfg(), "algorithm": None})
    mtq.calibrate(model, "stablequant", _loop(audio))
    assert all(float(q.amax) > 0 for n, q in model.named_modules()
               if isinstance(q, TensorQuantizer) and n.endswith("input_quantizer") and q.is_enabled)
    bad = {"quant_cfg": _quant_cfg(), "algorithm": {"method": "stablequant", "clip_layers": ["*no_such_layer*"]}}
    with pytest.raises(ValueError, match="no_such_layer"):
        mtq.quantize(copy.deepcopy(model0), bad, _loop(audio))


def test_quantizer_bits_reach_constructor_tuple_calibrator(tiny):
    """W6A6 through a ``calibrator`` tuple: the calibrator must search 6-bit scales."""
    model0, audio = tiny
    model = copy.deepcopy(model0)
    cfg = _quant_cfg(6, 6)
    cfg[2]["cfg"]["calibrator"] = sq_plugin.calibrator("stablequant", num_bins=256)
    raw = _captured_inputs(model0, audio)
    mtq.quantize(model, {"quant_cfg": cfg, "algorithm": "max"}, _loop(audio))
    q = dict(model.named_modules())[CONV0]
    assert q._calibrator._num_bits == 6
    values = raw[CONV0.rsplit(".", 1)[0]]
    six, eight = _oracle_amax(values, 0.0, 6, 256), _oracle_amax(values, 0.0, 8, 256)
    assert abs(six - eight) > 2 * _bin_width(values, 256)  # the data tells 6 from 8 bits apart
    assert abs(float(q.amax) - six) <= _bin_width(values, 256) * 1.001


def test_save_restore_round_trip(tiny, tmp_path):
    model0, audio = tiny
    model = copy.deepcopy(model0)
    mtq.quantize(model, {"quant_cfg": _quant_cfg(), "algorithm": {"method": "stablequant", "cutoff": 0.1,
                 "clip_layers": ["*conv_layers.0.*"], "num_bins": 256}}, _loop(audio))
    mto.save(model, tmp_path / "q.pth")
    restored = mto.restore(copy.deepcopy(model0), tmp_path / "q.pth")
    a = {n: m.amax for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.amax is not None}
    b = {n: m.amax for n, m in restored.named_modules() if isinstance(m, TensorQuantizer) and m.amax is not None}
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(audio[0]).logits, restored(audio[0]).logits)


def test_registry_names_and_unknown_name():
    names = sq_plugin.calibrator_names()
    assert {"stablequant", "max", "percentile", "mse", "entropy"} <= set(names)
    with pytest.raises(ValueError, match="known calibrators: .*stablequant"):
        sq_plugin.calibrator("no-such-calibrator")
    cls, args, kwargs = sq_plugin.calibrator("stablequant", cutoff=0.2)
    assert cls is StableQuantCalibrator and args == () and kwargs == {"cutoff": 0.2}


class HalfMaxCalibrator(StableQuantCalibrator):
    """A third-party calibrator: half of MAX (easy to predict, unlike any built-in)."""

    def compute_amax(self, cutoff=None, mse=None):
        return super().compute_amax(cutoff=0.0, mse=False) / 2


class _ThirdParty:
    @sq_plugin.hookimpl
    def sq_register_calibrators(self):
        return {"half-max": HalfMaxCalibrator}


def test_programmatic_plugin_selected_in_modelopt_config(tiny):
    model0, audio = tiny
    plugin = _ThirdParty()
    sq_plugin.register_plugin(plugin, name="third-party-test")
    try:
        assert "half-max" in sq_plugin.calibrator_names()
        cfg = _quant_cfg()
        cfg[2]["cfg"]["calibrator"] = sq_plugin.calibrator("half-max", num_bins=128)
        raw = _captured_inputs(model0, audio)
        model = mtq.quantize(copy.deepcopy(model0), {"quant_cfg": cfg, "algorithm": "max"}, _loop(audio))
        q = dict(model.named_modules())[CONV0]
        assert float(q.amax) == pytest.approx(raw[CONV0.rsplit(".", 1)[0]].max() / 2, rel=1e-6)
    finally:
        sq_plugin.unregister_plugin(plugin)
    assert "half-max" not in sq_plugin.calibrator_names()


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch):
    """A package installed with an ``sq_plugin`` entry point is found by name."""
    pkg = tmp_path / "sq_demo_ext.py"
    pkg.write_text(textwrap.dedent("""
        import pluggy
        from calibrators import MaxHistCalibrator
        hookimpl = pluggy.HookimplMarker("sq_plugin")

        class DoubleMax(MaxHistCalibrator):
            pass

        @hookimpl
        def sq_register_calibrators():
            return {"ext-double-max": DoubleMax}
    """))
    dist = tmp_path / "sq_demo_ext-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sq-demo-ext\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sq_plugin]\next = sq_demo_ext\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sq_plugin.registry, "_manager", None)
    try:
        assert "ext-double-max" in sq_plugin.calibrator_names()
        assert sq_plugin.calibrator_class("ext-double-max").__module__ == "sq_demo_ext"
    finally:
        sys.modules.pop("sq_demo_ext", None)
    monkeypatch.setattr(sq_plugin.registry, "_manager", None)


def test_duplicate_name_from_two_plugins_is_an_error():
    class Clash:
        @sq_plugin.hookimpl
        def sq_register_calibrators(self):
            return {"stablequant": HalfMaxCalibrator}

    plugin = Clash()
    sq_plugin.register_plugin(plugin, name="clash")
    try:
        with pytest.raises(ValueError, match="'stablequant' is registered by both"):
            sq_plugin.calibrator_names()
    finally:
        sq_plugin.unregister_plugin(plugin)


def test_combines_with_smoothquant(tiny):
    """``[smoothquant, stablequant]``: StableQuant calibrates the smoothed activations."""
    model0, audio = tiny
    raw = _captured_inputs(model0, audio)
    algo = [{"method": "smoothquant"}, {"method": "stablequant", "num_bins": 256}]
    model = mtq.quantize(copy.deepcopy(model0), {"quant_cfg": _quant_cfg(), "algorithm": algo}, _loop(audio))
    layer = "wav2vec2.encoder.layers.0.attention.q_proj"
    q = dict(model.named_modules())[layer + ".input_quantizer"]
    assert q.pre_quant_scale is not None and isinstance(q._calibrator, StableQuantCalibrator)
    # the smoothed input the quantizer sees: raw input (flattened [tokens, channels]) * scale
    seen = []
    h = dict(model0.named_modules())[layer].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    _loop(audio)(model0)
    h.remove()
    smoothed = torch.cat([(x * q.pre_quant_scale).abs().flatten() for x in seen]).double().numpy()
    assert not np.allclose(smoothed.max(), raw[layer].max())
    # the histogram it searched is that of the smoothed input (its exact max says so)
    assert q._calibrator.histogram.amax == pytest.approx(smoothed.max(), rel=1e-5)
    assert q._calibrator.histogram.total == smoothed.size


def test_layer_calibrators_and_mse_weights_in_config(tiny):
    """Per-quantizer calibrator entries give the named method's amax on the same data (oracle:
    the pure search on a NumPy histogram); weights get each channel's brute-force MSE clip."""
    from calibrators import percentile_amax

    model0, audio = tiny
    model = copy.deepcopy(model0)
    raw = _captured_inputs(model0, audio)
    conv1 = CONV0.replace("conv_layers.0", "conv_layers.1")
    cfg = {"quant_cfg": _quant_cfg(wbits=4),
           "algorithm": {"method": "stablequant", "num_bins": 256, "weight_calibrator": "mse",
                         "layer_calibrators": {"*conv_layers.*": {"calibrator": "max"},
                                               conv1: {"calibrator": "percentile", "percentile": 99.0}}}}
    mtq.quantize(model, cfg, _loop(audio))
    q = dict(model.named_modules())
    values = raw[CONV0.rsplit(".", 1)[0]]
    assert float(q[CONV0].amax) == pytest.approx(values.max(), rel=1e-6)  # max, not StableQuant
    v1 = raw[conv1.rsplit(".", 1)[0]]
    counts, edges = np.histogram(v1, bins=256, range=(0, _bin_width(v1, 256) * 256))
    expected = percentile_amax(counts.astype(np.int64), edges, float(v1.max()), 99.0)
    assert abs(float(q[conv1].amax) - expected) <= _bin_width(v1, 256) * 1.001  # last pattern wins
    # weights: brute force over the same multipliers, channel by channel
    lin = model.wav2vec2.encoder.layers[0].attention.q_proj
    w = lin.weight.detach().double()
    for c in range(0, w.shape[0], 7):
        top = w[c].abs().max()
        errs = []
        for k in range(76):
            a = top * round(0.25 + 0.01 * k, 2)
            step = a / 7
            errs.append((float((((w[c] / step).round().clamp(-7, 7) * step - w[c]) ** 2).sum()), -k, float(a)))
        assert float(lin.weight_quantizer.amax.flatten()[c]) == pytest.approx(min(errs)[2], rel=1e-5), c
    with pytest.raises(ValueError, match="match no enabled activation quantizer"):
        mtq.quantize(copy.deepcopy(model0), {**cfg, "algorithm": {
            "method": "stablequant", "layer_calibrators": {"*nothing*": {"calibrator": "max"}}}}, _loop(audio))
    with pytest.raises(ValueError, match="unknown calibrator"):
        mtq.quantize(copy.deepcopy(model0), {**cfg, "algorithm": {
            "method": "stablequant", "layer_calibrators": {"*": {"calibrator": "nope"}}}}, _loop(audio))


def test_calibrator_chosen_in_quant_cfg_is_kept(tiny):
    from calibrators import PercentileCalibrator

    model0, audio = tiny
    conv2 = "*feature_extractor.conv_layers.2.conv.input_quantizer"
    cfg = {"quant_cfg": _quant_cfg() + [{"quantizer_name": conv2, "cfg": {
               "num_bits": 8, "axis": None, "calibrator": sq_plugin.calibrator("percentile", percentile=99.0)}}],
           "algorithm": {"method": "stablequant", "num_bins": 256}}
    model = mtq.quantize(copy.deepcopy(model0), cfg, _loop(audio))
    q = dict(model.named_modules())
    name = CONV0.replace("conv_layers.0", "conv_layers.2")
    assert isinstance(q[name]._calibrator, PercentileCalibrator)
    assert isinstance(q[CONV0]._calibrator, StableQuantCalibrator)
    raw = _captured_inputs(model0, audio)[name.rsplit(".", 1)[0]]
    assert float(q[name].amax) < raw.max()  # the 99th percentile, not the max


def test_shift_entry_quantizes_a_one_sided_range_and_survives_save_restore(tmp_path):
    """{"shift": true}: the quantizer rounds (x - bias) on a symmetric grid over [min(x), upper]."""
    import modelopt.torch.opt as mto

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(64, 8) * 3
    config = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 6, "axis": None}}],
              "algorithm": {"method": "stablequant",
                            "layer_calibrators": {"*2.input_quantizer": {"calibrator": "max", "shift": True}}}}
    qmodel = mtq.quantize(copy.deepcopy(model), config, lambda m: m(x))
    q = qmodel[2].input_quantizer
    with torch.no_grad():
        h = nn.functional.gelu(model[0](x))
        lo, hi = float(h.min()), float(h.abs().max())  # "max" with one more bit is still max |x|
        assert float(q.amax) == pytest.approx((hi - lo) / 2, rel=1e-6)
        assert float(q.bias_value) == pytest.approx((hi + lo) / 2, rel=1e-6)
        step = float(q.amax) / 31
        expected = torch.clamp(torch.round((h - q.bias_value) / step), -31, 31) * step + q.bias_value
        assert torch.allclose(q(h), expected, atol=1e-6)
        assert float(q(h).min()) == pytest.approx(lo, abs=step)  # the grid starts at min(x), not -max
        y = qmodel(x)
    mto.save(qmodel, tmp_path / "m.pth")
    restored = mto.restore(copy.deepcopy(model), tmp_path / "m.pth")
    with torch.no_grad():
        assert torch.equal(restored(x), y)


def test_fp8_quantizers_keep_max_calibration(tiny):
    """FP8 E4M3 quantizers in a "stablequant" config get ModelOpt's own max calibration (oracle:
    the same config under ModelOpt's "max" algorithm) while the integer ones get StableQuant's
    search; naming an FP8 quantizer in layer_calibrators is an error naming it."""
    model0, audio = tiny
    fp8 = {"num_bits": (4, 3), "axis": None}
    quant_cfg = _quant_cfg() + [{"quantizer_name": f"*encoder.layers.0.*{kind}_quantizer", "cfg": fp8}
                                for kind in ("input", "weight")]
    ours, ref = copy.deepcopy(model0), copy.deepcopy(model0)
    mtq.quantize(ours, {"quant_cfg": quant_cfg, "algorithm": {"method": "stablequant", "weight_calibrator": "mse"}},
                 _loop(audio))
    mtq.quantize(ref, {"quant_cfg": quant_cfg, "algorithm": "max"}, _loop(audio))
    q_ours, q_ref = dict(ours.named_modules()), dict(ref.named_modules())
    fp8_names = [n for n, q in q_ours.items() if n.endswith(("input_quantizer", "weight_quantizer"))
                 and ".layers.0." in n and q.is_enabled]
    assert len(fp8_names) >= 12  # q/k/v/out + 2 FFN, weights and inputs
    for n in fp8_names:
        assert tuple(q_ours[n].num_bits) == (4, 3)
        assert q_ours[n].amax is not None and torch.equal(q_ours[n].amax, q_ref[n].amax), \
            (n, q_ours[n].amax, q_ref[n].amax)
    assert float(q_ours[CONV0].amax) < float(q_ref[CONV0].amax)  # integer: searched, below max
    with pytest.raises(ValueError, match=r"layers.0.attention.q_proj.input_quantizer: layer_calibrators names"):
        mtq.quantize(copy.deepcopy(model0), {"quant_cfg": quant_cfg, "algorithm": {
            "method": "stablequant", "layer_calibrators": {"*layers.0.attention.q_proj*": {"calibrator": "mse"}}}},
            _loop(audio))
