"""AbsHistogram exactness/memory and the ModelOpt calibrator API, including inside mtq.quantize."""

import numpy as np
import pytest
import torch
from oracles import _brute_force, _kept_sorted, _raw_mse

from calibrators import (
    AbsHistogram,
    EntropyCalibrator,
    MaxHistCalibrator,
    MSECalibrator,
    PercentileCalibrator,
    StableQuantCalibrator,
    stablequant_amax,
)

ALL_CALIBRATORS = [
    StableQuantCalibrator,
    MaxHistCalibrator,
    PercentileCalibrator,
    MSECalibrator,
    EntropyCalibrator,
]


# ---------------------------------------------------------------- AbsHistogram
def test_counts_exact_past_float32_saturation():
    """2**24 + 5 equal values land in one bin: float32 counts would stop at 2**24."""
    n = (1 << 24) + 5
    h = AbsHistogram()
    h.add(torch.full((n,), -0.3))
    assert h.total == n
    assert int(h.counts.sum()) == n
    assert int(h.counts.max()) == n
    assert h.counts.dtype == torch.int64
    # The trap avoided: one float32 histc over all of them cannot even represent the count.
    assert float(torch.histc(torch.full((n,), 0.3), bins=4, min=0, max=1).max()) != n


def test_range_doubling_matches_one_shot_numpy_histogram():
    rng = np.random.default_rng(0)
    batches = [
        rng.normal(scale=0.01, size=5000),
        rng.normal(scale=1.0, size=5000),
        rng.laplace(scale=300.0, size=5000),
        rng.normal(scale=0.5, size=5000),
    ]
    batches[0][0] = 0.25  # a power of two as the first max: must not sit on the range edge
    # One tensor spanning several CPU blocks whose later blocks grow the range mid-tensor.
    batches.append(rng.normal(size=100_000) * np.linspace(0.1, 3000.0, 100_000))
    batches = [b.astype(np.float32) for b in batches]
    h = AbsHistogram(256)
    ranges = []
    for b in batches:
        h.add(torch.from_numpy(b))
        ranges.append(h.range)
    assert ranges[0] == 0.5 and ranges[0] < ranges[1] < ranges[2] == ranges[3] < ranges[4]
    # Values sitting exactly on edges of the final bins, and the exact range itself.
    on_edges = (h.edges()[[0, 1, 17, 128, 255, 256]]).astype(np.float32)
    h.add(torch.from_numpy(-on_edges))
    all_abs = np.abs(np.concatenate(batches + [on_edges]).astype(np.float64))
    expected, _ = np.histogram(all_abs, bins=h.edges())
    np.testing.assert_array_equal(h.counts_numpy(), expected)
    assert h.amax == all_abs.max()
    assert h.total == all_abs.size


def test_power_of_two_max_then_growth_matches_numpy():
    """0.25 must not sit on the range edge: after the range grows it belongs to bin 2 of 8."""
    h = AbsHistogram(8)
    h.add(torch.tensor([0.25, -0.1]))
    h.add(torch.tensor([0.9]))
    expected, _ = np.histogram([0.25, 0.1, 0.9], bins=h.edges())
    assert h.range == 1.0
    np.testing.assert_array_equal(h.counts_numpy(), expected)


def test_failed_add_leaves_histogram_unchanged():
    h = AbsHistogram(64)
    h.add(torch.tensor([0.5, 1.5]))
    before = h.to_state()
    bad = torch.cat([torch.linspace(0, 1000, 70_000), torch.tensor([float("nan")])])
    with pytest.raises(ValueError, match="1 non-finite"):
        h.add(bad)  # the first blocks are fine and would grow the range
    after = h.to_state()
    assert torch.equal(before.pop("counts"), after.pop("counts")) and before == after


def test_memory_bounded_over_many_collects():
    h = AbsHistogram(512)
    for k in range(60):
        h.add(torch.randn(100) * 1.5**k)
    assert h.counts.shape == (512,)
    assert h.total == 6000


