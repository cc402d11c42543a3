"""Quantization formats for ``mtq.auto_quantize(..., quantization_formats=[...])``.

``auto_quantize`` calibrates every candidate format with that format's own ``"algorithm"``
(``mtq.calibrate(model, algorithm=recipe.config.algorithm, ...)`` per recipe), so a format whose
algorithm is ``"stablequant"`` is StableQuant-calibrated inside the search, next to NVIDIA's
formats. Per-layer scores and the effective-bits budget are auto_quantize's own.
"""

from __future__ import annotations

from .algorithm import METHOD


def stablequant_format(num_bits: int = 8, weight_calibrator: str = "mse", num_bins: int = 2048) -> dict:
    """W{b}A{b}: per-channel weights, per-tensor activations, StableQuant histogram calibration
    (MSE-optimal activation scales from one histogram per quantizer; weights per-channel
    ``weight_calibrator``). Per-layer patterns only, as auto_quantize requires."""
    return {
        "quant_cfg": [
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": num_bits, "axis": 0}},
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": num_bits, "axis": None}},
        ],
        "algorithm": {"method": METHOD, "cutoff": 0.0, "clip_layers": [], "num_bins": num_bins,
                      "weight_calibrator": weight_calibrator},
    }


STABLEQUANT_INT8_CFG = stablequant_format(8)
