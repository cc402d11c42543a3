"""Mixed precision under a size budget: one format per layer, chosen from dev sensitivities.

Uniform bit widths waste bits where they are cheap and starve the layers that need them (on the
demo the CNN front end carries almost the whole W6A6 loss). ``stablequant quantize --budget-bits B``:

1. **Activations** are calibrated by the default recipe at W8A8 (:func:`recipes.search.layerwise.run_layerwise`):
   its histograms (collected once) and its chosen calibrator per activation quantizer give every
   activation scale of the menu (the same calibrator re-run on the same histogram at 6 bits for
   A6). Weights get MSE-optimal scales at each width, per output channel or, for the block
   formats (``-blk``), per block of up to 128 weights along the reduction dim (the block size
   from the layer's shape, :func:`calibrators.weight_block`).
2. **Sensitivity**: each layer alone at each format of the menu, every other layer float. From
   the same suffix-forward logits, two scores: the dev KL of the output distribution to fp32
   (the default recipe's score: fidelity, at best 0) and the change of the dev CTC loss of the
   transcripts from fp32's (auto_quantize's loss, :class:`recipes.search.autoquant.CtcLossChange`: it
   can be negative, a layer whose rounding helps the transcripts). The float prefix of each layer
   is served from cache (:class:`recipes.search.reuse.PrefixRunner`), so one layer × format costs one
   suffix forward. Finished scores go to the state file (``--resume``).
3. **Exact allocation**, once per score (``score``: ``auto`` both, or ``kl`` / ``ctc``): minimise
   the summed scores subject to the average weight bits (Σ bits·weights / Σ weights over every
   Linear/Conv weight, float counted as 16, a block format's fp16 scales as 16/block more bits
   per weight) ≤ B — a multiple-choice knapsack solved as an integer program with ``pulp`` (CBC).
4. **Verification** of each allocation on dev with every layer as allocated (dev KL, CTC change
   and WER from one forward); when the measured score misses the additive prediction, i.e.
   exceeds it by more than ``tolerance`` × |prediction| (the same rule for KL, where the
   prediction is ≥ 0, and for CTC, where it can be negative), a greedy repair fixes the layer
   with the largest predicted gain one format up, re-solves the rest under the same budget, and
   keeps the change only if the measured score falls.
5. **Choice** (``auto``): the verified allocation with the lower WER on the calibration
   utterances, whose transcripts neither score saw (the CTC allocation is fitted to the dev
   transcripts, so its dev WER is optimistic); a tie, or a calibration set without transcripts,
   goes to KL, the fidelity objective.

Under ``torchrun`` the dev (and calibration-check) utterances are sharded as in the default recipe
(:mod:`recipes.runtime.distributed`): each rank forwards its share for every layer × format, per-batch KL and
CTC sums and per-utterance edits are all-reduced, so every rank holds the one-process numbers, and
rank 0's allocation is broadcast so all ranks measure the same one; rank 0 writes.

Phases: default recipe W8A8, float, sensitivity, uniform, allocate + verify, pareto, final
(:mod:`recipes.search.engine` runs them and keeps the state file); the menu and its bit counts are
in :mod:`recipes.search.formats`, the allocation in :mod:`recipes.search.allocation`.

The output is a plain ModelOpt config with one entry per quantizer (bits, axis or block_sizes, enable) and the
"stablequant" algorithm's ``layer_calibrators`` / ``weight_calibrator``; a fresh
``mtq.quantize`` re-applies it. FP8 W8A8 (E4M3 per tensor, max ranges) is scored with
ModelOpt's own fake quant, which runs on the CPU (``fp8_note``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recipes.evaluation import systems
from recipes.evaluation.asr import forward_logits
from recipes.runtime.distributed import broadcast_from_main
from recipes.search.allocation import SCORE_CHOICES, SCORES, allocate, average_bits, choose_score
from recipes.search.engine import DevScorer, Phase, SearchRun, SearchState, Settings, result_json, run_phases
from recipes.search.fastquant import fast_fake_quant
from recipes.search.formats import (
    MENU,
    SCALE_BITS,
    UNIFORM_POINTS,
    Format,
    FormatSetter,
    block_sizes_cfg,
    format_bits,
    fp8_note,
    mixed_config,
)
from recipes.search.layerwise import CANDIDATES, SHIFT, LogitDivergence, run_layerwise, spec_entry, spec_label
from recipes.search.reuse import PrefixRunner
from recipes.speech.models import SpeechModel, layer_inventory
from sq_plugin.quantizers import E4M3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixedOptions:
    """What a mixed search is asked for beyond the settings (see :func:`run_mixed`)."""

    budget_bits: float
    tolerance: float
    max_repairs: int
    pareto_budgets: Sequence[float]
    block_scale_bits: float
    score: str
    variants_per_forward: int
    base_state: Path | None  # the default recipe's W8A8 state file
    resume_base: bool  # resume it (this run resumes, or compare hands in its own 8-bit run)


@dataclass
class MixedState(SearchState):
    # sensitivities are stored per layer and format, so a run with a larger menu reuses them
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> format -> dev KL
    sensitivity_ctc: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> format -> CTC change


@dataclass
class LayerFormat:
    layer: str
    kind: str
    weights: int
    format: str
    wbits: int | None
    abits: int | None
    predicted_kl: float  # this layer's dev KL at its format (others float)
    bits: float  # bits per weight as the budget counts them (block scales included)
    block: list[int] | None = None  # (axis, size) of the weight blocks of a block format
    predicted_ctc: float = 0.0  # this layer's dev CTC-loss change at its format (others float)


@dataclass
class MixedResult:
    recipe: str
    settings: dict
    budget_bits: float
    avg_weight_bits: float  # block scales counted at block_scale_bits per block
    avg_weight_bits_no_scales: float  # ModelOpt auto_quantize's count: grid bits only
    block_scale_bits: float
    compression_vs_fp32: float
    menu: list[str]
    fp8: str
    float_wer: float
    sensitivity: dict[str, dict[str, float]]  # layer -> format -> dev KL (that layer alone)
    choices: list[LayerFormat]
    predicted_kl: float
    final_kl: float
    final_wer: float
    repairs: list[dict]
    pareto: list[dict]  # {"budget", "avg_bits", "predicted_kl", "kl", "wer"} of allocations
    uniform: dict[str, dict]  # format -> {"avg_bits", "kl", "wer"} with every layer at it
    base: dict  # the default recipe's W8A8 run: dev KL / WER, weights, calibrators
    config: dict
    evaluations: int
    seconds: dict[str, float]
    dev_errors: dict[str, dict] = field(default_factory=dict)
    score: str = "kl"  # the score whose allocation was kept: "kl" or "ctc"
    score_reason: str = ""
    candidates: dict[str, dict] = field(default_factory=dict)  # score -> its verified allocation
    sensitivity_ctc: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> format -> CTC change
    predicted_ctc: float = 0.0
    final_ctc: float = 0.0  # measured dev CTC loss minus fp32's
    model: SpeechModel | None = None
    histograms: dict | None = None

    def to_json(self) -> dict:
        return result_json(self)


class MixedRun(SearchRun):
    """One mixed-precision run: the default recipe's W8A8 model, the menu, the per-layer scales of
    each format (computed once, cached), the scores and the allocations measured so far."""

    state: MixedState
    options: MixedOptions

    def act_amax(self, layer: str, bits) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The default recipe's calibrator for this input, re-run on its histogram at ``bits``;
        FP8 (``E4M3``): the histogram's max |x| (max calibration, ModelOpt's FP8 default)."""
        from sq_plugin import calibrator_class
        from sq_plugin.modelopt_private import calibrator_of

        if (layer, bits) not in self.act_cache:
            q = self.modules[layer].input_quantizer
            cal = calibrator_of(q)
            if bits == E4M3:
                self.act_cache[layer, bits] = (torch.as_tensor(float(cal.histogram.amax)).to(q.amax.device), None)
                return self.act_cache[layer, bits]
            name, kw, shift = self.chosen_spec[layer]
            searcher = calibrator_class(name)(num_bits=bits, unsigned=q.unsigned, num_bins=self.s.num_bins,
                                              shift=shift, **kw)
            if shift:
                amax, bias = searcher.search(cal.histogram, cal.signed_min)
                amax, bias = torch.as_tensor(float(amax)), torch.as_tensor(float(bias))
            else:
                amax, bias = torch.as_tensor(float(searcher.search(cal.histogram))), None
            device = q.amax.device  # the model's device (--device)
            self.act_cache[layer, bits] = (amax.to(device), None if bias is None else bias.to(device))
        return self.act_cache[layer, bits]

    def weight_amax(self, layer: str, fmt: Format) -> torch.Tensor:
        """MSE-optimal weight amax per output channel, or per block of a block format; FP8: the
        max |w| (per tensor, as ModelOpt's FP8 default)."""
        from calibrators import per_block_mse_amax, per_channel_mse_amax
        from sq_plugin.quantizers import amax_shape

        key = (layer, fmt.wbits, fmt.blocks, fmt.fp8)
        if key not in self.w_cache:
            m, original, wmax = self.modules[layer], self.setter.original[layer], self.weight_max[layer]
            if fmt.fp8:
                self.w_cache[key] = wmax.max().reshape(())
            elif fmt.blocks:
                self.w_cache[key] = per_block_mse_amax(original, *self.blocks[layer], fmt.wbits)
            else:
                shape = amax_shape(m.weight_quantizer, m.weight)
                self.w_cache[key] = per_channel_mse_amax(original, wmax.reshape(shape), fmt.wbits,
                                                         False).reshape(wmax.shape)
        return self.w_cache[key]

    def avg_bits(self, assign: dict[str, Format], per_layer=None) -> float:
        per_layer = per_layer or self.lbits
        return average_bits(self.sizes, [per_layer[i][assign[l].name] for i, l in enumerate(self.layers)])

    def measure(self, assign: dict[str, Format]) -> dict:
        """Dev KL, CTC-loss change and errors of one allocation, from one full forward."""
        self.evaluations += 1
        self.setter.fold(assign)
        logits = [forward_logits(self.model, b) for b in self.dev]
        return {"kl": self.divergence(logits), "ctc": self.ctc_change(logits), "err": self.scorer.errors(logits)}

    def solve(self, budget: float, by: str, fixed=None) -> dict[str, Format]:
        rows = [self.tables[by][l] for l in self.layers]
        # every rank holds the same scores; rank 0's solution is the one all ranks measure
        choice = broadcast_from_main(allocate(rows, self.sizes, self.lbits, budget, fixed))
        return {l: self.formats[f] for l, f in zip(self.layers, choice)}

    def predicted(self, assign: dict[str, Format], by: str = "kl") -> float:
        return sum(self.tables[by][l][assign[l].name] for l in self.layers)

    def check_wer(self, assign: dict[str, Format]) -> float | None:
        """WER on the calibration utterances (transcripts neither score saw), or None without them."""
        if self.check is None:
            return None
        self.setter.fold(assign)
        return self.check.wer([forward_logits(self.model, b) for b in self.check.batches])


