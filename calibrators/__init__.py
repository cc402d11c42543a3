"""StableQuant calibration math and ModelOpt calibrators (independent of sq_plugin/recipes)."""

from .calibrator import (
    EntropyCalibrator,
    HistogramCalibratorBase,
    MaxHistCalibrator,
    MSECalibrator,
    PercentileCalibrator,
    StableQuantCalibrator,
)
from .histogram import AbsHistogram
from .search import (
    clip_index,
    entropy_amax,
    max_amax,
    mse_amax,
    percentile_amax,
    shifted_range,
    stablequant_amax,
    stablequant_amax_grid,
)
from .weights import BLOCK_SIZES, per_block_mse_amax, per_channel_mse_amax, weight_block, weight_blocks

__all__ = [
    "BLOCK_SIZES",
    "AbsHistogram",
    "EntropyCalibrator",
    "HistogramCalibratorBase",
    "MSECalibrator",
    "MaxHistCalibrator",
    "PercentileCalibrator",
    "StableQuantCalibrator",
    "clip_index",
    "entropy_amax",
    "max_amax",
    "mse_amax",
    "per_block_mse_amax",
    "per_channel_mse_amax",
    "percentile_amax",
    "shifted_range",
    "stablequant_amax",
    "stablequant_amax_grid",
    "weight_block",
    "weight_blocks",
]
