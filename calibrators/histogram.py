"""Exact, memory-bounded histogram of |x| for calibration.

Why not ModelOpt's ``HistogramCalibrator``: it accumulates in float32 (``torch.histc``
saturates at 2**24 per bin), grows its bin count without bound, and re-bins on
non-aligned edges.  Here:

* bins are uniform on ``[0, range]`` and ``range`` is the smallest power of two strictly
  above every |x| seen, so the bin width is a power of two, the index
  ``|x| * num_bins / range`` is computed without rounding error, every edge is exactly
  representable and every bin is half-open ``[k w, (k+1) w)`` (binning agrees with
  ``numpy.histogram`` on ``edges()`` bit for bit, before and after the range grows);
* counts are int64 from ``torch.bincount`` (never float ``histc``, whose float32 counts stop
  at 2**24; bincount is also ~3x faster than histc on CPU);
* when a value reaches ``range`` the range doubles and adjacent bin pairs merge, which is
  exact because old edges are a subset of the new ones; memory stays ``num_bins`` int64.

Cost of the power-of-two range: the data's max lies in the upper half of the range, so
at least ``num_bins / 2`` bins cover the data (the first batch's max sets the range).

All-zero data: ``amax`` is 0 and ``range`` stays 0 (every count in bin 0) until a non-zero
value arrives; the search functions return 0.0 for such a histogram.

On an accelerator (CUDA) the histogram is accumulated on the device without a host
synchronisation per batch (``defer``): the range exponent, amax and int64 counts stay device
tensors, range growth is the same exact pair merge done with an index shift, and bin indices
are counted with ``torch.histc`` over at most 2**24 integer-valued floats per call (each bin
count is then exact in float32). The host sees ``counts``/``range``/``amax`` once, when they
are first read. A NaN/Inf added there is reported at that read, and every tensor added since
the last read is dropped (all or nothing, as on the CPU).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["AbsHistogram"]

# Ranges outside [2**-_SAFE_EXP, 2**_SAFE_EXP] are binned in float64 so that
# the power-of-two scale num_bins / range stays inside float32's exponent range.
_SAFE_EXP = 100
# CPU data is binned in blocks of this many elements: each op then runs inline on one
# thread (torch's parallel grain size is 32768) over cache-resident scratch buffers, which
# is ~4x cheaper than whole-tensor passes and never waits for a busy second core.
_CPU_BLOCK = 1 << 15
# Deferred (device) path: elements per step; also keeps every histc bin count <= 2**24, which
# float32 holds exactly, and bounds the temporaries to two buffers of this size.
_DEVICE_BLOCK = 1 << 24
_NO_RANGE = -(1 << 20)  # range exponent while only zeros were seen


def _pow2_above(value: float) -> float:
    """Smallest power of two strictly greater than value (> 0)."""
    return math.ldexp(1.0, math.frexp(value)[1])


def _grown(counts: torch.Tensor, rng: float, value: float) -> tuple[torch.Tensor, float]:
    """(counts, range) after doubling the range, merging bin pairs, until value < range."""
    if value < rng or value == 0.0:
        return counts, rng
    if rng == 0.0:  # first non-zero data: zeros seen so far already sit in bin 0
        return counts, _pow2_above(value)
    half = counts.numel() // 2
    while rng <= value:
        merged = counts.view(half, 2).sum(dim=1)
        counts = torch.cat([merged, torch.zeros_like(merged)])
        rng *= 2.0
    return counts, rng


def _pow2(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**exponent in ``dtype``, exact: built from the exponent bits (normal range only)."""
    if dtype == torch.float64:
        return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


