"""The ``"stablequant"`` calibration algorithm in ModelOpt: its config, the calibrator each
activation quantizer gets, and the mode registration.

Kept thin on purpose: the range search lives in :mod:`calibrators`; this module only decides
which quantizer gets which calibrator and lets ModelOpt's own max-calibration loop drive them.
"""

from __future__ import annotations

import fnmatch
from typing import ClassVar, Literal

import torch.nn as nn
from modelopt.torch.opt.config import ModeloptField
from modelopt.torch.quantization import model_calib
from modelopt.torch.quantization.config import QuantizeAlgorithmConfig
from modelopt.torch.quantization.mode import BaseCalibrateModeDescriptor, CalibrateModeRegistry

from calibrators import HistogramCalibratorBase, StableQuantCalibrator

from .equalize import equalize_inputs
from .modelopt_private import (
    allow_in_auto_quantize,
    calibrator_of,
    set_calibrator,
    set_calibrator_bits,
    sync_calibrator_attributes,
)
from .quantizers import activation_quantizers, is_float_format, match_clip_layers, set_mse_weight_amax, set_shift

METHOD = "stablequant"

class StableQuantCalibConfig(QuantizeAlgorithmConfig):
    """``{"method": "stablequant", "cutoff": p, "clip_layers": [...], "num_bins": 2048}``.

    Activation quantizers whose name matches a ``clip_layers`` pattern (fnmatch) are calibrated
    with cut-off ``p`` (percent of histogram mass removed from the top) then MSE; all other
    activation quantizers with MSE only; weight quantizers keep ModelOpt's max calibration.
    """

    _mutates_weights: ClassVar[bool] = False

    method: Literal["stablequant"] = ModeloptField("stablequant")
    cutoff: float = ModeloptField(0.0, ge=0.0, le=50.0, title="Cut-off p (percent) for clip_layers.")
    clip_layers: list[str] = ModeloptField(
        [], title="fnmatch patterns of quantizer names that get the cut-off."
    )
    num_bins: int = ModeloptField(2048, ge=16, title="Histogram bins per activation quantizer.")
    mse: bool = ModeloptField(True, title="Pick the MSE-optimal scale within the kept range.")
    layer_calibrators: dict[str, dict] = ModeloptField(
        {}, title="fnmatch pattern -> {'calibrator': registered name, **its kwargs}; the last "
        "matching pattern wins over cutoff/clip_layers for that activation quantizer."
    )
    equalize: list[str] = ModeloptField(
        [], title="fnmatch patterns of activation quantizers whose layer input is equalised per channel "
        "(SmoothQuant-style: x / s quantized, weight columns * s) before calibration."
    )
    equalize_alpha: float = ModeloptField(0.5, ge=0.0, le=1.0, title="Migration strength alpha of s = "
                                          "max|x_c|^alpha / max|w_c|^(1 - alpha).")
    weight_calibrator: Literal["max", "mse"] = ModeloptField(
        "max", title="Per-channel weight amax: max |w|, or the MSE-optimal clip of each channel."
    )


def _layer_calibrator(name: str, layer_calibrators: dict[str, dict]) -> tuple[str, dict] | None:
    """(registered name, kwargs) of the last ``layer_calibrators`` pattern matching ``name``."""
    spec = None
    for pattern, entry in layer_calibrators.items():
        if fnmatch.fnmatchcase(name, pattern):
            spec = entry
    if spec is None:
        return None
    kwargs = dict(spec)
    return kwargs.pop("calibrator", "stablequant"), kwargs


