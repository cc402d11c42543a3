"""ModelOpt calibrators that collect one exact |x| histogram and search it.

All of them share :class:`HistogramCalibratorBase` (collection, reset, validation); a
subclass only says which search function in :mod:`calibrators.search` turns the
histogram into an amax.  ``num_bits``/``unsigned`` are read at compute time because
ModelOpt's ``TensorQuantizer`` overwrites ``_num_bits``/``_unsigned`` on the calibrator
after constructing it (its ``num_bits`` property setter).  Its config path does not: with
``"calibrator": (StableQuantCalibrator, (), {...})`` put ``num_bits``/``unsigned`` in the
kwargs as well, or the calibrator keeps its defaults.

``shift=True`` (any of them): the range searched is one-sided, ``[min(x), upper]``, with ``upper``
the calibrator's own search run with one more bit (a shifted b-bit grid has the step of a
symmetric (b+1)-bit one); :meth:`HistogramCalibratorBase.compute_bias` gives the shift that
``sq_plugin``'s "stablequant" algorithm loads into the quantizer (see
:func:`calibrators.search.shifted_range`).

Unlike ModelOpt's calibrators (which return None), ``compute_amax`` before any ``collect``
raises, so a quantizer that calibration data never reached fails loudly instead of being
left without an amax.
"""

from __future__ import annotations

import torch
from modelopt.torch.quantization.calib.calibrator import _Calibrator

from . import search
from .histogram import AbsHistogram

__all__ = [
    "EntropyCalibrator",
    "HistogramCalibratorBase",
    "MaxHistCalibrator",
    "MSECalibrator",
    "PercentileCalibrator",
    "StableQuantCalibrator",
]


class HistogramCalibratorBase(_Calibrator):
    """Per-tensor calibrator owning one :class:`AbsHistogram`; subclasses implement ``_search``."""

    def __init__(self, num_bits=8, axis=None, unsigned=False, num_bins=2048, shift=False):
        if axis is not None:
            raise ValueError(
                f"per-channel (axis={axis!r}) histogram calibration is not supported; use "
                "ModelOpt's MaxCalibrator (calibrator='max') for per-channel quantizers"
            )
        super().__init__(num_bits, axis, unsigned)
        self._num_bins = num_bins
        self._hist = AbsHistogram(num_bins)
        self._shift = bool(shift)
        self._min: torch.Tensor | None = None  # signed min seen, kept on the data's device

    @property
    def shift(self) -> bool:
        """Whether this calibrator sets a one-sided (shifted) range."""
        return self._shift

    @property
    def signed_min(self) -> float:
        """The smallest value collected (not |x|): where a shifted range starts."""
        if self._min is None:
            raise RuntimeError(f"{type(self).__name__}: no data collected")
        return float(self._min)

    @property
    def _search_bits(self) -> int:
        """Bits the search assumes: one more for a shifted range (same step over half the span)."""
        return self._num_bits + 1 if self._shift else self._num_bits

    @property
    def histogram(self) -> AbsHistogram:
        """The collected histogram (read-only use)."""
        return self._hist

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        """Add |x| to the histogram (ModelOpt's meta-device shape tracing tensors are ignored)."""
        if x.device.type == "meta":
            return
        self._hist.add(x)
        low = x.detach().amin().float()
        self._min = low if self._min is None else torch.minimum(self._min, low)

    def reset(self) -> None:
        """Drop everything collected."""
        self._hist = AbsHistogram(self._num_bins)
        self._min = None

    def _checked_inputs(self):
        """(counts, edges, amax) after checking data exists and the bit width is valid."""
        if self._hist.total == 0:
            raise RuntimeError(
                f"{type(self).__name__}: compute_amax called before collect (no tensor reached "
                "this quantizer: mtq.quantize without a forward_loop, or a layer the loop never runs)"
            )
        search._check_bits(self._num_bits)
        return self._hist.counts_numpy(), self._hist.edges(), self._hist.amax

    def compute_amax(self) -> torch.Tensor:
        """Amax as a float32 scalar tensor on the device the data was collected on."""
        return self._as_tensor(self._range(*self._checked_inputs(), self._min_if_shifted())[0])

    def compute_bias(self) -> torch.Tensor | None:
        """The shift to subtract before quantizing (``shift=True``), else None."""
        if not self._shift:
            return None
        return self._as_tensor(self._range(*self._checked_inputs(), self.signed_min)[1])

    def _min_if_shifted(self) -> float | None:
        return self.signed_min if self._shift else None

    def _range(self, counts, edges, amax, signed_min: float | None) -> tuple[float, float | None]:
        """(amax, shift) this calibrator picks on a histogram; shift None for a symmetric range."""
        upper = float(self._search(counts, edges, amax))
        if not self._shift:
            return upper, None
        if signed_min is None:
            raise ValueError(f"{type(self).__name__}(shift=True) needs the data's signed_min")
        return search.shifted_range(upper, signed_min)

    def _as_tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self._hist.device)

    def _search(self, counts, edges, amax) -> float:
        raise NotImplementedError

    def search(self, histogram: AbsHistogram, signed_min: float | None = None) -> float | tuple[float, float]:
        """This calibrator's amax for a histogram collected elsewhere (collect once, search many).

        With ``shift=True`` pass the data's ``signed_min``; the result is then ``(amax, bias)``.
        """
        if histogram.total == 0:
            raise ValueError(f"{type(self).__name__}: the histogram is empty")
        search._check_bits(self._num_bits)
        amax, shift = self._range(histogram.counts_numpy(), histogram.edges(), histogram.amax, signed_min)
        return amax if shift is None else (amax, shift)

    def __repr__(self):
        return f"{type(self).__name__}({super().__repr__()} {self._hist!r})"


