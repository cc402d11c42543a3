"""SmoothQuant-style per-channel equalisation of a layer's input before calibration."""

from __future__ import annotations

import torch
import torch.nn as nn
from modelopt.torch.quantization.nn import TensorQuantizer

from .quantizers import activation_quantizers, match_clip_layers


def equalize_inputs(model: nn.Module, forward_loop, patterns: list[str], alpha: float = 0.5) -> dict:
    """Per-input-channel scales s for the layers of the matched activation quantizers.

    One float pass collects max |x| per input channel (quantizers off); then the quantizer gets
    ``pre_quant_scale = 1 / s`` and the weight's input columns are multiplied by s, so the
    layer's float output is unchanged while the quantized activation's channels are evened out.
    Conv1d inputs [B, C, T] and Linear inputs [..., C] only. Returns the scales by layer.
    """
    quantizers = activation_quantizers(model)
    names = sorted(match_clip_layers(list(quantizers), list(patterns)))
    modules = dict(model.named_modules())
    layers = {}
    for name in names:
        layer = modules[name.rsplit(".", 1)[0]]
        if not isinstance(layer, (nn.Conv1d, nn.Linear)) or getattr(layer, "groups", 1) != 1:
            raise ValueError(f"{name}: equalize needs a plain Conv1d or Linear layer, got {type(layer).__name__}")
        layers[name] = layer
    x_max: dict[str, torch.Tensor] = {}

    def hook(name):
        channel = 1 if isinstance(layers[name], nn.Conv1d) else -1  # [B, C, T] or [..., C]

        def record(_module, args):
            x = args[0].detach()
            m = x.abs().amax(dim=[d for d in range(x.dim()) if d != channel % x.dim()]).float()
            x_max[name] = m if name not in x_max else torch.maximum(x_max[name], m)
        return record

    all_q = [q for q in model.modules() if isinstance(q, TensorQuantizer)]
    was_enabled = [q.is_enabled for q in all_q]
    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        for q in all_q:
            q.disable()
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
        for q, on in zip(all_q, was_enabled):
            q.enable() if on else q.disable()
    scales = {}
    with torch.no_grad():
        for name, layer in layers.items():
            if name not in x_max:
                raise ValueError(f"{name}: the forward_loop never reached this layer; cannot equalize it")
            w_max = layer.weight.detach().abs().amax(dim=[d for d in range(layer.weight.dim()) if d != 1]).float()
            s = (x_max[name].clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            shape = [1] * layer.weight.dim()
            shape[1] = -1
            layer.weight.mul_(s.view(shape).to(layer.weight.dtype))
            quantizers[name].pre_quant_scale = (1.0 / s).view(-1, 1) if isinstance(layer, nn.Conv1d) else 1.0 / s
            scales[name] = s
    return scales