def _base(run: MixedRun) -> None:
    """Activations: the default recipe at W8A8 (its own state file); then the layers, their weight
    counts, blocks, allowed formats and bits, and the format setter over the W8A8 model."""
    from calibrators import weight_block

    opts = run.options
    run.base = run_layerwise(run.sm, run.calib, run.scorer.all_batches, run.s, state_path=opts.base_state,
                             resume=opts.resume_base, progress=run.progress,
                             variants_per_forward=min(2, opts.variants_per_forward))
    run.qsm = run.base.model
    run.model = model = run.qsm.model
    run.layers = layers = [i.path for i in layer_inventory(model)]
    run.modules = modules = dict(model.named_modules())
    missing = [l for l in layers if not hasattr(modules[l], "weight_quantizer")
               or not hasattr(modules[l], "input_quantizer")]
    if missing:
        raise ValueError(f"layers without ModelOpt quantizers (not converted): {missing}")
    formats = run.formats
    run.sizes = [modules[l].weight.numel() for l in layers]
    run.blocks = {l: weight_block(modules[l].weight.shape) for l in layers}
    run.allowed = {l: [f for f in formats if not formats[f].blocks or run.blocks[l] is not None] for l in layers}
    run.lbits = [{f: format_bits(formats[f], run.blocks[l], opts.block_scale_bits) for f in run.allowed[l]}
                 for l in layers]
    run.grid_bits = [{f: float(formats[f].bits) for f in run.allowed[l]} for l in layers]
    specs = {spec_label(name, kw): (name, kw, False) for name, kw in CANDIDATES}
    specs.update({spec_label(name, kw) + SHIFT: (name, kw, True) for name, kw in CANDIDATES})
    run.chosen_spec = {c.layer: specs[c.chosen] for c in run.base.layers}
    run.act_cache, run.w_cache = {}, {}
    # weight amax from the recipe's weights: it may have set MSE amax at 8 bits; recover the max
    run.weight_max = {l: modules[l].weight.detach().abs().amax(
        dim=tuple(range(1, modules[l].weight.dim())), keepdim=True).reshape(modules[l].weight_quantizer.amax.shape)
        for l in layers}
    run.setter = FormatSetter(model, layers, run.act_amax, run.weight_amax, run.blocks)
    run.stack.enter_context(fast_fake_quant(model))
    run.stack.enter_context(torch.inference_mode())


