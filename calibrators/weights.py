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
