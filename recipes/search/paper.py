"""The paper recipe (StableQuant, Algorithm 1): WER-driven layer selection, then one cut-off for the
marked layers (``--recipe paper``).

Histograms are collected once (one calibration pass through ModelOpt with the "stablequant"
algorithm); every candidate scale afterwards comes from those histograms. Stage 1 serves the
float prefix of each layer from cache (:mod:`recipes.search.reuse`); Stage 2 skips cut-offs whose
scales equal an already evaluated candidate. Phases: calibrate, float, stage1, stage2
(:mod:`recipes.search.engine` runs them and keeps the state file).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recipes.evaluation import systems
from recipes.evaluation.asr import forward_logits
from recipes.search.calibrate import base_config, calibrated_copy, folded_weight_quantizers, histogram_arrays
from recipes.search.engine import Phase, SearchRun, SearchState, Settings, result_json, run_phases
from recipes.search.fastquant import fast_fake_quant
from recipes.search.reuse import PrefixRunner
from recipes.speech.models import SpeechModel

log = logging.getLogger(__name__)


@dataclass
class PaperState(SearchState):
    stage1: dict[str, float] = field(default_factory=dict)  # activation quantizer -> dev WER, it alone at MAX
    stage2: dict[str, float] = field(default_factory=dict)  # cut-off p (as str) -> dev WER


@dataclass
class LayerResult:
    quantizer: str
    layer: str
    kind: str
    wer: float
    delta: float
    marked: bool
    amax_max: float


@dataclass
class StableQuantResult:
    settings: dict
    float_wer: float
    stage1: list[LayerResult]
    marked: list[str]  # quantizer names
    stage2: dict[str, float]  # cut-off (as str) -> dev WER
    p_opt: float
    final_wer: float
    amax: dict[str, float]  # activation quantizer -> final amax
    config: dict
    evaluations: int  # model evaluations actually run (after reuse)
    seconds: dict[str, float]  # wall time per phase: calibrate, float, stage1, stage2
    dev_errors: dict[str, dict] = field(default_factory=dict)  # fp32 / final per-utterance edits
    recipe: str = "paper"
    model: SpeechModel | None = None  # the quantized model (not serialised)
    histograms: dict | None = None  # quantizer -> (counts, edges) for plots (not serialised)

    def to_json(self) -> dict:
        return result_json(self)


class PaperRun(SearchRun):
    """One paper-recipe run: the calibrated copy, its quantizers and the decisions so far."""

    state: PaperState

    def only(self, active: set[str]) -> None:
        """Enable exactly the quantizers named in ``active``."""
        for n, q in self.quantizers.items():
            q.enable() if n in active else q.disable()

    def wer_with_prefix(self, module_path: str | None) -> float:
        """Dev WER of the model as set now; the float prefix before ``module_path`` from cache."""
        self.evaluations += 1
        with torch.inference_mode():
            return self.scorer.wer(self.runner.run(None if self.s.naive_stage1 else module_path))


def _calibrate(run: PaperRun) -> None:
    from sq_plugin.modelopt_private import calibrator_of

    run.qsm, run.acts, run.quantizers, run.enabled = calibrated_copy(run.sm, run.calib, run.s)
    run.cals = {n: calibrator_of(q) for n, q in run.acts.items()}
    run.runner = PrefixRunner(run.qsm.model, forward_logits, run.dev)
    run.stack.enter_context(fast_fake_quant(run.qsm.model))  # bitwise ModelOpt's fake quant, faster


def _float_reference(run: PaperRun) -> None:
    """Dev WER with every quantizer off."""
    if run.state.float_wer is None:
        run.only(set())
        run.evaluations += 1
        with torch.inference_mode():
            errors = run.scorer.errors(run.runner.run(None))
        run.state.float_wer = errors.wer
        run.state.errors[systems.FP32] = errors.to_json()
        run.save()


def _stage1(run: PaperRun) -> None:
    """Each activation quantizer alone at its MAX range; marked when the WER rises by > gamma."""
    state, float_wer = run.state, run.state.float_wer
    run.stage1 = []
    for name in tqdm(list(run.acts), desc="stage 1: one layer at a time (MAX)", disable=not run.progress):
        layer = name.rsplit(".", 1)[0]
        amax_max = float(run.cals[name].compute_amax(cutoff=0.0, mse=False))
        if name not in state.stage1:
            run.only({name})
            run.acts[name].amax = amax_max
            state.stage1[name] = run.wer_with_prefix(layer)
            run.save()
        wer = state.stage1[name]
        run.stage1.append(LayerResult(name, layer, run.kinds.get(layer, "other"), wer, wer - float_wer,
                                      wer - float_wer > run.s.gamma, amax_max))
    run.runner.clear()
    run.marked = [r.quantizer for r in run.stage1 if r.marked]
    log.info("stage 1 marked %d layer(s): %s", len(run.marked), run.marked)


def _stage2(run: PaperRun) -> None:
    """Every quantizer on: the marked layers at cut-off p + MSE for each p of the grid, the rest at
    plain MSE; the p with the lowest dev WER (ties: the smaller p)."""
    s, acts, cals, marked, state = run.s, run.acts, run.cals, run.marked, run.state
    run.only(run.enabled)
    for n in acts:
        if n not in marked:
            acts[n].amax = float(cals[n].compute_amax(cutoff=0.0, mse=True))
    grids = {n: [float(a) for a in cals[n].amax_grid(s.grid, mse=True)] for n in marked}
    # What is constant across cut-offs is computed once: fake-quantized weights (folded in) and
    # the quantized prefix before the first marked layer (cached by a second prefix runner).
    runner = PrefixRunner(run.qsm.model, forward_logits, run.dev)
    first_marked = marked[0].rsplit(".", 1)[0] if marked else None
    by_candidate: dict[tuple, float] = {}
    with folded_weight_quantizers(run.qsm.model):
        for k, p in enumerate(tqdm(s.grid, desc="stage 2: cut-off search", disable=not run.progress)):
            key = tuple(grids[n][k] for n in marked)
            if str(p) not in state.stage2:
                if key not in by_candidate:
                    for n in marked:
                        acts[n].amax = grids[n][k]
                    run.evaluations += 1
                    with torch.inference_mode():
                        state.stage2[str(p)] = run.scorer.wer(runner.run(first_marked))
                    run.save()
                else:  # same scales as an evaluated cut-off: same WER
                    state.stage2[str(p)] = by_candidate[key]
            by_candidate.setdefault(key, state.stage2[str(p)])
    runner.clear()
    run.stage2 = {str(p): state.stage2[str(p)] for p in s.grid}
    k_opt = min(range(len(s.grid)), key=lambda k: (run.stage2[str(s.grid[k])], k))  # ties -> smaller p
    run.p_opt = s.grid[k_opt]
    for n in marked:
        acts[n].amax = grids[n][k_opt]
    _final_errors(run)


def _final_errors(run: PaperRun) -> None:
    """Per-utterance edits of the chosen model, for the bootstrap intervals."""
    if systems.PAPER not in run.state.errors:
        with folded_weight_quantizers(run.qsm.model), torch.inference_mode():
            final = run.scorer.errors([forward_logits(run.qsm.model, b) for b in run.dev])
        run.state.errors[systems.PAPER] = final.to_json()
        run.save()


PHASES = (Phase("calibrate", _calibrate), Phase("float", _float_reference), Phase("stage1", _stage1),
          Phase("stage2", _stage2))


def run_stablequant(
    sm: SpeechModel,
    calib_batches: Sequence,
    dev_batches: Sequence,
    settings: Settings | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> StableQuantResult:
    """Algorithm 1 on ``sm``; returns the quantized copy, the decisions and a ModelOpt config."""
    run = PaperRun(sm, calib_batches, dev_batches, settings, state_path, resume, PaperState, progress, paper=True)
    run_phases(run, PHASES)
    return StableQuantResult(
        settings=asdict(run.s), float_wer=run.state.float_wer, stage1=run.stage1, marked=run.marked,
        stage2=run.stage2, p_opt=run.p_opt, final_wer=run.stage2[str(run.p_opt)],
        amax={n: float(q.amax) for n, q in run.acts.items()},
        config=base_config(run.s, cutoff=float(run.p_opt), clip_layers=sorted(run.marked)),
        evaluations=run.evaluations, seconds=run.clock.seconds, dev_errors=dict(run.state.errors), model=run.qsm,
        histograms={n: histogram_arrays(run.cals[n]) for n in run.acts},
    )