def test_zeros_then_data_keeps_zeros_in_bin_zero():
    h = AbsHistogram(8)
    h.add(torch.zeros(5))
    h.add(torch.tensor([3.0, -1.0]))
    assert h.range == 4.0
    assert h.counts.tolist() == [5, 0, 1, 0, 0, 0, 1, 0]


def test_half_precision_and_state_roundtrip():
    x = torch.randn(4000)
    h16, h32 = AbsHistogram(), AbsHistogram()
    h16.add(x.to(torch.bfloat16))
    h32.add(x.to(torch.bfloat16).float())
    assert torch.equal(h16.counts, h32.counts)
    state = h16.to_state()
    restored = AbsHistogram.from_state(state)
    assert torch.equal(restored.counts, h16.counts)
    assert (restored.range, restored.amax, restored.total) == (h16.range, h16.amax, h16.total)


def test_num_bins_must_be_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        AbsHistogram(1000)


# ---------------------------------------------------------------- calibrator API
@pytest.mark.parametrize("cls", ALL_CALIBRATORS)
def test_per_channel_rejected(cls):
    with pytest.raises(ValueError, match=r"per-channel \(axis=0\).*not supported; use"):
        cls(axis=0)


@pytest.mark.parametrize("cls", ALL_CALIBRATORS)
def test_compute_before_collect(cls):
    with pytest.raises(RuntimeError, match="compute_amax called before collect"):
        cls().compute_amax()


@pytest.mark.parametrize("cls", ALL_CALIBRATORS)
def test_few_non_empty_bins(cls):
    cal = cls(num_bits=8)
    cal.collect(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    amax = cal.compute_amax()
    assert amax.dtype == torch.float32 and amax.ndim == 0
    assert 0.0 < float(amax) <= 1.0


def test_reset_forgets_everything():
    cal = StableQuantCalibrator()
    cal.collect(torch.randn(100))
    cal.reset()
    with pytest.raises(RuntimeError):
        cal.compute_amax()


def test_num_bits_set_after_construction_is_honoured():
    """ModelOpt writes _num_bits on the calibrator after building it: 6 bits must be used."""
    rng = np.random.default_rng(3)
    x = rng.laplace(size=50_000).astype(np.float32)
    cal = StableQuantCalibrator(num_bits=8, cutoff=0.1)
    cal.collect(torch.from_numpy(x))
    cal._num_bits = 6
    ours = float(cal.compute_amax())
    kept = _kept_sorted(x, 0.1)
    best, best_err = _brute_force(kept, 6)
    width = cal.histogram.edges()[1]
    # Same acceptance as the search tests: within 2 bins or within 2 % of the optimal MSE.
    assert abs(ours - best) <= 2 * width or _raw_mse(kept, ours, 6) <= 1.02 * best_err
    cal._num_bits = 8
    assert float(cal.compute_amax()) != ours
    cal._num_bits = 1
    with pytest.raises(ValueError, match="num_bits"):
        cal.compute_amax()


def test_compute_amax_arguments_and_grid():
    cal = StableQuantCalibrator(num_bits=6, cutoff=0.2, mse=True)
    x = torch.randn(20_000)
    cal.collect(x)
    h = cal.histogram
    args = (h.counts_numpy(), h.edges(), h.amax)
    assert float(cal.compute_amax()) == pytest.approx(stablequant_amax(*args, 0.2, 6))
    assert float(cal.compute_amax(cutoff=0.0, mse=False)) == pytest.approx(h.amax)
    grid = cal.amax_grid([0.0, 0.2, 0.5])
    assert grid.dtype == torch.float32 and grid.shape == (3,)
    assert float(grid[1]) == float(cal.compute_amax())
    with pytest.raises(TypeError):
        cal.compute_amax(method="mse")
    with pytest.raises(ValueError, match="cutoff"):
        StableQuantCalibrator(cutoff=60)


# ---------------------------------------------------------------- inside ModelOpt
def _quantize_linear(num_bits):
    import modelopt.torch.quantization as mtq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    batches = [torch.randn(32, 16) * (1 + 3 * (i == 2)) for i in range(4)]  # one wide batch
    cfg = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {
                "quantizer_name": "*input_quantizer",
                "cfg": {
                    "num_bits": num_bits,
                    "axis": None,
                    # ModelOpt sets the quantizer's _num_bits from this dict without telling a
                    # calibrator built from a tuple, so the bit width goes in the tuple too.
                    "calibrator": (
                        StableQuantCalibrator,
                        (),
                        {"num_bits": num_bits, "cutoff": 0.1},
                    ),
                },
            },
        ],
        "algorithm": "max",
    }

    def forward_loop(m):
        for b in batches:
            m(b)

    model = mtq.quantize(model, cfg, forward_loop)
    data = torch.cat(batches)
    return model[0].input_quantizer, data


