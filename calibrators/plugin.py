"""Built-in calibrator registration for sq_plugin's ``sq_register_calibrators`` hook.

The marker is created from the project name rather than imported from sq_plugin so that
this package never depends on sq_plugin; pluggy matches hooks by project name.
"""

import pluggy

from .calibrator import (
    EntropyCalibrator,
    MaxHistCalibrator,
    MSECalibrator,
    PercentileCalibrator,
    StableQuantCalibrator,
)

hookimpl = pluggy.HookimplMarker("sq_plugin")


@hookimpl
def sq_register_calibrators() -> dict[str, type]:
    """Name -> calibrator class for the built-in methods."""
    return {
        "stablequant": StableQuantCalibrator,
        "max": MaxHistCalibrator,
        "percentile": PercentileCalibrator,
        "mse": MSECalibrator,
        "entropy": EntropyCalibrator,
    }
