"""The names of the systems a run scores and a report compares: one spelling, used by the searches
that build the per-utterance errors and the reports that render them (keys of ``dev_errors``,
``compare.json`` rows and interval tables; the spellings are the reports' JSON keys, kept as
they were)."""

from __future__ import annotations

FP32 = "fp32"
BASELINES = ("max", "percentile", "mse", "entropy")  # uniform calibrators of the paper's Table II
PAPER = "stablequant_paper"  # the paper recipe's model
DEFAULT = "stablequant"  # the default recipe's model
MIXED = "mixed"  # the kept mixed-precision allocation
DEFAULT_W8A8 = "default_w8a8"  # the default recipe at W8A8 under a mixed search

DISPLAY = {FP32: "fp32", "max": "Max", "percentile": "Percentile", "mse": "MSE", "entropy": "Entropy",
           PAPER: "StableQuant (paper recipe)", DEFAULT: "StableQuant (default recipe)"}


def uniform(fmt: str) -> str:
    """Every layer at one mixed-precision format."""
    return f"uniform_{fmt}"


def mixed_by(score: str) -> str:
    """The verified allocation of one sensitivity score (``kl``, ``ctc``)."""
    return f"mixed_{score}"


TR_ONLY = "_tr_only"


def tr_only(method: str) -> str:
    """A baseline with the CNN front end left in float (Transformer layers only, the paper's Table II)."""
    return method + TR_ONLY
