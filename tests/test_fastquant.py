"""The recipe's fast fake quant is bit-for-bit ModelOpt's CPU fake quant."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from recipes.search.fastquant import eligible, fake_quant_int, fast_fake_quant

tensor_quant = pytest.importorskip("modelopt.torch.quantization.tensor_quant")


@pytest.mark.parametrize("bits", [2, 4, 6, 8, 16])
@pytest.mark.parametrize("narrow", [True, False])
def test_bitwise_equal_to_modelopt(bits, narrow):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 64, 257, generator=g) * 5
    x[0, 0, :8] = torch.tensor([0.5, 1.5, -0.5, -2.5, 1e6, -1e6, 0.0, -0.0])  # ties, saturation, zeros
    for amax in (torch.tensor(3.7), torch.tensor(1.0), torch.tensor(0.0), torch.rand(3, 1, 1, generator=g) + 0.1,
                 torch.tensor([0.0, 2.0, 1e-9]).view(3, 1, 1)):
        ours = fake_quant_int(x, amax, bits, False, narrow)
        ref = tensor_quant._tensor_quant(x, amax, bits, False, narrow)
        assert torch.equal(ours, ref) and torch.equal(ours.signbit(), ref.signbit())
    xu = x.abs()
    assert torch.equal(fake_quant_int(xu, torch.tensor(4.0), bits, True, narrow),
                       tensor_quant._tensor_quant(xu, torch.tensor(4.0), bits, True, narrow))
    with pytest.raises(TypeError):
        fake_quant_int(x, torch.tensor(4.0), bits, True, narrow)


def test_model_outputs_identical_and_backend_restored():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.nn import TensorQuantizer

    from recipes.search.qconfig import calibration_loop, quant_cfg
    from recipes.speech.models import random_model, remove_weight_norm

    sm = random_model("tiny", seed=2)
    model = remove_weight_norm(copy.deepcopy(sm.model))
    x = torch.randn(2, 6000, generator=torch.Generator().manual_seed(0))

    class B:  # the smallest batch calibration_loop needs
        input_values, attention_mask = x, None

    mtq.quantize(model, {"quant_cfg": quant_cfg(6, 6), "algorithm": "max"}, calibration_loop([B]))
    with torch.no_grad():
        ref = model(x).logits
        with fast_fake_quant(model):
            switched = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.backend]
            assert len(switched) > 20
            fast = model(x).logits
    assert torch.equal(ref, fast)
    assert all(q.backend is None for q in model.modules() if isinstance(q, TensorQuantizer))


def test_shifted_quantizers_stay_bitwise_equal():
    """A static shift (one-sided range) goes through the fast path with ModelOpt's arithmetic."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.nn import TensorQuantizer

    import sq_plugin  # noqa: F401  (registers "stablequant": the test also passes when run alone)
    from recipes.search.qconfig import calibration_loop, quant_cfg
    from recipes.speech.models import random_model, remove_weight_norm

    sm = random_model("tiny", seed=3)
    model = remove_weight_norm(copy.deepcopy(sm.model))
    x = torch.randn(2, 6000, generator=torch.Generator().manual_seed(1))

    class B:
        input_values, attention_mask = x, None

    config = {"quant_cfg": quant_cfg(6, 6), "algorithm": {
        "method": "stablequant", "layer_calibrators": {"*conv_layers.[1-9]*": {"calibrator": "mse", "shift": True}}}}
    mtq.quantize(model, config, calibration_loop([B]))
    shifted = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.bias]
    assert shifted and all(eligible(q) for q in shifted)
    with torch.no_grad():
        ref = model(x).logits
        with fast_fake_quant(model):
            fast = model(x).logits
    assert torch.equal(ref, fast)


def _cuda_kernel_reference(x: np.ndarray, amax: np.ndarray, num_bits: int, unsigned: bool, narrow: bool):
    """ModelOpt's ``fake_tensor_quant_device`` (tensor_quant_gpu.cu) element by element, float32."""
    bound = np.float32((1 << (num_bits - 1 + int(unsigned))) - 1)
    min_bound = np.float32(-(bound + (not narrow)))
    x, amax = np.broadcast_arrays(x.astype(np.float32), amax.astype(np.float32))
    out = np.empty_like(x)
    for i, (v, a) in enumerate(zip(x.reshape(-1), amax.reshape(-1))):
        if a < np.float32(1.0 / (1 << 24)):
            out.reshape(-1)[i] = np.float32(0.0)
            continue
        scale = np.float32(bound / a)
        q = np.rint(np.float32(v * scale))
        q = bound if q > bound else q
        q = min_bound if q < min_bound else q
        out.reshape(-1)[i] = np.float32(q / scale)
    return out


@pytest.mark.parametrize("bits,narrow", [(8, True), (6, False), (4, True)])
def test_cuda_rules_match_the_cuda_kernel_formula(bits, narrow):
    """``kernel="cuda"`` (what runs on a GPU) follows the CUDA extension's arithmetic bit for bit,
    including amax exactly 2**-24 (quantized, unlike on the CPU) and zero amax giving +0."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 40, generator=g) * 4
    x[0, 0, :6] = torch.tensor([0.5, 1.5, -2.5, -1e6, -0.0, -3e-8])
    amaxes = [torch.tensor(3.7), torch.tensor([0.0, 2.0 ** -24, 1.5]).view(3, 1, 1),
              torch.rand(1, 5, 1, generator=g) + 0.1]
    for amax in amaxes:
        ours = fake_quant_int(x, amax, bits, False, narrow, kernel="cuda")
        ref = torch.from_numpy(_cuda_kernel_reference(x.numpy(), amax.numpy(), bits, False, narrow))
        assert torch.equal(ours, ref) and torch.equal(ours.signbit(), ref.signbit())
    tiny = torch.tensor(2.0 ** -24)  # the two kernels differ only here and in the sign of zeros
    assert not torch.equal(fake_quant_int(x, tiny, bits, False, narrow, kernel="cuda"),
                           fake_quant_int(x, tiny, bits, False, narrow, kernel="cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("bits", [4, 8])
def test_bitwise_equal_to_modelopt_on_cuda(bits):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 64, 257, generator=g) * 5).cuda()
    for amax in (torch.tensor(3.7), torch.rand(3, 1, 1, generator=g) + 0.1, torch.tensor(0.0)):
        amax = amax.cuda()
        ref = tensor_quant.fake_tensor_quant(x, amax, None, bits, False, True)
        assert torch.equal(fake_quant_int(x, amax, bits, False, True), ref)
