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

from recipes.evaluation.asr import UtteranceErrors, forward_logits, intervals, paired_bootstrap
from recipes.runtime.distributed import current_ranks
from recipes.search.fastquant import fast_fake_quant
from recipes.search.layerwise import BASELINE_SPECS, PERCENTILE, calibrator_amax, run_layerwise, spec_label
from recipes.search.stablequant import DevScorer, Settings, run_stablequant
from recipes.speech.models import SpeechModel, layer_inventory


def baseline_amax(cal, method: str) -> float:
    """One activation quantizer's amax by a baseline method, from its collected histogram."""
    if method not in BASELINE_SPECS:
        raise ValueError(f"unknown baseline method {method!r}")
    name, kwargs = BASELINE_SPECS[method]
    return calibrator_amax(cal, name, kwargs)


BASELINES = tuple(BASELINE_SPECS)


def outputs(model: torch.nn.Module, batches: Sequence) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [forward_logits(model, b) for b in batches]


def uniform_dev_errors(result, scorer: DevScorer) -> dict[str, UtteranceErrors]:
    """Dev per-utterance edits of each baseline applied to every activation quantizer.

    The default recipe evaluated them as its starts (weights per-channel max); for a paper run
    they are evaluated here from the run's histograms, the model left as the recipe chose.
    """
    from sq_plugin.modelopt_private import calibrator_of
    from sq_plugin.quantizers import activation_quantizers

    if result.recipe == "default":
        return {m: UtteranceErrors.from_json(result.dev_errors[f"{spec_label(*spec)}/max"])
                for m, spec in BASELINE_SPECS.items()}
    model = result.model.model
    acts = activation_quantizers(model)
    chosen = {n: q.amax for n, q in acts.items()}
    errors = {}
    try:
        with fast_fake_quant(model):
            for method in BASELINES:
                for _n, q in acts.items():
                    q.amax = baseline_amax(calibrator_of(q), method)
                errors[method] = scorer.errors(outputs(model, scorer.batches))
    finally:
        for n, q in acts.items():
            q.amax = chosen[n]
    return errors


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
    subsets: dict[str, set[str]] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    budgets: Sequence[float] = (),
    mixed_score: str = "auto",
) -> dict:
    """Test WER of every baseline, the paper's recipe and the default recipe, with intervals.

    ``subsets`` (name -> utterance ids of the test set) adds per-subset WERs, e.g. the demo's
    training voices vs held-out voices.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    from sq_plugin.modelopt_private import calibrator_of
    from sq_plugin.quantizers import activation_quantizers

    test_scorer = DevScorer(sm, test)
    test_ids = [i for b in test for i in b.ids]
    fp32_errors = test_scorer.errors(outputs(sm.model, test_scorer.batches))
    cnn_layers = [i.path for i in layer_inventory(sm.model) if i.kind == "cnn"]
    table: dict = {"fp32_test_wer": fp32_errors.wer, "percentile": PERCENTILE, "test_utterances": len(test_ids),
                   "test_words": int(fp32_errors.words.sum()), "resamples": resamples, "bits": {}}
    subsets = {name: [k for k, i in enumerate(test_ids) if i in ids] for name, ids in (subsets or {}).items()}
    for name, rows in subsets.items():
        if not rows:
            raise ValueError(f"test subset {name!r} shares no utterance with the test set")
    def settings_at(b: int) -> Settings:
        settings = Settings(wbits=b, abits=b, gamma=gamma, num_bins=num_bins)
        if grid is not None:
            settings.grid = list(grid)
        return settings

    for b in bits:
        settings = settings_at(b)
        state = (lambda tag: Path(out_dir) / f"state_{tag}_w{b}a{b}.json") if out_dir else (lambda tag: None)
        paper = run_stablequant(sm, calib, dev, settings, state_path=state("paper"), resume=resume)
        default = run_layerwise(sm, calib, dev, settings, state_path=state("default"), resume=resume)
        model = paper.model.model
        acts = activation_quantizers(model)
        quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
        # only the quantizers the config enabled (output / norm quantizers stay off)
        cnn_quantizers = [n for n, q in quantizers.items()
                          if q.is_enabled and any(n.startswith(p + ".") for p in cnn_layers)]

        def errors_with(amax: dict[str, float], tr_only: bool = False) -> UtteranceErrors:
            for n, a in amax.items():
                acts[n].amax = a
            for n in cnn_quantizers:
                quantizers[n].disable() if tr_only else quantizers[n].enable()
            try:
                with fast_fake_quant(model):
                    return test_scorer.errors(outputs(model, test_scorer.batches))
            finally:
                for n in cnn_quantizers:
                    quantizers[n].enable()

        errors = {"fp32": fp32_errors}
        row: dict = {"clipped_layers": paper.marked, "p_opt": paper.p_opt, "dev_wer": default.final_wer,
                     "paper_dev_wer": paper.final_wer,
                     "layer_calibrators": {c.quantizer: c.chosen for c in default.layers},
                     "weight_calibrator": default.weight_calibrator}
        jobs = [(m, False) for m in BASELINES] + [("max", True), ("percentile", True), ("stablequant_paper", False)]
        for method, tr_only in tqdm(jobs, desc=f"compare W{b}A{b} on test", leave=False,
                                    disable=not current_ranks().main):
            amax = paper.amax if method == "stablequant_paper" else {
                n: baseline_amax(calibrator_of(q), method) for n, q in acts.items()}
            key = f"{method}_tr_only" if tr_only else method
            errors[key] = errors_with(amax, tr_only)
        errors_with(paper.amax)  # leave the model as the paper's recipe chose
        with fast_fake_quant(default.model.model):
            errors["stablequant"] = test_scorer.errors(outputs(default.model.model, test_scorer.batches))
        row.update({k: e.wer for k, e in errors.items() if k != "fp32"})
        systems = {k: e for k, e in errors.items() if not k.endswith("_tr_only")}
        row["intervals"] = intervals(systems, "fp32", [*BASELINES, "stablequant_paper"], resamples, seed)
        row["subsets"] = {name: {k: _subset(e, rows).wer for k, e in systems.items()}
                          for name, rows in subsets.items()}
        table["bits"][str(b)] = row
    if budgets:

        # the mixed search starts from the default recipe at W8A8: the 8-bit row's, when there is one
        base = Path(out_dir) / "state_default_w8a8.json" if out_dir and 8 in bits else None
        table["mixed"] = mixed_compare_rows(sm, calib, dev, test_scorer, fp32_errors, budgets, settings_at(8),
                                            Path(out_dir) / "state_mixed.json" if out_dir else None, resume,
                                            resamples, seed, score=mixed_score, base_state=base)
    return table


def _subset(errors: UtteranceErrors, rows: list[int]) -> UtteranceErrors:
    return UtteranceErrors(*(getattr(errors, k)[rows] for k in UtteranceErrors.__dataclass_fields__))


def mixed_compare_rows(sm, calib, dev, test_scorer, fp32_errors, budgets, settings, state_path, resume: bool,
                       resamples: int = 1000, seed: int = 0, score: str = "auto", base_state=None) -> dict:
    """``stablequant compare`` rows for mixed precision: test WER per budget, with intervals vs fp32.

    Every budget shares one state file: the default recipe's W8A8 run and the per-layer
    sensitivities do not depend on the budget, so only the first budget pays for them.
    ``base_state``: compare's own W8A8 default-recipe state file (same ``settings``), reused.
    """
    from recipes.search.fastquant import fast_fake_quant
    from recipes.search.mixed import run_mixed

    rows = {}
    for k, budget in enumerate(budgets):
        r = run_mixed(sm, calib, dev, float(budget), settings, state_path=state_path,
                      resume=resume or k > 0, score=score, base_state_path=base_state)
        with fast_fake_quant(r.model.model):
            err = test_scorer.errors(outputs(r.model.model, test_scorer.batches))
        counts: dict[str, int] = {}
        for c in r.choices:
            counts[c.format] = counts.get(c.format, 0) + 1
        rows[str(float(budget))] = {
            "avg_weight_bits": r.avg_weight_bits, "compression_vs_fp32": r.compression_vs_fp32,
            "dev_wer": r.final_wer, "test_wer": err.wer, "formats": counts, "score": r.score,
            "score_reason": r.score_reason,
            "vs_fp32": paired_bootstrap(err.word_edits, fp32_errors.word_edits, err.words, resamples, seed),
            "seconds": sum(r.seconds.values())}
    return rows