def _float_reference(run: MixedRun) -> None:
    """fp32 logits: the KL and CTC references and the fp32 dev errors."""
    from recipes.search.autoquant import CtcLossChange

    run.setter.fold({})
    ref = [forward_logits(run.model, b) for b in run.dev]
    run.divergence = LogitDivergence(ref, run.scorer.shard)
    run.errors = {systems.FP32: run.scorer.errors(ref)}
    run.ctc_change = CtcLossChange(run.qsm, run.dev, ref, run.scorer.shard)


def _sensitivity(run: MixedRun) -> None:
    """Each layer alone at each format of the menu, every other layer float: dev KL and CTC change
    from the same suffix forward, a layer's formats side by side (``variants_per_forward``)."""
    runner = PrefixRunner(run.model, forward_logits, run.dev)
    sens, sens_ctc, allowed = run.state.sensitivity, run.state.sensitivity_ctc, run.allowed
    k = run.options.variants_per_forward
    todo = [(l, f) for l in run.layers for f in allowed[l] if f != "float"]
    stale = sum(1 for l, f in todo if f in sens.get(l, {}) and f not in sens_ctc.get(l, {}))
    if stale:
        log.warning("the state file has %d KL sensitivities without a CTC score (written before CTC "
                    "scoring): recomputing them", stale)
    bar = tqdm(total=len(todo), desc="per-layer sensitivity (layer x format)", disable=not run.progress)
    run.setter.fold({})
    for l in run.layers:
        done, done_ctc = sens.setdefault(l, {"float": 0.0}), sens_ctc.setdefault(l, {"float": 0.0})
        mine = [f for f in allowed[l] if f != "float"]
        missing = [f for f in mine if f not in done or f not in done_ctc]
        bar.update(len(mine) - len(missing))
        for group in (missing[i:i + k] for i in range(0, len(missing), k)):
            outs = runner.run_variants(l, [lambda f=f: run.setter.fold_layer(l, run.formats[f]) for f in group])
            for f, logits in zip(group, outs):
                run.evaluations += 1
                done[f], done_ctc[f] = run.divergence(logits), run.ctc_change(logits)
            run.save()
            bar.update(len(group))
        run.setter.fold_layer(l, run.formats["float"])
    bar.close()
    runner.clear()
    run.sensitivity = {l: {f: sens[l][f] for f in allowed[l]} for l in run.layers}
    run.sensitivity_ctc = {l: {f: sens_ctc[l][f] for f in allowed[l]} for l in run.layers}
    run.tables = {"kl": run.sensitivity, "ctc": run.sensitivity_ctc}


