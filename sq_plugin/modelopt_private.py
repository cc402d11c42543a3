"""Every access to ModelOpt's private ``TensorQuantizer`` / calibrator attributes, and the two
patches of ModelOpt this plugin applies, in one module (``tests/test_layering.py`` greps for any
other use), so a ModelOpt release that renames them breaks here and nowhere else.

Public properties (``amax``, ``num_bits``, ``unsigned``, ``axis``, ``is_enabled``,
``disable_calib()``...) are used wherever they exist.
Workaround: ModelOpt 0.47 has no public getter or setter for the attributes below.
Remove when ModelOpt offers a public one (accessor by accessor).
"""

from __future__ import annotations

import torch
from modelopt.torch.quantization.nn import TensorQuantizer

from calibrators import HistogramCalibratorBase


def calibrator_of(q: TensorQuantizer):
    """The quantizer's calibrator (None before one is configured)."""
    return getattr(q, "_calibrator", None)


def set_calibrator(q: TensorQuantizer, cal) -> None:
    q._calibrator = cal


def calibrator_bits(cal) -> tuple[int, bool]:
    """(num_bits, unsigned) a ModelOpt-API calibrator searches scales for."""
    return cal._num_bits, cal._unsigned


def set_calibrator_bits(cal, q: TensorQuantizer) -> None:
    cal._num_bits, cal._unsigned, cal._axis = q.num_bits, q.unsigned, q.axis


def is_dynamic(q: TensorQuantizer) -> bool:
    """Dynamic ("type": "dynamic") quantizers compute amax per call and are never calibrated."""
    return bool(q._dynamic)


def quantizes(q: TensorQuantizer) -> bool:
    """Fake quantization switched on (``enable_quant()`` / ``disable_quant()``)."""
    return bool(q._if_quant)


def collects(q: TensorQuantizer) -> bool:
    """Calibration switched on (``enable_calib()`` / ``disable_calib()``)."""
    return bool(q._if_calib)


def static_amax(q: TensorQuantizer) -> torch.Tensor | None:
    """The stored amax, or None when not calibrated or dynamic (``q.amax`` asserts on dynamic)."""
    return None if q._dynamic else getattr(q, "_amax", None)


def amax_for(q: TensorQuantizer, inputs: torch.Tensor) -> torch.Tensor:
    """The amax the quantizer applies to ``inputs`` (for quant backends, which get the quantizer)."""
    return q._get_amax(inputs)


def bias_for(q: TensorQuantizer, inputs: torch.Tensor) -> torch.Tensor | None:
    """The static shift (bias) the quantizer subtracts before quantizing, or None."""
    return q._get_bias(inputs)


def clear_shift(q: TensorQuantizer) -> None:
    """Undo :func:`set_shift` (ModelOpt has no public way to drop a bias once configured)."""
    q._bias = None
    q._bias_calibrator = None
    if hasattr(q, "_bias_value"):
        delattr(q, "_bias_value")


_BLOCK_LAYOUT = ("_block_reshape_size", "_original_shape", "_padding", "_slices", "_amax_shape_for_export")


def blocked_weight(q: TensorQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a static block quantizer reshapes it before quantizing (its amax's layout, keepdim)."""
    q._setup_for_blockquant(weight)
    return q._process_for_blockquant(weight)


def reset_weight_layout(q: TensorQuantizer) -> None:
    """Forget a block quantizer's cached reshape and its amax, so a new format and amax can be set."""
    for attr in _BLOCK_LAYOUT + ("_amax",):
        if hasattr(q, attr):
            delattr(q, attr)


def tuple_calibrators_get_quantizer_bits() -> bool:
    """Does this ModelOpt hand a quantizer's num_bits to a calibrator built from a constructor tuple?

    ModelOpt 0.47 does not (only "max"/"histogram" get them), so a W6 quantizer with
    ``"calibrator": sq_plugin.calibrator("mse")`` would search 8-bit scales.
    """
    from calibrators import StableQuantCalibrator

    probe = TensorQuantizer()
    probe.set_from_attribute_config({"num_bits": 5, "calibrator": (StableQuantCalibrator, (), {})})
    return calibrator_bits(calibrator_of(probe))[0] == 5


def sync_calibrator_attributes() -> None:
    """Make a quantizer's ``num_bits``/``unsigned``/``axis`` reach our calibrators.

    Workaround: ModelOpt <= 0.47 does not (see :func:`tuple_calibrators_get_quantizer_bits`); applied
    only while the probe shows it is needed, so it switches itself off on a ModelOpt that passes the
    settings. Remove when the oldest supported ModelOpt passes them (the probe too). The "stablequant"
    algorithm does not rely on it: it sets bits where it installs calibrators. The patch covers
    our calibrators used with ModelOpt's own algorithms (``"max"``), where no code of ours runs.
    """
    original = TensorQuantizer.set_from_attribute_config
    if getattr(original, "_sq_plugin_sync", False) or tuple_calibrators_get_quantizer_bits():
        return

    def set_from_attribute_config(self, attribute_cfg):
        original(self, attribute_cfg)
        cal = calibrator_of(self)
        if isinstance(cal, HistogramCalibratorBase):
            set_calibrator_bits(cal, self)

    set_from_attribute_config._sq_plugin_sync = True
    set_from_attribute_config.__doc__ = original.__doc__
    TensorQuantizer.set_from_attribute_config = set_from_attribute_config


def allow_in_auto_quantize(method: str) -> None:
    """Let ``mtq.auto_quantize`` take formats whose algorithm is ``method`` (``"stablequant"``).

    ModelOpt 0.47 checks each candidate format's algorithm against a private allow-list
    (``model_quant._AUTO_QUANTIZE_SUPPORTED_ALGORITHMS``: max, mse, smoothquant, awq, ...) with
    no public way to register one, and refuses the rest before any work. StableQuant qualifies
    as those do: per recipe, auto_quantize runs ``calibrate(model, algorithm, forward_loop)``
    with that recipe's quantizers enabled and stores their state; ours only sets amax (no
    weights change).
    Workaround: the allow-list has no public way in. Remove when ModelOpt offers a registration
    hook for auto_quantize algorithms (or drops the allow-list).
    """
    from modelopt.torch.quantization import model_quant

    allowed = getattr(model_quant, "_AUTO_QUANTIZE_SUPPORTED_ALGORITHMS", None)
    if isinstance(allowed, set):
        allowed.add(method)