@pytest.mark.parametrize("num_bits", [8, 6])
def test_mtq_quantize_uses_our_amax(num_bits):
    quantizer, data = _quantize_linear(num_bits)
    assert isinstance(quantizer._calibrator, StableQuantCalibrator)
    expected = AbsHistogram()
    for chunk in data.split(32):  # same batches, same order
        expected.add(chunk)
    want = stablequant_amax(expected.counts_numpy(), expected.edges(), expected.amax, 0.1, num_bits)
    assert float(quantizer.amax) == pytest.approx(want, rel=1e-6)


def test_tensor_quantizer_num_bits_setter_reaches_calibrator():
    """TensorQuantizer.num_bits = 6 writes _num_bits on our calibrator after construction."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    cfg = QuantizerAttributeConfig(
        num_bits=8, axis=None, calibrator=(StableQuantCalibrator, (), {"cutoff": 0.1})
    )
    tq = TensorQuantizer(cfg)
    tq.num_bits = 6
    x = torch.randn(4096) * torch.linspace(0.1, 4, 4096)
    tq.disable_quant()
    tq.enable_calib()
    tq(x)
    tq.load_calib_amax()
    h = tq._calibrator.histogram
    want = stablequant_amax(h.counts_numpy(), h.edges(), h.amax, 0.1, 6)
    assert float(tq.amax) == pytest.approx(want, rel=1e-6)
    assert want != stablequant_amax(h.counts_numpy(), h.edges(), h.amax, 0.1, 8)


# ---------------------------------------------------------------- packaging
def test_plugin_hook_registers_all_calibrators():
    import pluggy

    import calibrators.plugin

    class Spec:
        @pluggy.HookspecMarker("sq_plugin")
        def sq_register_calibrators(self):
            """Same signature as sq_plugin's hookspec."""

    pm = pluggy.PluginManager("sq_plugin")
    pm.add_hookspecs(Spec)
    pm.register(calibrators.plugin)
    (registered,) = pm.hook.sq_register_calibrators()
    assert registered == {
        "stablequant": StableQuantCalibrator,
        "max": MaxHistCalibrator,
        "percentile": PercentileCalibrator,
        "mse": MSECalibrator,
        "entropy": EntropyCalibrator,
    }


