"""Exact, memory-bounded histogram of |x| for calibration.

Why not ModelOpt's ``HistogramCalibrator``: it accumulates in float32 (``torch.histc``
saturates at 2**24 per bin), grows its bin count without bound, and re-bins on
non-aligned edges.  Here:

* bins are uniform on ``[0, range]`` and ``range`` is always a power of two, so the bin
  width is a power of two, the index ``|x| * num_bins / range`` is computed without
  rounding error and every edge is exactly representable (binning agrees with
  ``numpy.histogram`` on ``edges()`` bit for bit);
* counts are int64 from ``torch.bincount`` (never float ``histc``, whose float32 counts stop
  at 2**24; bincount is also ~3x faster than histc on CPU);
* when a value exceeds ``range`` the range doubles and adjacent bin pairs merge, which is
  exact because old edges are a subset of the new ones; memory stays ``num_bins`` int64.

Cost of the power-of-two range: the data's max lies in the upper half of the range, so
at least ``num_bins / 2`` bins cover the data.

All-zero data: ``amax`` is 0 and ``range`` stays 0 (every count in bin 0) until a non-zero
value arrives; the search functions return 0.0 for such a histogram.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["AbsHistogram"]

# Ranges outside [2**-_SAFE_EXP, 2**_SAFE_EXP] are binned in float64 so that
# the power-of-two scale num_bins / range stays inside float32's exponent range.
_SAFE_EXP = 100


def _pow2_ceil(value: float) -> float:
    """Smallest power of two >= value (> 0)."""
    mantissa, exponent = math.frexp(value)
    return value if mantissa == 0.5 else math.ldexp(1.0, exponent)


class AbsHistogram:
    """Histogram of |x| with exact int64 counts on a power-of-two range.

    State is plain tensors/numbers (``counts``, ``range``, ``amax``, ``total``) so it can be
    saved with :meth:`to_state` without pickling objects.
    """

    def __init__(self, num_bins: int = 2048):
        if not isinstance(num_bins, int) or num_bins < 2 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins!r}")
        self.num_bins = num_bins
        self.counts = torch.zeros(num_bins, dtype=torch.int64)
        self.range = 0.0
        self.amax = 0.0
        self.total = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate |x| (any shape, any floating dtype, any device)."""
        if x.numel() == 0:
            raise ValueError(f"cannot add an empty tensor (numel=0, shape={tuple(x.shape)})")
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # fp16/bf16/int: float32 holds them exactly
        absx = x.abs().reshape(-1)
        batch_amax = absx.max().item()
        if not math.isfinite(batch_amax):
            self._raise_non_finite(x)
        if self.counts.device != absx.device and self.total == 0:
            self.counts = self.counts.to(absx.device)
        self._grow_to(batch_amax)
        self.amax = max(self.amax, batch_amax)
        self.total += absx.numel()
        if self.range == 0.0:  # all zeros so far: everything is in bin 0
            self.counts[0] += absx.numel()
            return
        if not 2.0**-_SAFE_EXP <= self.range <= 2.0**_SAFE_EXP:
            absx = absx.double()  # keep the power-of-two scale inside the exponent range
        # |x| * (num_bins / range) is exact (power-of-two scale); int32 truncation is floor.
        # Values equal to the range land in the extra bin num_bins and fold into the last.
        index = absx.mul_(self.num_bins / self.range).to(torch.int32)
        hist = torch.bincount(index, minlength=self.num_bins + 1).to(self.counts.device)
        hist[self.num_bins - 1] += hist[self.num_bins]
        self.counts += hist[: self.num_bins]

    def _raise_non_finite(self, x: torch.Tensor) -> None:
        bad = ~torch.isfinite(x)
        offending = x[bad].reshape(-1)[0].item()
        raise ValueError(
            f"tensor contains {int(bad.sum())} non-finite value(s) (NaN/Inf) out of "
            f"{x.numel()}, e.g. {offending}; calibration data must be finite"
        )

    def _grow_to(self, value: float) -> None:
        """Double the range (merging bin pairs) until it covers ``value``."""
        if value <= self.range:
            return
        if self.range == 0.0:  # first non-zero data: zeros already sit in bin 0
            self.range = _pow2_ceil(value)
            return
        half = self.num_bins // 2
        while self.range < value:
            merged = self.counts.view(half, 2).sum(dim=1)
            self.counts = torch.cat([merged, torch.zeros_like(merged)])
            self.range *= 2.0

    def edges(self) -> np.ndarray:
        """Bin edges, float64, exact (``range`` is a power of two)."""
        return np.arange(self.num_bins + 1, dtype=np.float64) * (self.range / self.num_bins)

    def centers(self) -> np.ndarray:
        """Bin centres, float64."""
        e = self.edges()
        return (e[:-1] + e[1:]) / 2

    def counts_numpy(self) -> np.ndarray:
        """Counts as an int64 numpy array (copy on CPU)."""
        return self.counts.cpu().numpy().copy()

    def to_state(self) -> dict:
        """Plain tensors/numbers, safe for ``torch.save``/``torch.load(weights_only=True)``."""
        return {
            "num_bins": self.num_bins,
            "counts": self.counts.cpu().clone(),
            "range": self.range,
            "amax": self.amax,
            "total": self.total,
        }

    @classmethod
    def from_state(cls, state: dict) -> AbsHistogram:
        """Inverse of :meth:`to_state`."""
        hist = cls(int(state["num_bins"]))
        counts = torch.as_tensor(state["counts"], dtype=torch.int64)
        if counts.shape != (hist.num_bins,):
            raise ValueError(f"counts shape {tuple(counts.shape)} != ({hist.num_bins},)")
        hist.counts = counts.clone()
        hist.range = float(state["range"])
        hist.amax = float(state["amax"])
        hist.total = int(state["total"])
        return hist

    def __repr__(self) -> str:
        return (
            f"AbsHistogram(num_bins={self.num_bins}, range={self.range}, "
            f"amax={self.amax}, total={self.total})"
        )