def _uniform(run: MixedRun) -> None:
    """Every layer at one format (the uniform references of the Pareto plot)."""
    run.uniform = {}
    for name in UNIFORM_POINTS:
        if name in run.formats:
            m = run.measure({l: run.formats[name] for l in run.layers})
            run.uniform[name] = {"avg_bits": float(run.formats[name].bits), "kl": m["kl"], "ctc": m["ctc"],
                                 "wer": m["err"].wer}
            run.errors[systems.uniform(name)] = m["err"]


def _repair_step(run: MixedRun, by: str, assign: dict, m: dict, fixed: dict, tried: set):
    """One greedy repair: the layer whose next better format has the largest predicted gain, one
    format up, the rest re-solved under the same budget. Returns (step, trial, measured) or None."""
    table, lbits = run.tables[by], run.lbits
    gains = []
    for i, l in enumerate(run.layers):
        if i in tried:
            continue
        better = [f for f in run.allowed[l] if lbits[i][f] > lbits[i][assign[l].name]]
        if better:
            f = min(better, key=lambda g: table[l][g])
            gains.append((table[l][assign[l].name] - table[l][f], i, f))
    if not gains or max(gains)[0] <= 0:
        return None  # no upgrade is predicted to help
    gain, i, f = max(gains)
    try:
        trial = run.solve(run.options.budget_bits, by, {**fixed, i: f})
    except ValueError:
        return None
    t = run.measure(trial)
    step = {"score": by, "layer": run.layers[i], "to": f, "bits_from": lbits[i][assign[run.layers[i]].name],
            "bits_to": lbits[i][f], "predicted_gain": gain, "before": m[by], "after": t[by],
            "kl_before": m["kl"], "kl_after": t["kl"], "kept": t[by] < m[by]}
    return step, i, f, trial, t


