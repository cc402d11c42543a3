"""A faster, bitwise-identical fake quant (CPU and CUDA) for the many evaluations of the search.

ModelOpt's CPU path (``tensor_quant._tensor_quant``) allocates three full-size temporaries per
call; on SFM CNN activations that is most of an evaluation's quantization cost. This does the
same float32 operations in the same order (multiply by ``max_bound / amax``, round half to even,
clamp, divide), in place, through ModelOpt's own quant-backend hook, and only for plain
per-tensor / per-channel / static-block integer quantizers (ModelOpt reshapes a block quantizer's
input into its block layout before the backend sees it, so the same code serves). ``tests/test_fastquant.py``
checks bit equality.

On CUDA, ModelOpt JIT-builds its extension (``modelopt_cuda_ext``, ~61 s on a fresh machine) on
the first fake quant. Its kernel (``tensor_quant_gpu.cu``, compiled without fast math) does the
same IEEE float32 operations with two differences, which ``kernel="cuda"`` reproduces: amax
*below* 2**-24 (not at or below) quantizes to zero, and that zero is always +0. So the search
never waits for the build; remove the CUDA branch if ModelOpt ever ships the kernel prebuilt.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

BACKEND = "sq_plugin_fast_int"
_TINY_AMAX = 1.0 / (1 << 24)  # ModelOpt treats amax at or below this as zero


def fake_quant_int(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int, unsigned: bool,
                   narrow_range: bool, kernel: str | None = None) -> torch.Tensor:
    """Symmetric integer fake quantization, the same arithmetic as ModelOpt's.

    ``kernel``: whose rules to follow, "cpu" (``_tensor_quant``) or "cuda" (the CUDA extension);
    default: the one ModelOpt runs for ``inputs``' device.
    """
    cuda_rules = (kernel or ("cuda" if inputs.is_cuda else "cpu")) == "cuda"
    dtype = inputs.dtype
    amax = amax.float()
    max_bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    min_bound = 0.0 if unsigned else (-max_bound if narrow_range else -max_bound - 1.0)
    if inputs.is_cuda:  # no host synchronisation per call: checks run on the device, no branches
        scale = torch.full_like(amax, max_bound) / amax  # a fill, not a copy from the host
        torch._assert_async(amax.min() >= 0, "Negative values in amax")
        if unsigned:
            torch._assert_async(inputs.min() >= 0, "Negative values encountered in unsigned quantization.")
        zero = amax < _TINY_AMAX if cuda_rules else amax <= _TINY_AMAX
        out = inputs.float() * torch.where(zero, torch.zeros_like(scale), scale)
        out.round_().clamp_(min_bound, max_bound)
        out.div_(torch.where(zero, torch.ones_like(scale), scale))
        if cuda_rules:
            out.masked_fill_(zero, 0.0)  # the kernel returns +0 for a zero amax
        return out.to(dtype)
    if unsigned and inputs.min() < 0.0:
        raise TypeError("Negative values encountered in unsigned quantization.")
    scale = torch.tensor(max_bound, device=amax.device) / amax
    if amax.min() < 0:
        raise ValueError("Negative values in amax")
    zero = amax < _TINY_AMAX if cuda_rules else amax <= _TINY_AMAX
    has_zero = bool(zero.any())
    if has_zero:  # amax 0 quantizes everything to 0
        scale = torch.where(zero, torch.zeros_like(scale), scale)
    out = inputs.float() * scale
    out.round_().clamp_(min_bound, max_bound)
    if has_zero:
        scale = torch.where(zero, torch.ones_like(scale), scale)
    out.div_(scale)
    if has_zero and cuda_rules:
        out.masked_fill_(zero, 0.0)  # the kernel returns +0 for a zero amax
    return out.to(dtype)


def fake_quant_blocks(weight: torch.Tensor, amax: torch.Tensor, axis: int, block: int, num_bits: int,
                      narrow_range: bool, kernel: str | None = None) -> torch.Tensor:
    """Signed block fake quant of a weight: :func:`fake_quant_int` in ModelOpt's static block layout
    (:func:`calibrators.weight_blocks`; ``amax`` one per block, keepdim), reshaped back."""
    from calibrators import weight_blocks

    blocks, _ = weight_blocks(weight, axis, block)
    return fake_quant_int(blocks, amax, num_bits, False, narrow_range, kernel).reshape(weight.shape)


def _entrypoint(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    from sq_plugin.modelopt_private import amax_for, bias_for
    from sq_plugin.quantizers import is_float_format

    if is_float_format(quantizer):  # FP8 set after entry (the mixed search): ModelOpt's own
        from modelopt.torch.quantization.tensor_quant import scaled_e4m3

        return scaled_e4m3(inputs, amax_for(quantizer, inputs), None, *quantizer.num_bits)
    bias = bias_for(quantizer, inputs)  # a shifted range: quantize x - bias, add it back
    if bias is not None:
        inputs = inputs - bias
    out = fake_quant_int(inputs, amax_for(quantizer, inputs), quantizer.num_bits,
                         quantizer.unsigned, quantizer.narrow_range)
    return out if bias is None else out + bias


def eligible(quantizer) -> bool:
    """Plain integer fake quant (CPU or CUDA; per-tensor, per-channel or static blocks) with a
    calibrated amax and a static shift if any: the fast path."""
    from sq_plugin.modelopt_private import is_dynamic, static_amax

    blocks = quantizer.block_sizes or {}
    plain_blocks = blocks.get("type", "static") == "static" and all(isinstance(k, int) or k == "type" for k in blocks)
    if getattr(quantizer, "backend", None) is not None or not isinstance(quantizer.num_bits, int) \
            or not plain_blocks or is_dynamic(quantizer):
        return False
    amax = static_amax(quantizer)
    return (amax is not None and amax.device.type in ("cpu", "cuda")
            and (not quantizer.bias or quantizer.bias_type == "static"))


@contextmanager
def fast_fake_quant(model: nn.Module):
    """Route eligible quantizers of ``model`` through the in-place fake quant while inside."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )

    if not is_registered_quant_backend(BACKEND):
        register_quant_backend(BACKEND, _entrypoint)
    switched = [q for q in model.modules() if isinstance(q, TensorQuantizer) and eligible(q)]
    for q in switched:
        q.backend = BACKEND
    try:
        yield
    finally:
        for q in switched:
            q.backend = None
