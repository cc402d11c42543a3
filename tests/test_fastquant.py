"""The recipe's fast fake quant is bit-for-bit ModelOpt's CPU fake quant."""

from __future__ import annotations

import copy

import pytest
import torch

from recipes.fastquant import eligible, fake_quant_int, fast_fake_quant

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

    from recipes.models import random_model, remove_weight_norm
    from recipes.qconfig import calibration_loop, quant_cfg

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

    from recipes.models import random_model, remove_weight_norm
    from recipes.qconfig import calibration_loop, quant_cfg

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
