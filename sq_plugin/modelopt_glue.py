"""ModelOpt glue: the ``"stablequant"`` calibration algorithm and calibrator bit-width sync.

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
from modelopt.torch.quantization.nn import TensorQuantizer

from calibrators import HistogramCalibratorBase, StableQuantCalibrator

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


def is_weight_quantizer(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("weight_quantizer")


def activation_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Enabled, statically calibrated activation quantizers by module path, in model order."""
    return {
        name: q
        for name, q in model.named_modules()
        if isinstance(q, TensorQuantizer)
        and not q._disabled
        and not q._dynamic
        and not is_weight_quantizer(name)
    }


def match_clip_layers(names: list[str], patterns: list[str]) -> set[str]:
    """Names matched by any pattern; a pattern that matches nothing is an error naming it."""
    matched: set[str] = set()
    unmatched = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            unmatched.append(pattern)
        matched.update(hits)
    if unmatched:
        raise ValueError(
            f"clip_layers patterns match no enabled activation quantizer: {unmatched}; "
            f"quantizer names look like {names[:3]}"
        )
    return matched


def install_stablequant_calibrators(
    model: nn.Module,
    cutoff: float = 0.0,
    clip_layers: list[str] | tuple[str, ...] = (),
    num_bins: int = 2048,
    mse: bool = True,
) -> dict[str, StableQuantCalibrator]:
    """Give every activation quantizer a StableQuantCalibrator with the quantizer's own bits."""
    quantizers = activation_quantizers(model)
    clipped = match_clip_layers(list(quantizers), list(clip_layers))
    installed = {}
    for name, q in quantizers.items():
        if q._axis is not None or q.block_sizes:
            raise ValueError(
                f"{name}: StableQuant calibrates per-tensor activations; this quantizer has "
                f"axis={q._axis} block_sizes={q.block_sizes}"
            )
        cal = StableQuantCalibrator(
            num_bits=q._num_bits,
            unsigned=q._unsigned,
            num_bins=num_bins,
            cutoff=cutoff if name in clipped else 0.0,
            mse=mse,
        )
        q._calibrator = cal
        installed[name] = cal
    return installed


def stablequant_calibrate(
    model: nn.Module,
    forward_loop=None,
    cutoff: float = 0.0,
    clip_layers: list[str] | tuple[str, ...] = (),
    num_bins: int = 2048,
    mse: bool = True,
    **_ignored,
) -> None:
    """Algorithm 2 on every activation quantizer, driven by ModelOpt's max-calibration loop."""
    if forward_loop is None:
        raise ValueError("the 'stablequant' algorithm needs a forward_loop with calibration data")
    install_stablequant_calibrators(model, cutoff, clip_layers, num_bins, mse)
    model_calib.max_calibrate(model, forward_loop, distributed_sync=False)


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


def _sync_calibrator_attributes() -> None:
    """Make a quantizer's ``num_bits``/``unsigned``/``axis`` reach our calibrators.

    ModelOpt builds a calibrator from a constructor tuple without passing the quantizer's
    settings (only ``"max"``/``"histogram"`` get them), so a W6 quantizer would search 8-bit
    scales. Wrapping ``set_from_attribute_config`` copies them after every config update.
    """
    original = TensorQuantizer.set_from_attribute_config
    if getattr(original, "_sq_plugin_sync", False):
        return

    def set_from_attribute_config(self, attribute_cfg):
        original(self, attribute_cfg)
        cal = getattr(self, "_calibrator", None)
        if isinstance(cal, HistogramCalibratorBase):
            cal._num_bits = self._num_bits
            cal._unsigned = self._unsigned
            cal._axis = self._axis

    set_from_attribute_config._sq_plugin_sync = True
    set_from_attribute_config.__doc__ = original.__doc__
    TensorQuantizer.set_from_attribute_config = set_from_attribute_config


def register() -> None:
    """Idempotent: everything ``import sq_plugin`` needs to do with ModelOpt."""
    _register_mode()
    _sync_calibrator_attributes()