def _verify(run: MixedRun, by: str) -> dict:
    """Allocate by score ``by``, measure on dev, repair while the measured score misses the
    prediction by more than ``tolerance`` × |prediction| (CTC predictions can be < 0)."""
    opts = run.options
    assign = run.solve(opts.budget_bits, by)
    pred, m = run.predicted(assign, by), run.measure(assign)
    repairs: list[dict] = []
    fixed: dict[int, str] = {}  # kept upgrades stay pinned for later re-solves
    tried: set[int] = set()
    while m[by] > pred + opts.tolerance * abs(pred) and len(repairs) < opts.max_repairs:
        found = _repair_step(run, by, assign, m, fixed, tried)
        if found is None:
            break
        step, i, f, trial, t = found
        repairs.append(step)
        tried.add(i)
        if t[by] < m[by]:
            fixed[i] = f
            assign, m, pred = trial, t, run.predicted(trial, by)
    counts = dict(Counter(assign[l].name for l in run.layers))
    return {"assign": assign, "measured": m, "repairs": repairs, "json": {
        "score": by, "dev_wer": m["err"].wer, "dev_kl": m["kl"], "dev_ctc": m["ctc"], "predicted": pred,
        "calib_wer": run.check_wer(assign), "calib_fp32_wer": run.calib_fp32_wer,
        "predicted_kl": run.predicted(assign, "kl"), "predicted_ctc": run.predicted(assign, "ctc"),
        "avg_weight_bits": run.avg_bits(assign), "formats": counts,
        "assignment": {l: assign[l].name for l in run.layers}, "repairs": repairs}}


def _allocate(run: MixedRun) -> None:
    """Allocate by each score, verify and repair, keep the one with the lower calibration WER."""
    score = run.options.score
    try:  # the choice between scores is checked on transcripts neither score saw
        run.check = DevScorer(run.sm, run.calib) if score == "auto" else None
    except ValueError:
        run.check = None  # calibration utterances without transcripts: kl (choose_score)
    run.calib_fp32_wer = run.check_wer({})
    run.verified = {by: _verify(run, by) for by in (SCORES if score == "auto" else (score,))}
    run.chosen, run.reason = choose_score({by: v["json"] for by, v in run.verified.items()})
    log.info("mixed precision: allocation by %s (%s)", run.chosen, run.reason)
    kept = run.verified[run.chosen]
    run.assign, run.measured, run.repairs = kept["assign"], kept["measured"], kept["repairs"]
    if len(run.verified) > 1:
        run.errors.update({systems.mixed_by(by): v["measured"]["err"] for by, v in run.verified.items()})
    run.errors[systems.MIXED] = run.measured["err"]


