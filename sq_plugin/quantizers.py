"""Which quantizers a model has and what format they hold: plain functions over ModelOpt's
``TensorQuantizer`` public properties (private access goes through :mod:`.modelopt_private`)."""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
from modelopt.torch.quantization.nn import TensorQuantizer

from calibrators import per_channel_mse_amax

from .modelopt_private import blocked_weight, clear_shift, is_dynamic, reset_weight_layout

__all__ = ["E4M3", "activation_quantizers", "clear_shift", "is_float_format", "is_weight_quantizer",
           "match_clip_layers", "set_mse_weight_amax", "set_shift", "set_weight_format", "weight_quantizers"]


E4M3 = (4, 3)  # ModelOpt's num_bits for FP8 E4M3


def is_float_format(q: TensorQuantizer) -> bool:
    """ModelOpt's float formats give num_bits as (exponent, mantissa) bits, e.g. (4, 3) for FP8 E4M3."""
    return isinstance(q.num_bits, (tuple, list))


def is_weight_quantizer(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("weight_quantizer")


def activation_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Enabled, statically calibrated activation quantizers by module path, in model order."""
    return {
        name: q
        for name, q in model.named_modules()
        if isinstance(q, TensorQuantizer)
        and q.is_enabled
        and not is_dynamic(q)
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


def set_shift(q: TensorQuantizer, bias: torch.Tensor | float) -> None:
    """Quantize ``x - bias`` and add ``bias`` back: a one-sided range on a symmetric grid.

    Uses ModelOpt's static affine bias (``fake_tensor_quant(x, amax, bias)``) with our value, set
    after calibration so ModelOpt's own bias calibrator never shifts the data being collected.
    ``recipes.export.onnx`` folds it into the consumer's bias for TensorRT.
    """
    q.set_from_attribute_config({"bias": {0: None, "type": "static", "method": "max_min"}})
    q.bias_value = torch.as_tensor(bias, dtype=torch.float32, device=q.amax.device).reshape(())


def weight_quantizers(model: nn.Module) -> dict[str, tuple[nn.Module, TensorQuantizer]]:
    """Enabled weight quantizers by module path, with the module whose ``weight`` they quantize."""
    return {
        name: (module, module.weight_quantizer)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight_quantizer", None), TensorQuantizer)
        and module.weight_quantizer.is_enabled
        and getattr(module, "weight", None) is not None
    }


def set_mse_weight_amax(model: nn.Module) -> None:
    """Replace each per-channel (or per-block) max weight amax by the channel's (block's) MSE-optimal
    clip (integer weights; float formats keep their max)."""
    for name, (module, q) in weight_quantizers(model).items():
        if is_float_format(q):
            continue
        if q.amax is None or q.amax.numel() == 1:
            raise ValueError(f"{name}: weight_calibrator 'mse' needs per-channel or block weight quantizers")
        if q.block_sizes:
            q.amax = per_channel_mse_amax(blocked_weight(q, module.weight), q.amax, q.num_bits,
                                          q.unsigned).reshape(q.amax.shape)
            continue
        q.amax = per_channel_mse_amax(module.weight, q.amax.reshape(amax_shape(q, module.weight)),
                                      q.num_bits, q.unsigned).reshape(q.amax.shape)


def set_weight_format(q: TensorQuantizer, weight: torch.Tensor, num_bits: int | tuple, amax: torch.Tensor,
                      block_sizes: dict | None = None) -> None:
    """Put a weight quantizer at ``num_bits`` with ``amax``: per output channel (axis 0), or static
    blocks (``block_sizes`` as in a ModelOpt config; ``amax`` one per block, any shape, block order).

    ModelOpt caches a block quantizer's reshape on its first input and refuses an amax of another
    shape, so both are reset first (:func:`~sq_plugin.modelopt_private.reset_weight_layout`).
    """
    reset_weight_layout(q)
    q.num_bits = num_bits
    if block_sizes is None:
        q.block_sizes = None
        q.axis = None if isinstance(num_bits, (tuple, list)) else 0  # FP8: per tensor
        q.amax = amax
        return
    q.block_sizes = dict(block_sizes)
    shape = blocked_weight(q, weight).shape
    keep = q.axis  # the quantized (kept) dims of the block layout
    q.amax = amax.reshape([n if d in keep else 1 for d, n in enumerate(shape)])


def amax_shape(q: TensorQuantizer, weight) -> tuple[int, ...]:
    """ModelOpt keeps per-channel amax as [C, 1] for any weight rank; broadcastable form here."""
    return tuple(n if d == (q.axis if isinstance(q.axis, int) else q.axis[0]) % weight.dim() else 1
                 for d, n in enumerate(weight.shape))
