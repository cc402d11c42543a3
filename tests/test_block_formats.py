"""Block-wise INT4 weights: the block rule, per-block MSE scales against brute force, the fast fake
quant bit for bit against ModelOpt's own block quantizer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import sq_plugin  # noqa: F401
from calibrators import per_block_mse_amax, weight_block, weight_blocks
from recipes.fastquant import eligible, fake_quant_blocks

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization.config import QuantizerAttributeConfig  # noqa: E402
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


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
    from sq_plugin.modelopt_glue import set_weight_format

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