def _pareto(run: MixedRun) -> None:
    """Other budgets, allocated by the chosen score and measured (no repair)."""
    budget, chosen = run.options.budget_bits, run.chosen
    run.pareto = []
    for b in tqdm(sorted(set(run.options.pareto_budgets) - {budget}), desc="Pareto budgets",
                  disable=not run.progress):
        try:
            other = run.solve(b, chosen)
        except ValueError:
            continue
        p = run.measure(other)
        run.pareto.append({"budget": b, "avg_bits": run.avg_bits(other), "score": chosen,
                           "predicted": run.predicted(other, chosen), "predicted_kl": run.predicted(other),
                           "kl": p["kl"], "ctc": p["ctc"], "wer": p["err"].wer})


def _final(run: MixedRun) -> None:
    """The kept allocation on the Pareto list; the model's quantizers at its formats (saveable)."""
    m, assign = run.measured, run.assign
    run.pareto.append({"budget": run.options.budget_bits, "avg_bits": run.avg_bits(assign), "score": run.chosen,
                       "predicted": run.predicted(assign, run.chosen), "predicted_kl": run.predicted(assign),
                       "kl": m["kl"], "ctc": m["ctc"], "wer": m["err"].wer})
    run.pareto.sort(key=lambda p: p["budget"])
    run.setter.as_quantizers(assign)


PHASES = (Phase("default recipe W8A8", _base), Phase("float", _float_reference),
          Phase("sensitivity", _sensitivity), Phase("uniform", _uniform), Phase("allocate + verify", _allocate),
          Phase("pareto", _pareto), Phase("final", _final))


def _result(run: MixedRun) -> MixedResult:
    assign, layers, base, m = run.assign, run.layers, run.base, run.measured
    layer_cal = {c.quantizer: spec_entry(*run.chosen_spec[c.layer]) for c in base.layers}
    block_cfg = {l: block_sizes_cfg(run.blocks[l], run.modules[l].weight.dim())
                 for l in layers if run.blocks[l] is not None}
    choices = [LayerFormat(l, run.kinds.get(l, "other"), n, assign[l].name, assign[l].wbits, assign[l].abits,
                           run.sensitivity[l][assign[l].name], run.lbits[i][assign[l].name],
                           list(run.blocks[l]) if assign[l].blocks else None, run.sensitivity_ctc[l][assign[l].name])
               for i, (l, n) in enumerate(zip(layers, run.sizes))]
    avg = run.avg_bits(assign)
    return MixedResult(
        recipe="mixed", settings=asdict(run.s), budget_bits=float(run.options.budget_bits), avg_weight_bits=avg,
        avg_weight_bits_no_scales=run.avg_bits(assign, run.grid_bits),
        block_scale_bits=float(run.options.block_scale_bits), compression_vs_fp32=32.0 / avg,
        menu=list(run.formats), fp8=fp8_note(), float_wer=run.errors[systems.FP32].wer, sensitivity=run.sensitivity,
        choices=choices, predicted_kl=run.predicted(assign), final_kl=m["kl"], final_wer=m["err"].wer,
        repairs=run.repairs, pareto=run.pareto, uniform=run.uniform,
        base={"final_kl": base.final_kl, "final_wer": base.final_wer, "weight_calibrator": base.weight_calibrator,
              "layer_calibrators": {c.quantizer: c.chosen for c in base.layers}, "seconds": base.seconds},
        config=mixed_config(run.s, assign, layer_cal, "mse", block_cfg), evaluations=run.evaluations + base.evaluations,
        seconds=run.clock.seconds, dev_errors={k: v.to_json() for k, v in run.errors.items()},
        score=run.chosen, score_reason=run.reason, candidates={by: v["json"] for by, v in run.verified.items()},
        sensitivity_ctc=run.sensitivity_ctc, predicted_ctc=run.predicted(assign, "ctc"), final_ctc=m["ctc"],
        model=run.qsm, histograms=base.histograms,
    )


