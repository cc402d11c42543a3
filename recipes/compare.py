"""The paper's Tables I and II on one model: baselines vs StableQuant, CNN vs Transformer layers.

Every method's scales come from the same histograms (the StableQuant run's calibrators), so the
tables compare calibration methods, not implementations. Selection uses the dev set; every
number in the tables is test-set WER.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from calibrators import entropy_amax, percentile_amax

from .asr import forward_logits
from .fastquant import fast_fake_quant
from .models import SpeechModel, layer_inventory
from .stablequant import DevScorer, Settings, histogram_arrays, run_stablequant

PERCENTILE = 99.99


def baseline_amax(cal, method: str) -> float:
    """One activation quantizer's amax by a baseline method, from its collected histogram."""
    if method == "max":
        return float(cal.compute_amax(cutoff=0.0, mse=False))
    if method == "mse":
        return float(cal.compute_amax(cutoff=0.0, mse=True))
    counts, edges, amax = histogram_arrays(cal)
    if method == "percentile":
        return float(percentile_amax(counts, edges, amax, PERCENTILE))
    if method == "entropy":
        return float(entropy_amax(counts, edges, amax, cal._num_bits, cal._unsigned))
    raise ValueError(f"unknown baseline method {method!r}")


def score(sm: SpeechModel, model: torch.nn.Module, scorer: DevScorer) -> float:
    with torch.inference_mode():
        return scorer.wer([forward_logits(model, b) for b in scorer.batches])


def compare_methods(
    sm: SpeechModel,
    calib: Sequence,
    dev: Sequence,
    test: Sequence,
    bits: Sequence[int] = (8, 6, 4),
    gamma: float = 0.25,
    grid: Sequence[float] | None = None,
    num_bins: int = 2048,
    out_dir: Path | None = None,
    resume: bool = False,
) -> dict:
    from modelopt.torch.quantization.nn import TensorQuantizer

    from sq_plugin.modelopt_glue import activation_quantizers

    test_scorer = DevScorer(sm, test)
    fp32 = score(sm, sm.model, test_scorer)
    cnn_layers = [i.path for i in layer_inventory(sm.model) if i.kind == "cnn"]
    table: dict = {"fp32_test_wer": fp32, "percentile": PERCENTILE, "bits": {}}
    for b in bits:
        settings = Settings(wbits=b, abits=b, gamma=gamma, num_bins=num_bins)
        if grid is not None:
            settings.grid = list(grid)
        state = Path(out_dir) / f"state_w{b}a{b}.json" if out_dir else None
        result = run_stablequant(sm, calib, dev, settings, state_path=state, resume=resume)
        model = result.model.model
        acts = activation_quantizers(model)
        quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
        # only the quantizers the config enabled (output / norm quantizers stay off)
        cnn_quantizers = [n for n, q in quantizers.items()
                          if q.is_enabled and any(n.startswith(p + ".") for p in cnn_layers)]

        def wer_with(amax: dict[str, float], tr_only: bool = False) -> float:
            for n, a in amax.items():
                acts[n].amax = a
            for n in cnn_quantizers:
                quantizers[n].disable() if tr_only else quantizers[n].enable()
            try:
                with fast_fake_quant(model):
                    return score(sm, model, test_scorer)
            finally:
                for n in cnn_quantizers:
                    quantizers[n].enable()

        row: dict = {"clipped_layers": result.marked, "p_opt": result.p_opt, "dev_wer": result.final_wer}
        methods = ["max", "percentile", "mse", "entropy"]
        jobs = [(m, False) for m in methods] + [("max", True), ("percentile", True), ("stablequant", False)]
        for method, tr_only in tqdm(jobs, desc=f"compare W{b}A{b} on test", leave=False):
            amax = result.amax if method == "stablequant" else {
                n: baseline_amax(q._calibrator, method) for n, q in acts.items()}
            key = f"{method}_tr_only" if tr_only else method
            row[key] = wer_with(amax, tr_only)
        wer_with(result.amax)  # leave the model as StableQuant chose
        table["bits"][str(b)] = row
    return table
