"""Independent oracles and small builders shared by several test files: brute-force range
searches on raw data, and a tiny ModelOpt-quantized model with helpers to read its ONNX export."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import torch

from recipes.speech.models import random_model, remove_weight_norm

SR = 16000


def _kept_sorted(x, cutoff):
    """|x| sorted, top floor(n * cutoff / 100) samples dropped (exact rational arithmetic)."""
    a = np.sort(np.abs(x.astype(np.float64)))
    n_drop = math.floor(Fraction(str(cutoff)) * a.size / 100)
    return a[: a.size - n_drop]


def _raw_mse(kept, amax, bits):
    """Mean squared symmetric fake-quant error with saturation over the kept samples."""
    qmax = 2 ** (bits - 1) - 1
    step = amax / qmax
    q = np.minimum(np.round(kept / step), qmax) * step
    return float(np.mean((kept - q) ** 2))


def _brute_force(kept, bits):
    """Best amax on a 200-point grid over (0, max kept], refined by 200 points around it."""
    top = kept[-1]
    coarse = np.linspace(top / 200, top, 200)
    i = int(np.argmin([_raw_mse(kept, c, bits) for c in coarse]))
    d = coarse[1] - coarse[0]
    fine = np.linspace(max(coarse[i] - 2 * d, d / 10), min(coarse[i] + 2 * d, top), 201)
    errs = [_raw_mse(kept, c, bits) for c in fine]
    j = int(np.argmin(errs))
    return fine[j], errs[j]


def quantized_tiny(weight_bits=8, seed=0):
    sm = random_model("tiny", seed=seed)
    remove_weight_norm(sm.model)
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    if weight_bits != 8:
        cfg["quant_cfg"].append({"quantizer_name": "*weight_quantizer",
                                 "cfg": {"num_bits": weight_bits, "axis": 0}})
    calib = torch.randn(2, SR, generator=torch.Generator().manual_seed(seed))
    mtq.quantize(sm.model, cfg, lambda m: m(calib))
    return sm


def enabled_quantizers(model):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: q for n, q in model.named_modules()
            if isinstance(q, TensorQuantizer) and q.is_enabled}


def quantizer_of(node):
    """'/model/wav2vec2/x/weight_quantizer/DequantizeLinear' -> 'wav2vec2.x.weight_quantizer'
    (the exporter names nodes by module scope; 'model' is the logits-only wrapper)."""
    scope = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
    return scope.removeprefix("model.")


def torch_logits(sm, x):
    with torch.no_grad():
        return sm.model(x).logits.numpy()


def dq_nodes(proto):
    return [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]


def activation_step(sm):
    return max(float(q.amax.max()) / 127 for n, q in enabled_quantizers(sm.model).items()
               if n.endswith("input_quantizer"))
