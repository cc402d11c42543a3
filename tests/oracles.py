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


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance of two strings, by the textbook dynamic programme."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def assert_near_transcripts(got: list[str], want: list[str]) -> None:
    """ONNX Runtime's int8 transcripts against the quantized PyTorch model's: equal but for the odd
    character where an int8 rounding tie flips (ORT accumulates in integers, fake quant in float)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert edit_distance(g, w) <= max(1, len(w) // 4), (g, w)


def assert_prefix_cache_exact(model, quantizers: dict, acts: list[str], batches, then=None) -> None:
    """With one quantizer enabled at a time (model order, as Stage 1 visits them), the prefix-cached
    suffix forward equals the full forward exactly. ``then(name, full, runner)``, if given, runs
    further checks while that quantizer is the one enabled (``full``: its full-forward logits)."""
    from recipes.evaluation.asr import forward_logits
    from recipes.search.reuse import PrefixRunner

    runner = PrefixRunner(model, forward_logits, batches)
    with torch.inference_mode():
        for name in acts:
            for n, q in quantizers.items():
                q.enable() if n == name else q.disable()
            full = [forward_logits(model, b) for b in batches]
            for a, b in zip(full, runner.run(name.rsplit(".", 1)[0])):
                assert torch.equal(a, b), name
            if then is not None:
                then(name, full, runner)