def install_stablequant_calibrators(
    model: nn.Module,
    cutoff: float = 0.0,
    clip_layers: list[str] | tuple[str, ...] = (),
    num_bins: int = 2048,
    mse: bool = True,
    layer_calibrators: dict[str, dict] | None = None,
) -> dict[str, HistogramCalibratorBase]:
    """Give every integer activation quantizer a histogram calibrator with the quantizer's own bits.

    StableQuantCalibrator (cut-off for ``clip_layers``) unless a ``layer_calibrators`` entry
    names another registered calibrator for it, or the quantizer's ``quant_cfg`` entry already
    chose one of this package's histogram calibrators (kept, not silently replaced). Float
    formats (FP8 E4M3, ``num_bits=(4, 3)``) keep ModelOpt's max calibration, its FP8 default:
    the range searches here are for integer grids.
    """
    from .registry import calibrator_class

    quantizers = activation_quantizers(model)
    clipped = match_clip_layers(list(quantizers), list(clip_layers))
    layer_calibrators = dict(layer_calibrators or {})
    named = match_clip_layers(list(quantizers), list(layer_calibrators))  # every pattern must match
    installed = {}
    for name, q in quantizers.items():
        if is_float_format(q):
            if name in named:
                raise ValueError(f"{name}: layer_calibrators names a {q.num_bits} float-format quantizer; "
                                 "those keep max calibration")
            continue
        if q.axis is not None or q.block_sizes:
            raise ValueError(
                f"{name}: StableQuant calibrates per-tensor activations; this quantizer has "
                f"axis={q.axis} block_sizes={q.block_sizes}"
            )
        chosen = _layer_calibrator(name, layer_calibrators)
        current = calibrator_of(q)
        if chosen is None and isinstance(current, HistogramCalibratorBase) \
                and not isinstance(current, StableQuantCalibrator):
            set_calibrator_bits(current, q)  # built by ModelOpt from a constructor tuple: no bits
            installed[name] = current  # the calibrator the user put in quant_cfg stays
            continue
        if chosen is None:
            cal = StableQuantCalibrator(
                num_bits=q.num_bits,
                unsigned=q.unsigned,
                num_bins=num_bins,
                cutoff=cutoff if name in clipped else 0.0,
                mse=mse,
            )
        else:
            cls_name, kwargs = chosen
            try:
                cal = calibrator_class(cls_name)(num_bits=q.num_bits, unsigned=q.unsigned,
                                                 num_bins=num_bins, **kwargs)
            except TypeError as e:
                raise ValueError(f"{name}: bad layer_calibrators entry {chosen}: {e}") from None
        set_calibrator(q, cal)
        installed[name] = cal
    return installed


def stablequant_calibrate(
    model: nn.Module,
    forward_loop=None,
    cutoff: float = 0.0,
    clip_layers: list[str] | tuple[str, ...] = (),
    num_bins: int = 2048,
    mse: bool = True,
    layer_calibrators: dict[str, dict] | None = None,
    weight_calibrator: str = "max",
    equalize: list[str] | tuple[str, ...] = (),
    equalize_alpha: float = 0.5,
    **_ignored,
) -> None:
    """Algorithm 2 on every activation quantizer, driven by ModelOpt's max-calibration loop."""
    if forward_loop is None:
        raise ValueError("the 'stablequant' algorithm needs a forward_loop with calibration data")
    if equalize:
        equalize_inputs(model, forward_loop, list(equalize), equalize_alpha)
    installed = install_stablequant_calibrators(model, cutoff, clip_layers, num_bins, mse, layer_calibrators)
    model_calib.max_calibrate(model, forward_loop, distributed_sync=False)
    quantizers = activation_quantizers(model)
    for name, cal in installed.items():
        if cal.shift:
            set_shift(quantizers[name], cal.compute_bias())
    if weight_calibrator == "mse":
        set_mse_weight_amax(model)


def _register_mode() -> None:
    """Register ``"stablequant"`` in CalibrateModeRegistry once (re-import is a no-op)."""
    if f"{METHOD}_calibrate" in CalibrateModeRegistry:
        return

    @CalibrateModeRegistry.register_mode
    class StableQuantCalibrateModeDescriptor(BaseCalibrateModeDescriptor):
        """Mode for the StableQuant calibration algorithm (sq-plugin)."""

        @property
        def config_class(self) -> type[QuantizeAlgorithmConfig]:
            return StableQuantCalibConfig

        _calib_func = stablequant_calibrate


def register() -> None:
    """Idempotent: everything ``import sq_plugin`` needs to do with ModelOpt."""
    _register_mode()
    sync_calibrator_attributes()
    allow_in_auto_quantize(METHOD)
