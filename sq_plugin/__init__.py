"""sq-plugin: StableQuant post-training quantization for speech foundation models in ModelOpt.

``import sq_plugin`` registers the ``"stablequant"`` calibration algorithm with ModelOpt, so
``mtq.quantize(model, {"quant_cfg": ..., "algorithm": {"method": "stablequant", ...}}, loop)``
works, and exposes the calibrator registry (built-ins + pluggy entry-point group ``sq_plugin``).
"""

from calibrators import HistogramCalibratorBase

from .algorithm import StableQuantCalibConfig, register, stablequant_calibrate
from .formats import STABLEQUANT_INT8_CFG, stablequant_format
from .hookspecs import hookimpl
from .registry import (
    calibrator,
    calibrator_class,
    calibrator_names,
    register_plugin,
    unregister_plugin,
)

__version__ = "0.1.0"

register()

__all__ = [
    "HistogramCalibratorBase",
    "STABLEQUANT_INT8_CFG",
    "StableQuantCalibConfig",
    "calibrator",
    "calibrator_class",
    "calibrator_names",
    "hookimpl",
    "register_plugin",
    "stablequant_calibrate",
    "stablequant_format",
    "unregister_plugin",
]