class StableQuantCalibrator(HistogramCalibratorBase):
    """StableQuant (Algorithm 2): percentile clipping at ``cutoff`` % then optional MSE search."""

    def __init__(self, num_bits=8, axis=None, unsigned=False, num_bins=2048, cutoff=0.0, mse=True, shift=False):
        super().__init__(num_bits, axis, unsigned, num_bins, shift)
        search._check_cutoff(cutoff)
        self._cutoff = float(cutoff)
        self._mse = bool(mse)

    def compute_amax(self, cutoff: float | None = None, mse: bool | None = None) -> torch.Tensor:
        """Amax for ``cutoff``/``mse`` (None: the constructor's values)."""
        cutoff = self._cutoff if cutoff is None else cutoff
        mse = self._mse if mse is None else mse
        return self.amax_grid([cutoff], mse=mse)[0]

    def _search(self, counts, edges, amax):
        return search.stablequant_amax(counts, edges, amax, self._cutoff, self._search_bits,
                                       self._unsigned, self._mse)

    def amax_grid(self, cutoffs, mse: bool = True) -> torch.Tensor:
        """One amax per cut-off from the same histogram (float32 tensor), in one search."""
        counts, edges, amax = self._checked_inputs()
        values = search.stablequant_amax_grid(
            counts, edges, amax, cutoffs, self._search_bits, self._unsigned, mse
        )
        if self._shift:
            values = [search.shifted_range(v, self.signed_min)[0] for v in values]
        return self._as_tensor(values)


class MaxHistCalibrator(HistogramCalibratorBase):
    """MAX baseline: exact max |x| (the histogram comes for free for later analysis)."""

    def _search(self, counts, edges, amax):
        return search.max_amax(counts, edges, amax)


class PercentileCalibrator(HistogramCalibratorBase):
    """Percentile baseline: clip at ``percentile`` (in [50, 100])."""

    def __init__(self, num_bits=8, axis=None, unsigned=False, num_bins=2048, percentile=99.99, shift=False):
        super().__init__(num_bits, axis, unsigned, num_bins, shift)
        if not 50.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [50, 100], got {percentile!r}")
        self._percentile = float(percentile)

    def _search(self, counts, edges, amax):
        return search.percentile_amax(counts, edges, amax, self._percentile)


class MSECalibrator(HistogramCalibratorBase):
    """MSE baseline: StableQuant without clipping."""

    def _search(self, counts, edges, amax):
        return search.mse_amax(counts, edges, amax, self._search_bits, self._unsigned)


class EntropyCalibrator(HistogramCalibratorBase):
    """Entropy (KL) baseline, TensorRT style."""

    def _search(self, counts, edges, amax):
        return search.entropy_amax(counts, edges, amax, self._search_bits, self._unsigned)