def test_package_does_not_import_sq_plugin_or_recipes():
    """Static check of every module in the package (a subprocess import costs ~10 s here)."""
    import ast
    from pathlib import Path

    import calibrators

    for path in Path(calibrators.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("sq_plugin", "recipes"), (path.name, name)


def test_shifted_range_hand_computed():
    from calibrators import shifted_range

    assert shifted_range(5.0, -0.17) == pytest.approx((2.585, 2.415))
    assert shifted_range(4.0, 1.0) == (2.0, 2.0)  # all positive: the range starts at 0
    with pytest.raises(ValueError, match="upper"):
        shifted_range(float("nan"), -1.0)


@pytest.mark.parametrize("name", ["mse", "entropy", "percentile", "stablequant"])
def test_shift_searches_one_more_bit_then_moves_the_range(name):
    """shift=True: upper = the same search with b+1 bits; amax/bias cover [min(x), upper]."""
    from sq_plugin import calibrator_class

    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.gelu(torch.randn(20000, generator=g) * 2)  # one-sided, min about -0.17
    cls = calibrator_class(name)
    plain7 = cls(num_bits=7)
    plain7.collect(x)
    shifted6 = cls(num_bits=6, shift=True)
    shifted6.collect(x)
    upper = float(plain7.compute_amax())
    lo = float(x.min())
    assert float(shifted6.compute_amax()) == pytest.approx((upper - lo) / 2, rel=1e-6)
    assert float(shifted6.compute_bias()) == pytest.approx((upper + lo) / 2, rel=1e-6)
    assert shifted6.search(shifted6.histogram, lo) == pytest.approx(((upper - lo) / 2, (upper + lo) / 2), rel=1e-6)
    assert cls(num_bits=6).compute_bias() is None


# ---------------------------------------------------------------- device (deferred) path
def _deferred_vs_host(batches, num_bins=256):
    host, deferred = AbsHistogram(num_bins), AbsHistogram(num_bins, defer=True)
    for b in batches:
        host.add(b)
        deferred.add(b)
    assert deferred._pending is not None  # nothing reached the host while adding
    return host, deferred


def test_deferred_path_matches_host_path_and_numpy():
    """The sync-free device path (run on CPU tensors here) bins exactly as the host path."""
    rng = np.random.default_rng(1)
    batches = [np.zeros(7), rng.normal(scale=0.01, size=5000), rng.laplace(scale=300.0, size=5000),
               rng.normal(scale=0.5, size=3000), np.array([1e-30, 2.0**-120, 0.25, 4096.0])]
    batches = [torch.from_numpy(b.astype(np.float32)) for b in batches]
    host, deferred = _deferred_vs_host(batches)
    assert torch.equal(deferred.counts, host.counts) and deferred.range == host.range == 8192.0
    assert deferred.amax == host.amax == 4096.0 and deferred.total == host.total
    expected, _ = np.histogram(np.abs(torch.cat(batches).double().numpy()), bins=deferred.edges())
    np.testing.assert_array_equal(deferred.counts_numpy(), expected)


def test_deferred_path_blocks_and_all_zero_start(monkeypatch):
    import calibrators.histogram as hmod

    monkeypatch.setattr(hmod, "_DEVICE_BLOCK", 1000)  # several steps per tensor, range grows mid-tensor
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.01, 500.0, 10_000)
    host, deferred = _deferred_vs_host([torch.zeros(3), x.double(), torch.tensor([0.5])], num_bins=64)
    assert torch.equal(deferred.counts, host.counts) and (deferred.range, deferred.amax) == (host.range, host.amax)
    only_zeros = AbsHistogram(8, defer=True)
    only_zeros.add(torch.zeros(4))
    assert only_zeros.range == 0.0 and only_zeros.counts.tolist() == [4, 0, 0, 0, 0, 0, 0, 0]


def test_deferred_non_finite_reported_when_read_and_dropped():
    h = AbsHistogram(16, defer=True)
    h.add(torch.tensor([0.5, 1.5]))
    assert h.counts.sum() == 2  # settled
    h.add(torch.tensor([1.0, float("inf")]))
    h.add(torch.tensor([3.0]))
    with pytest.raises(ValueError, match="non-finite"):
        _ = h.counts
    assert int(h.counts.sum()) == h.total == 2 and h.amax == 1.5  # back to the last good read


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_histogram_matches_cpu():
    x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0)) * 40
    host, dev = AbsHistogram(2048), AbsHistogram(2048)
    host.add(x)
    dev.add(x.cuda())
    assert dev._pending is not None
    assert torch.equal(dev.counts, host.counts) and (dev.range, dev.amax) == (host.range, host.amax)