def run_mixed(
    sm: SpeechModel,
    calib_batches: Sequence,
    dev_batches: Sequence,
    budget_bits: float,
    settings: Settings | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    menu: Sequence[str] = tuple(MENU),
    tolerance: float = 0.25,
    max_repairs: int = 3,
    pareto_budgets: Sequence[float] = (4.0, 5.0, 6.0, 7.0, 8.0),
    block_scale_bits: float = SCALE_BITS,
    score: str = "auto",
    variants_per_forward: int = 8,
    base_state_path: str | Path | None = None,
) -> MixedResult:
    """Mixed precision of ``sm`` under ``budget_bits`` average bits per weight (see module doc).

    ``block_scale_bits``: what the budget charges per block scale of a block format (0: ModelOpt
    auto_quantize's count). It only moves the allocation, so runs that differ in it share the state.
    ``variants_per_forward``: formats of one layer scored side by side in one suffix forward of
    that many copies of each dev batch (:meth:`PrefixRunner.run_variants`; 1: one at a time, the
    least memory). ``base_state_path``: a state file of the default recipe at W8A8 on the same model,
    data and settings (``compare``'s own 8-bit run), resumed instead of searching again (default:
    ``state_w8a8.json`` beside ``state_path``). ``score``: ``kl`` or ``ctc`` allocates with that
    sensitivity; ``auto`` verifies both and keeps the lower WER on the calibration utterances (ties:
    ``kl``; :func:`choose_score`). Both scores are always computed (same forwards) and stored.
    """
    if variants_per_forward < 1:
        raise ValueError(f"variants_per_forward must be >= 1; got {variants_per_forward}")
    if score not in SCORE_CHOICES:
        raise ValueError(f"score must be one of {SCORE_CHOICES}; got {score!r}")
    unknown = [m for m in menu if m not in MENU]
    if unknown or "float" not in menu:
        raise ValueError(f"menu must include 'float' and only formats of {list(MENU)}; got {list(menu)}")
    base_settings = Settings(**{**asdict(settings or Settings()), "wbits": 8, "abits": 8})
    base_state = Path(base_state_path) if base_state_path else \
        Path(state_path).with_name("state_w8a8.json") if state_path else None
    run = MixedRun(sm, calib_batches, dev_batches, base_settings, state_path, resume, MixedState, progress,
                   recipe="mixed")  # menu-free: scores are per format
    run.formats = {m: MENU[m] for m in menu}
    run.options = MixedOptions(budget_bits, tolerance, max_repairs, pareto_budgets, block_scale_bits, score,
                               variants_per_forward, base_state, resume or base_state_path is not None)
    run_phases(run, PHASES)
    return _result(run)


def run_mixed_recipe(sm: SpeechModel, calib: Sequence, dev: Sequence, budget_bits: float,
                     settings: Settings | None = None, state_path: str | Path | None = None, resume: bool = False,
                     seed: int = 0, progress: bool = True, block_scale_bits: float = SCALE_BITS,
                     score: str = "auto", variants_per_forward: int = 8) -> tuple[MixedResult, dict]:
    """:func:`run_mixed` plus the report meta: dev WERs with paired-bootstrap intervals vs fp32."""
    from recipes.evaluation.asr import UtteranceErrors, intervals

    start = time.perf_counter()
    result = run_mixed(sm, calib, dev, budget_bits, settings, state_path=state_path, resume=resume,
                       progress=progress, block_scale_bits=block_scale_bits, score=score,
                       variants_per_forward=variants_per_forward)
    elapsed = time.perf_counter() - start
    errors = {k: UtteranceErrors.from_json(v) for k, v in result.dev_errors.items()}
    meta = {"model": sm.source or sm.name, "arch": sm.arch, "recipe": "mixed", "budget_bits": budget_bits,
            "block_scale_bits": block_scale_bits, "mixed_score": score,
            "calib_utterances": sum(len(b.ids) for b in calib), "dev_utterances": sum(len(b.ids) for b in dev),
            "seconds": round(elapsed, 1),
            "dev": {k: {"wer": e.wer, "cer": e.cer, "words": int(e.words.sum()),
                        "word_errors": int(e.word_edits.sum())} for k, e in errors.items()},
            "dev_intervals": intervals(errors, systems.FP32,
                                      [k for k in errors if k not in (systems.FP32, systems.MIXED)], seed=seed)}
    return result, meta
