"""Amax search on a histogram of |x|: max, percentile, MSE, StableQuant (Algorithm 2), entropy.

Pure NumPy functions of ``(counts, edges, amax)``: ``counts`` int64 per bin, ``edges``
float64 (len(counts) + 1), ``amax`` the exact max |x| seen.  No torch, no ModelOpt, so
they can be tested against brute-force oracles and reused on saved histograms.

Conventions shared by every function:

* an all-zero histogram (``amax == 0`` or ``edges[-1] == 0``) gives 0.0;
* a histogram with no counts at all raises ValueError;
* ``cutoff`` is a percentage of the total count removed from the top (0.2 keeps the
  lowest 99.8 %), valid in [0, 50]; ``num_bits`` is valid in [2, 16];
* ties between candidates resolve to the smaller amax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "clip_index",
    "shifted_range",
    "entropy_amax",
    "max_amax",
    "mse_amax",
    "percentile_amax",
    "stablequant_amax",
    "stablequant_amax_grid",
]

# Rows of the candidate x bin error matrix computed at once (bounds memory to ~4 MB/chunk).
_ROW_CHUNK = 256
# Mass of the uniform distribution mixed into Q: only keeps KL finite where the outlier fold
# puts P mass on an empty bin; small enough not to move the minimum (matches ModelOpt).
_KL_SMOOTHING = 1e-9


def _check_hist(counts, edges) -> tuple[np.ndarray, np.ndarray, int]:
    counts = np.asarray(counts)
    edges = np.asarray(edges, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
    if edges.shape != (counts.size + 1,):
        raise ValueError(
            f"edges must have len(counts) + 1 = {counts.size + 1} entries, got {edges.shape}"
        )
    if counts.min() < 0:
        raise ValueError(f"counts must be non-negative, found {counts.min()}")
    counts = counts.astype(np.int64, copy=False)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("histogram is empty (total count 0): collect data before searching")
    return counts, edges, total


def _is_all_zero(edges: np.ndarray, amax: float) -> bool:
    return amax == 0.0 or edges[-1] == 0.0


def _check_bits(num_bits) -> None:
    is_int = isinstance(num_bits, (int, np.integer)) and not isinstance(num_bits, bool)
    if not is_int or not 2 <= num_bits <= 16:
        raise ValueError(f"num_bits must be an integer in [2, 16], got {num_bits!r}")


def _check_cutoff(cutoff) -> float:
    cutoff = float(cutoff)
    if not 0.0 <= cutoff <= 50.0:  # also rejects NaN
        raise ValueError(f"cutoff must be a percentage in [0, 50], got {cutoff!r}")
    return cutoff


def _qmax(num_bits: int, unsigned: bool) -> int:
    """Largest integer level: 2**(b-1)-1 signed (symmetric), 2**b-1 unsigned."""
    return (1 << num_bits) - 1 if unsigned else (1 << (num_bits - 1)) - 1


def clip_index(counts, cutoff: float) -> int:
    """Index of the last kept bin once the top ``cutoff`` % of the count is removed.

    ``floor(total * cutoff / 100)`` samples are dropped from the top (a product within
    1e-9 relative of an integer counts as that integer, so 0.57 % of 10000 drops 57);
    the last kept bin is the first whose cumulative count reaches the kept count.
    cutoff 0 gives the last non-zero bin.
    """
    cutoff = _check_cutoff(cutoff)
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("histogram is empty (total count 0): collect data before searching")
    exact = total * cutoff / 100.0
    nearest = round(exact)
    n_drop = nearest if abs(exact - nearest) <= 1e-9 * max(1.0, exact) else math.floor(exact)
    return int(np.searchsorted(np.cumsum(counts), total - n_drop, side="left"))


def max_amax(counts, edges, amax: float) -> float:
    """MAX calibration: the exact max |x| (the histogram is only validated)."""
    _check_hist(counts, edges)
    return float(amax)


def _clipped_value(edges: np.ndarray, amax: float, k: int) -> float:
    """Largest kept value: upper edge of the last kept bin, never above the true max."""
    return float(min(edges[k + 1], amax))


def percentile_amax(counts, edges, amax: float, percentile: float) -> float:
    """Percentile calibration, i.e. StableQuant with cutoff ``100 - percentile`` and no MSE."""
    if not 50.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [50, 100], got {percentile!r}")
    counts, edges, _ = _check_hist(counts, edges)
    if _is_all_zero(edges, amax):
        return 0.0
    return _clipped_value(edges, amax, clip_index(counts, 100.0 - float(percentile)))


def _mse_best_candidates(
    counts: np.ndarray, centers: np.ndarray, last_kept: np.ndarray, qmax: int
) -> np.ndarray:
    """For each k in ``last_kept``: argmin over candidates i <= k of
    sum_{j <= k} counts_j * (c_j - Q_i(c_j))**2, Q_i the symmetric fake-quant with amax c_i.

    The candidate x bin error matrix is built once (in row chunks); prefix sums over bins
    are taken only at the needed columns (``np.add.reduceat`` segments, then a cumsum over
    segments), so every cut-off costs one argmin over a column.
    """
    needed = np.unique(last_kept)
    size = int(needed[-1]) + 1
    c = centers[:size]
    weights = counts[:size].astype(np.float64)
    seg_starts = np.concatenate(([0], needed[:-1] + 1))
    sums = np.empty((size, needed.size))
    for r0 in range(0, size, _ROW_CHUNK):
        cand = c[r0 : r0 + _ROW_CHUNK, None]
        step = cand / qmax
        err = c[None, :] / step
        np.rint(err, out=err)
        np.minimum(err, qmax, out=err)
        err *= step
        np.subtract(c[None, :], err, out=err)
        np.square(err, out=err)
        err *= weights
        seg = np.add.reduceat(err, seg_starts, axis=1)
        sums[r0 : r0 + _ROW_CHUNK] = np.cumsum(seg, axis=1)
    best = {int(k): int(np.argmin(sums[: k + 1, col])) for col, k in enumerate(needed)}
    return np.array([best[int(k)] for k in last_kept], dtype=np.int64)


def stablequant_amax_grid(
    counts,
    edges,
    amax: float,
    cutoffs: Sequence[float],
    num_bits: int,
    unsigned: bool = False,
    mse: bool = True,
) -> np.ndarray:
    """StableQuant amax (Algorithm 2) for every cut-off in ``cutoffs`` from one histogram.

    mse=False: the largest kept value (upper edge of the last kept bin, capped at amax).
    mse=True: the bin centre c_i (i <= last kept bin k) minimising the count-weighted
    squared fake-quant error over the kept bins (outliers above k are dropped, not
    saturated).  Returns float64 array, one amax per cut-off.
    """
    counts, edges, _ = _check_hist(counts, edges)
    _check_bits(num_bits)
    cutoffs = np.atleast_1d(np.asarray(cutoffs, dtype=np.float64))
    last_kept = np.array([clip_index(counts, c) for c in cutoffs], dtype=np.int64)
    if _is_all_zero(edges, amax):
        return np.zeros(cutoffs.size)
    if not mse:
        return np.array([_clipped_value(edges, amax, k) for k in last_kept])
    centers = (edges[:-1] + edges[1:]) / 2
    best = _mse_best_candidates(counts, centers, last_kept, _qmax(int(num_bits), bool(unsigned)))
    return centers[best]


def stablequant_amax(
    counts,
    edges,
    amax: float,
    cutoff: float,
    num_bits: int,
    unsigned: bool = False,
    mse: bool = True,
) -> float:
    """StableQuant amax for one cut-off (same core as :func:`stablequant_amax_grid`)."""
    return float(stablequant_amax_grid(counts, edges, amax, [cutoff], num_bits, unsigned, mse)[0])


def mse_amax(counts, edges, amax: float, num_bits: int, unsigned: bool = False) -> float:
    """Plain MSE calibration: StableQuant without clipping."""
    return stablequant_amax(counts, edges, amax, 0.0, num_bits, unsigned, mse=True)


def _smoothed_kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) with Q mixed with a little uniform mass so it is never 0 where P > 0."""
    p = p / p.sum()
    q_total = q.sum()
    q = (1.0 - _KL_SMOOTHING) * (q / q_total if q_total > 0 else q) + _KL_SMOOTHING / q.size
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def entropy_amax(counts, edges, amax: float, num_bits: int, unsigned: bool = False) -> float:
    """TensorRT-style KL calibration.

    For each threshold bin i (from the number of levels L = 2**(b-1), 2**b unsigned, up to
    the last bin): P = counts[:i] with everything above folded into bin i-1; Q = counts[:i]
    merged into L equal groups of bins, each group's mass spread evenly over its non-empty
    bins.  Returns the threshold edge with the smallest smoothed KL(P || Q), capped at
    amax.  Fewer bins than levels: nothing to search, returns amax (MAX).
    As in TensorRT/ModelOpt, bin 0 takes bin 1's count first, so a spike of exact zeros
    (ReLU outputs, padding) does not dominate the divergence.
    """
    counts, edges, total = _check_hist(counts, edges)
    _check_bits(num_bits)
    if _is_all_zero(edges, amax):
        return 0.0
    levels = 1 << (int(num_bits) - 1 + int(bool(unsigned)))
    if counts.size <= levels:
        return float(amax)
    weights = counts.astype(np.float64)
    weights[0] = weights[1]
    nonzero = weights > 0
    total = weights.sum()
    cum_mass = np.concatenate(([0.0], np.cumsum(weights)))
    cum_nonzero = np.concatenate(([0], np.cumsum(nonzero)))
    level_ids = np.arange(levels + 1)
    best_i, best_kl = levels, math.inf
    for i in range(levels, counts.size + 1):
        group_edges = -((-level_ids * i) // levels)  # ceil(m * i / L): first bin of group m
        group_mass = cum_mass[group_edges[1:]] - cum_mass[group_edges[:-1]]
        group_nonzero = cum_nonzero[group_edges[1:]] - cum_nonzero[group_edges[:-1]]
        per_bin = group_mass / np.maximum(group_nonzero, 1)
        q = np.where(nonzero[:i], np.repeat(per_bin, np.diff(group_edges)), 0.0)
        p = weights[:i].copy()
        p[-1] += total - cum_mass[i]
        kl = _smoothed_kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(min(edges[best_i], amax))



def shifted_range(upper: float, signed_min: float) -> tuple[float, float]:
    """(amax, bias) of a symmetric quantizer moved to cover ``[min(signed_min, 0), upper]``.

    A one-sided tensor (GELU or ReLU outputs: nothing below about -0.17) wastes the negative half
    of a symmetric grid. Quantizing ``x - bias`` with ``amax`` puts every level inside
    ``[lo, upper]``, which halves the step for the same ``upper``: the resolution of one more bit.
    The shift folds exactly into the next layer's bias (W (q + bias) = W q + W bias), so the
    quantizer itself stays symmetric with zero point 0, as TensorRT deploys it.
    """
    lo = min(float(signed_min), 0.0)
    upper = float(upper)
    if not (math.isfinite(lo) and math.isfinite(upper)) or upper < 0:
        raise ValueError(f"shifted_range needs finite values and upper >= 0, got upper={upper} min={signed_min}")
    return (upper - lo) / 2, (upper + lo) / 2
