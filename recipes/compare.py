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

from recipes.evaluation import systems
from recipes.evaluation.asr import UtteranceErrors, forward_logits, intervals, paired_bootstrap
from recipes.runtime.distributed import current_ranks
from recipes.search.engine import DevScorer, Settings
from recipes.search.fastquant import fast_fake_quant
from recipes.search.layerwise import BASELINE_SPECS, PERCENTILE, calibrator_amax, run_layerwise, spec_label
from recipes.search.paper import run_stablequant
from recipes.speech.models import SpeechModel, layer_inventory


def baseline_amax(cal, method: str) -> float:
    """One activation quantizer's amax by a baseline method, from its collected histogram."""
    if method not in BASELINE_SPECS:
        raise ValueError(f"unknown baseline method {method!r}")
    name, kwargs = BASELINE_SPECS[method]
    return calibrator_amax(cal, name, kwargs)


BASELINES = systems.BASELINES  # each has its calibrator in BASELINE_SPECS (tested)


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


def _settings(b: int, gamma: float, grid: Sequence[float] | None, num_bins: int) -> Settings:
    """The search settings at W{b}A{b}, every other choice shared by all bit widths."""
    settings = Settings(wbits=b, abits=b, gamma=gamma, num_bins=num_bins)
    if grid is not None:
        settings.grid = list(grid)
    return settings


def _state_path(out_dir: Path | None, tag: str, b: int) -> Path | None:
    """Where one recipe's W{b}A{b} search keeps its resumable state (nowhere without ``out_dir``)."""
    return Path(out_dir) / f"state_{tag}_w{b}a{b}.json" if out_dir else None


def _subset_rows(subsets: dict[str, set[str]] | None, test_ids: list[str]) -> dict[str, list[int]]:
    """Each named subset as rows of the test set (its utterance order); a subset that shares no
    utterance with the test set is an error, not an empty row of the table."""
    rows = {name: [k for k, i in enumerate(test_ids) if i in ids] for name, ids in (subsets or {}).items()}
    for name, found in rows.items():
        if not found:
            raise ValueError(f"test subset {name!r} shares no utterance with the test set")
    return rows


def _test_errors(paper, default, cnn_layers: list[str], test_scorer: DevScorer, fp32_errors: UtteranceErrors,
                 b: int) -> dict[str, UtteranceErrors]:
    """Test-set errors of fp32, of every baseline's scales on the paper run's model (and, for
    Table II, max and percentile with the CNN layers left in float: ``*_tr_only``), of the paper
    recipe's scales, and of the default recipe's own model.

    Every method sets the scales on one model, so only the calibration differs; afterwards the
    model is left as the paper's recipe chose.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    from sq_plugin.modelopt_private import calibrator_of
    from sq_plugin.quantizers import activation_quantizers

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

    errors = {systems.FP32: fp32_errors}
    jobs = [(m, False) for m in BASELINES] + [("max", True), ("percentile", True), (systems.PAPER, False)]
    for method, tr_only in tqdm(jobs, desc=f"compare W{b}A{b} on test", leave=False,
                                disable=not current_ranks().main):
        amax = paper.amax if method == systems.PAPER else {
            n: baseline_amax(calibrator_of(q), method) for n, q in acts.items()}
        key = systems.tr_only(method) if tr_only else method
        errors[key] = errors_with(amax, tr_only)
    errors_with(paper.amax)  # leave the model as the paper's recipe chose
    with fast_fake_quant(default.model.model):
        errors[systems.DEFAULT] = test_scorer.errors(outputs(default.model.model, test_scorer.batches))
    return errors


def _bits_row(paper, default, errors: dict[str, UtteranceErrors], subset_rows: dict[str, list[int]],
              resamples: int, seed: int) -> dict:
    """One bit width's row of the table: what both recipes chose on dev, each system's test WER,
    paired-bootstrap intervals against fp32, and per-subset WERs."""
    row: dict = {"clipped_layers": paper.marked, "p_opt": paper.p_opt, "dev_wer": default.final_wer,
                 "paper_dev_wer": paper.final_wer,
                 "layer_calibrators": {c.quantizer: c.chosen for c in default.layers},
                 "weight_calibrator": default.weight_calibrator}
    row.update({k: e.wer for k, e in errors.items() if k != systems.FP32})
    whole = {k: e for k, e in errors.items() if not k.endswith(systems.TR_ONLY)}
    row["intervals"] = intervals(whole, systems.FP32, [*BASELINES, systems.PAPER], resamples, seed)
    row["subsets"] = {name: {k: _subset(e, rows).wer for k, e in whole.items()}
                      for name, rows in subset_rows.items()}
    return row


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
    test_scorer = DevScorer(sm, test)
    test_ids = [i for b in test for i in b.ids]
    fp32_errors = test_scorer.errors(outputs(sm.model, test_scorer.batches))
    cnn_layers = [i.path for i in layer_inventory(sm.model) if i.kind == "cnn"]
    table: dict = {"fp32_test_wer": fp32_errors.wer, "percentile": PERCENTILE, "test_utterances": len(test_ids),
                   "test_words": int(fp32_errors.words.sum()), "resamples": resamples, "bits": {}}
    subset_rows = _subset_rows(subsets, test_ids)

    for b in bits:
        settings = _settings(b, gamma, grid, num_bins)
        paper = run_stablequant(sm, calib, dev, settings, state_path=_state_path(out_dir, "paper", b), resume=resume)
        default = run_layerwise(sm, calib, dev, settings, state_path=_state_path(out_dir, "default", b), resume=resume)
        errors = _test_errors(paper, default, cnn_layers, test_scorer, fp32_errors, b)
        table["bits"][str(b)] = _bits_row(paper, default, errors, subset_rows, resamples, seed)
    if budgets:
        # the mixed search starts from the default recipe at W8A8: the 8-bit row's, when there is one
        base = _state_path(out_dir, "default", 8) if 8 in bits else None
        table["mixed"] = mixed_compare_rows(sm, calib, dev, test_scorer, fp32_errors, budgets,
                                            _settings(8, gamma, grid, num_bins),
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
