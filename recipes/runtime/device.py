"""Where the model and the data live: ``--device auto|cpu|cuda[:N]``.

The model and every batch are moved to the device once (:func:`to_device`); the recipes then
run their forwards there (``forward_logits``' ``.to(device)`` is a no-op for data already on
it). Only ``lengths`` (host bookkeeping for decoding) stays on the CPU.
"""

from __future__ import annotations

import re

DEVICE_CHOICES = "auto|cpu|cuda[:N]"
_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(text: str) -> str:
    """Validate a device string: syntax always; ``cuda`` requests against the CUDA devices present.

    ``auto`` and ``cpu`` need no torch import, so ``--help`` and parsing stay instant.
    """
    spec = text.strip().lower()
    if not _PATTERN.fullmatch(spec):
        raise ValueError(f"{text!r} is not a device: use {DEVICE_CHOICES}")
    if spec.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{text!r}: CUDA is not available here (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        index = int(spec.split(":")[1]) if ":" in spec else None
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return spec


def resolve_device(spec: str | None = "auto", local_rank: int = 0):
    """A ``torch.device``: ``auto`` = CUDA when available; ``cuda`` without an index takes the
    torchrun LOCAL_RANK (one GPU per rank)."""
    import torch

    if isinstance(spec, torch.device):
        return spec
    spec = check_device(spec or "auto")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(spec)


def batches_to(batches, device):
    """The same batch list with inputs (and masks) on ``device``, moved once."""
    from dataclasses import replace

    from recipes.data.readers import BatchList

    moved = [replace(b, input_values=b.input_values.to(device),
                     attention_mask=None if b.attention_mask is None else b.attention_mask.to(device))
             for b in batches]
    if isinstance(batches, BatchList):
        return BatchList(moved, batches.skipped, batches.sampling_rate)
    return moved


def model_device(model):
    """Where a model's parameters live (the CPU for one without parameters, e.g. ONNX Runtime)."""
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def to_device(sm, device):
    """The speech model moved to ``device`` in place (returned for chaining)."""
    if hasattr(sm.model, "to"):
        sm.model.to(device)
    return sm
