"""The one calibration pass every search starts from, and what it gives the searches: the
recipe's base ModelOpt config, the calibrated copy, weights folded once, histogram arrays."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from recipes.search.engine import Settings
from recipes.search.qconfig import quantize_copy, stablequant_config
from recipes.speech.models import SpeechModel


def base_config(s: Settings, **algorithm) -> dict:
    """The recipe's ModelOpt config for these settings (``algorithm`` adds decided fields)."""
    config = stablequant_config(s.wbits, s.abits, num_bins=s.num_bins, equalize=s.equalize,
                                equalize_alpha=s.equalize_alpha)
    config["algorithm"].update(algorithm)
    return config


def calibrated_copy(sm: SpeechModel, calib_batches: Sequence, s: Settings):
    """One calibration pass: a histogram per activation quantizer, per-channel max weight amax.

    Returns the quantized copy, its activation quantizers, all quantizers, and the names of
    those the config enabled.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    from sq_plugin.quantizers import activation_quantizers

    qsm = quantize_copy(sm, base_config(s), calib_batches)
    acts = activation_quantizers(qsm.model)
    if not acts:
        raise ValueError("the model has no enabled activation quantizers to calibrate")
    quantizers = {n: m for n, m in qsm.model.named_modules() if isinstance(m, TensorQuantizer)}
    return qsm, acts, quantizers, {n for n, q in quantizers.items() if q.is_enabled}


@contextmanager
def folded_weight_quantizers(model: torch.nn.Module):
    """Replace each weight by its fake-quantized value once, instead of on every forward.

    Bitwise the same computation (the weight quantizer's own output); weights and quantizers
    are restored on exit, so the saved model still holds float weights + amax.
    """
    from modelopt.torch.quantization.nn import QuantModule

    folded = []
    try:
        with torch.no_grad():
            for module in model.modules():
                wq = getattr(module, "weight_quantizer", None)
                if isinstance(module, QuantModule) and wq is not None and wq.is_enabled:
                    original = module.weight.data
                    module.weight.data = wq(original)
                    wq.disable()
                    folded.append((module, original))
        yield
    finally:
        for module, original in folded:
            module.weight.data = original
            module.weight_quantizer.enable()


def histogram_arrays(cal) -> tuple:
    """(counts, edges, exact max) of a histogram calibrator, for baselines and plots."""
    h = cal.histogram
    return h.counts_numpy(), h.edges(), float(h.amax)