class AbsHistogram:
    """Histogram of |x| with exact int64 counts on a power-of-two range.

    State is plain tensors/numbers (``counts``, ``range``, ``amax``, ``total``) so it can be
    saved with :meth:`to_state` without pickling objects.
    """

    def __init__(self, num_bins: int = 2048, defer: bool | None = None):
        if not isinstance(num_bins, int) or num_bins < 2 or num_bins & (num_bins - 1):
            raise ValueError(f"num_bins must be a power of two >= 2, got {num_bins!r}")
        self.num_bins = num_bins
        self._counts = torch.zeros(num_bins, dtype=torch.int64)
        self._range = 0.0
        self._amax = 0.0
        self.total = 0
        self.device = torch.device("cpu")  # where the data came from (amax tensors go there)
        # None: defer on accelerators only; True also on the CPU (tests of the device path)
        self.defer = defer
        self._pending: tuple | None = None  # device (counts, range exponent, amax) not yet read

    # counts / range / amax: host values, settled from the device state on first read
    @property
    def counts(self) -> torch.Tensor:
        self._settle()
        return self._counts

    @counts.setter
    def counts(self, value: torch.Tensor) -> None:
        self._settle()
        self._counts = value

    @property
    def range(self) -> float:
        self._settle()
        return self._range

    @range.setter
    def range(self, value: float) -> None:
        self._settle()
        self._range = value

    @property
    def amax(self) -> float:
        self._settle()
        return self._amax

    @amax.setter
    def amax(self, value: float) -> None:
        self._settle()
        self._amax = value

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate |x| (any shape, any floating dtype, any device).

        All or nothing: on a NaN/Inf the histogram is left as it was.
        """
        if x.numel() == 0:
            raise ValueError(f"cannot add an empty tensor (numel=0, shape={tuple(x.shape)})")
        flat = x.detach().reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # fp16/bf16/int: float32 holds them exactly
        self.device = flat.device
        if self.defer or (self.defer is None and flat.device.type != "cpu"):
            self._add_deferred(flat)
            return
        self._settle()
        if self.total == 0:
            self.counts = self.counts.to(flat.device)
        block = _CPU_BLOCK if flat.device.type == "cpu" else flat.numel()
        abs_buf = torch.empty(min(block, flat.numel()), dtype=flat.dtype, device=flat.device)
        idx_buf = torch.empty(abs_buf.shape, dtype=torch.int32, device=flat.device)
        counts, rng, amax = self.counts.clone(), self.range, self.amax
        for start in range(0, flat.numel(), block):
            part = flat[start : start + block]
            absx = torch.abs(part, out=abs_buf[: part.numel()])
            batch_amax = absx.max().item()
            if not math.isfinite(batch_amax):
                self._raise_non_finite(x)
            amax = max(amax, batch_amax)
            counts, rng = _grown(counts, rng, batch_amax)
            if rng == 0.0:  # all zeros so far: everything is in bin 0
                counts[0] += part.numel()
                continue
            if not 2.0**-_SAFE_EXP <= rng <= 2.0**_SAFE_EXP:
                absx = absx.double()  # keep the power-of-two scale inside the exponent range
            # |x| * (num_bins / range) is exact and < num_bins; int32 truncation is floor.
            index = idx_buf[: part.numel()]
            index.copy_(absx.mul_(self.num_bins / rng))
            counts += torch.bincount(index, minlength=self.num_bins).to(counts.device)
        self.counts, self.range, self.amax = counts, rng, amax
        self.total += flat.numel()

    def _add_deferred(self, flat: torch.Tensor) -> None:
        """The device path of :meth:`add`: same bins, no host synchronisation."""
        dev, nb = flat.device, self.num_bins
        if self._pending is None or self._pending[0].device != dev:
            self._settle()
            exp = math.frexp(self._range)[1] - 1 if self._range > 0 else _NO_RANGE
            # torch.full / zeros fill on the device: no host-to-device copy (which would wait)
            counts = (self._counts.to(dev) if self.total else torch.zeros(nb, dtype=torch.int64, device=dev))
            self._pending = (counts, torch.full((), exp, dtype=torch.int64, device=dev),
                             torch.full((), self._amax, dtype=torch.float64, device=dev))
        counts, exp, amax = self._pending
        bins = torch.arange(nb, device=dev)
        log2_bins = nb.bit_length() - 1
        limit = 250 if flat.dtype == torch.float32 else 2000  # halves of the scale stay normal
        for start in range(0, flat.numel(), _DEVICE_BLOCK):
            absx = flat[start : start + _DEVICE_BLOCK].abs()
            block_max = absx.max().double()
            amax = torch.maximum(amax, block_max)  # NaN/Inf propagate: reported when settled
            block_exp = torch.where(block_max > 0, torch.frexp(block_max).exponent.long(), _NO_RANGE)
            new_exp = torch.maximum(exp, block_exp)
            # the range doubled (new_exp - exp) times: bin k of the old range is bin k >> shift
            shift = (new_exp - exp).clamp(0, 62)
            counts = torch.zeros_like(counts).index_add_(0, bins >> shift, counts)
            exp = new_exp
            # |x| * num_bins / range as two exact power-of-two multiplies, floored: the bin index
            scale_exp = (log2_bins - exp).clamp(-limit, limit)
            half = torch.div(scale_exp, 2, rounding_mode="floor")
            index = torch.floor_(absx.mul_(_pow2(half, absx.dtype)).mul_(_pow2(scale_exp - half, absx.dtype)))
            counts += torch.histc(index.float(), bins=nb, min=0, max=nb).long()
        self._pending = (counts, exp, amax)
        self.total += flat.numel()

    def _settle(self) -> None:
        """Bring the device state to the host (the one synchronisation of the device path)."""
        if self._pending is None:
            return
        counts, exp, amax = self._pending
        self._pending = None
        amax_value, exp_value = float(amax), int(exp)
        if not math.isfinite(amax_value):
            self.total = int(self._counts.sum())  # what was added before the device tensors
            raise ValueError(f"a tensor added on {counts.device} contains non-finite values (NaN/Inf, "
                             f"max |x| = {amax_value}); calibration data must be finite")
        self._counts = counts.cpu()
        self._range = 0.0 if exp_value == _NO_RANGE else math.ldexp(1.0, exp_value)
        self._amax = amax_value

    def _raise_non_finite(self, x: torch.Tensor) -> None:
        bad = ~torch.isfinite(x)
        offending = x[bad].reshape(-1)[0].item()
        raise ValueError(
            f"tensor contains {int(bad.sum())} non-finite value(s) (NaN/Inf) out of "
            f"{x.numel()}, e.g. {offending}; calibration data must be finite"
        )

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
