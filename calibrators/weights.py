"""Per-channel weight scales: MSE-optimal amax for each output channel (torch, any device)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import search


def per_channel_mse_amax(weight, amax, num_bits: int, unsigned: bool = False,
                         multipliers: Sequence[float] | None = None):
    """Per-channel weight amax minimising the squared fake-quant error of each channel.

    ``amax`` is the per-channel max |w| in the shape ModelOpt keeps it (broadcastable to
    ``weight``, size 1 on the reduced dims). Candidates are ``m * amax`` for ``m`` in
    ``multipliers`` (default 0.25, 0.26, ..., 1.00: above the max only coarsens the grid);
    values saturate at ±(2^(b-1)-1) steps. Ties go to the larger multiplier (the max itself
    when clipping buys nothing). Works on torch tensors, on their device.
    """
    search._check_bits(num_bits)
    w = torch.as_tensor(weight).detach().float()
    a = torch.as_tensor(amax, device=w.device).detach().float()
    if a.dim() != w.dim() or any(s not in (1, n) for s, n in zip(a.shape, w.shape)):
        raise ValueError(f"amax shape {tuple(a.shape)} does not broadcast per channel to {tuple(w.shape)}")
    reduce = tuple(d for d in range(w.dim()) if a.shape[d] == 1 and w.shape[d] != 1)
    qmax = search._qmax(int(num_bits), bool(unsigned))
    qmin = 0 if unsigned else -qmax
    mults = [round(0.25 + 0.01 * i, 2) for i in range(76)] if multipliers is None else list(multipliers)
    best_err = best = None
    for m in sorted(mults, reverse=True):
        cand = a * m
        step = torch.where(cand > 0, cand / qmax, torch.ones_like(cand))
        err = ((torch.clamp(torch.round(w / step), qmin, qmax) * step - w) ** 2).sum(dim=reduce, keepdim=True)
        if best is None:
            best_err, best = err, cand.clone()
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, cand, best)
    return torch.where(a > 0, best, a)


BLOCK_SIZES = (128, 64, 32)  # weights per scale tried for block formats, largest first


def weight_block(shape: Sequence[int]) -> tuple[int, int] | None:
    """(axis, block size) of a block format for a Linear [out, in] / Conv [out, in/groups, *kernel] weight.

    Blocks run along a reduction dim: the input channels, or (convs whose input channels per group
    take no block) the last kernel axis; the block is the largest of ``BLOCK_SIZES`` dividing that
    axis that leaves at least two blocks per output channel (one block per channel is just
    per-channel quantization at more bits). None where nothing fits. Shape-only, so no model is tuned.
    """
    shape = tuple(int(n) for n in shape)
    per_out = 1
    for n in shape[1:]:
        per_out *= n
    for axis in (1,) if len(shape) == 2 else (1, len(shape) - 1):
        for block in BLOCK_SIZES:
            if shape[axis] % block == 0 and per_out // block >= 2:
                return axis, block
    return None


def weight_blocks(weight, axis: int, block: int):
    """(``weight`` split into blocks of ``block`` along ``axis``, the block dim) in ModelOpt 0.47's
    static block layout: blocks of the last axis flattened to [-1, block], of another axis
    [..., n/block, block, ...]. A per-block amax is the keepdim reduction over the block dim, so
    amaxes computed here and by ModelOpt's calibrators line up element for element."""
    w = torch.as_tensor(weight)
    axis %= w.dim()
    if w.shape[axis] % block:
        raise ValueError(f"axis {axis} of a {tuple(w.shape)} weight is not a multiple of the block size {block}")
    if axis == w.dim() - 1:
        return w.reshape(-1, block), 1
    return w.reshape(*w.shape[:axis], w.shape[axis] // block, block, *w.shape[axis + 1:]), axis + 1


def per_block_mse_amax(weight, axis: int, block: int, num_bits: int, unsigned: bool = False):
    """MSE-optimal amax per block (:func:`per_channel_mse_amax` on the blocks), block layout of
    :func:`weight_blocks` (keepdim, size 1 on the block dim)."""
    blocks, dim = weight_blocks(torch.as_tensor(weight).detach().float(), axis, block)
    return per_channel_mse_amax(blocks, blocks.abs().amax(dim=dim, keepdim=True), num_bits, unsigned)
