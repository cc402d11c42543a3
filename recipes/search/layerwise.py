"""The default recipe: the best calibrator per layer, chosen by how far the logits move from fp32.

What it adds to the paper (``--recipe paper``, :mod:`recipes.search.paper`):

1. **A smooth selection score.** Every decision minimises the mean per-frame KL divergence of the
   quantized model's output distribution from the fp32 model's on the dev set, instead of the
   argmin of dev WER. WER moves in whole words (one word is ~0.1-0.2 points on a small dev set), so
   the paper's argmin over 51 cut-offs picks noise; the KL over every dev frame changes smoothly
   with the scales and needs no transcripts to be right.
2. **A start no worse than any baseline.** Every activation quantizer is first set by one uniform
   method (max, percentile 99.99, MSE, entropy; weights per-channel max), then the best of them
   with per-channel MSE-optimal weights; the lowest dev KL is the start.
3. **The best calibrator per layer.** Then, in model order, each activation quantizer walks its
   candidate scales from its one histogram (max, percentiles, MSE, entropy, StableQuant cut-off +
   MSE at several p), ordered by amax, from the current one while the dev KL falls by more than
   one standard error of the paired per-batch difference (lower by noise is not lower), with every
   other layer quantized as currently chosen. The prefix cache (:class:`recipes.search.reuse.PrefixRunner`)
   serves the already decided layers before it, so each candidate costs one suffix forward. The
   score never rises: the result is at most the best uniform baseline's dev KL.

The output is the same kind of plain ModelOpt config as the paper's (``"layer_calibrators"`` names a
registered calibrator per quantizer, ``"weight_calibrator"`` the weight scales); ``mtq.quantize``
with ``import sq_plugin`` re-computes the same scales from the calibration data. Still symmetric
per-tensor activations and per-channel weights, as TensorRT deploys them. Phases: calibrate,
float, starts, layers, final (:mod:`recipes.search.engine` runs them and keeps the state file).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recipes.evaluation import systems
from recipes.evaluation.asr import forward_logits
from recipes.runtime.distributed import DevShard
from recipes.search.calibrate import base_config, calibrated_copy, folded_weight_quantizers, histogram_arrays
from recipes.search.engine import Phase, SearchRun, SearchState, Settings, result_json, run_phases
from recipes.search.fastquant import fast_fake_quant
from recipes.search.reuse import PrefixRunner
from recipes.speech.models import SpeechModel

log = logging.getLogger(__name__)

PERCENTILE = 99.99
# The baselines of the paper's Table II as (registered calibrator, kwargs); the uniform starts.
BASELINE_SPECS = {"max": ("max", {}), "percentile": ("percentile", {"percentile": PERCENTILE}),
                  "mse": ("mse", {}), "entropy": ("entropy", {})}
UNIFORM = tuple(BASELINE_SPECS.values())
# Per-layer candidates: every baseline plus StableQuant's clip + MSE at cut-offs spread over the
# paper's grid [0, 0.5] %, and percentiles either side of 99.99.
CANDIDATES = UNIFORM + (
    ("percentile", {"percentile": 99.9}),
    ("percentile", {"percentile": 99.999}),
    *(("stablequant", {"cutoff": p}) for p in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)),
)


def spec_label(name: str, kwargs: dict) -> str:
    """``entropy``, ``percentile 99.9``, ``stablequant p=0.05``: one way to name a candidate."""
    if name == "stablequant":
        return f"stablequant p={kwargs['cutoff']}"
    return " ".join([name, *(str(v) for v in kwargs.values())])


SHIFT = " +shift"
# A quantizer is offered shifted (one-sided) candidates when its data barely goes negative:
# min(x) >= -ONE_SIDED * max|x|, where the shift narrows the range by at least a quarter.
ONE_SIDED = 0.5


def calibrator_amax(cal, name: str, kwargs: dict, num_bins: int | None = None, shift: bool = False):
    """Amax of registered calibrator ``name`` on the histogram ``cal`` already collected.

    ``shift=True``: ``(amax, bias)`` of its one-sided range (see ``calibrators.shifted_range``).
    """
    from sq_plugin import calibrator_class
    from sq_plugin.modelopt_private import calibrator_bits

    num_bits, unsigned = calibrator_bits(cal)
    searcher = calibrator_class(name)(num_bits=num_bits, unsigned=unsigned,
                                      num_bins=num_bins or cal.histogram.num_bins, shift=shift, **kwargs)
    return searcher.search(cal.histogram, cal.signed_min) if shift else searcher.search(cal.histogram)


def one_sided(cal) -> bool:
    """Whether shifted candidates are worth trying for the data this calibrator collected."""
    return cal.histogram.amax > 0 and cal.signed_min >= -ONE_SIDED * cal.histogram.amax


def spec_entry(name: str, kwargs: dict, shift: bool = False) -> dict:
    """The ``layer_calibrators`` entry that re-creates this candidate in ModelOpt."""
    return {"calibrator": name, **kwargs, **({"shift": True} if shift else {})}


def layer_candidates(cal, num_bins: int, shifted: bool) -> dict[str, tuple[float, float]]:
    """label -> (amax, bias) of every candidate for one quantizer, from its one histogram."""
    out = {spec_label(name, kw): (calibrator_amax(cal, name, kw, num_bins), 0.0) for name, kw in CANDIDATES}
    if shifted:
        out.update({spec_label(name, kw) + SHIFT: calibrator_amax(cal, name, kw, num_bins, shift=True)
                    for name, kw in CANDIDATES})
    return out


def walk_ladder(labels: list[str], start: str, better, prefetch=None) -> str:
    """From ``start``, step along ``labels`` (ordered by amax) while ``better(next, current)``.

    ``prefetch(labels)``, if given, is told which labels the walk may compare next, before it
    compares them (both neighbours first, then the next two along the way), so a caller can score
    them side by side; it does not change the walk.
    """
    i = labels.index(start)
    inside = lambda js: [labels[j] for j in js if 0 <= j < len(labels)]  # noqa: E731
    if prefetch is not None:
        prefetch(inside([i - 1, i + 1]))
    for direction in (-1, 1):
        j = i
        while 0 <= j + direction < len(labels):
            if prefetch is not None:
                prefetch(inside([j + direction, j + 2 * direction]))
            if not better(labels[j + direction], labels[j]):
                break
            j += direction
        if j != i:
            return labels[j]
    return start


class LogitDivergence:
    """Mean per-frame KL(fp32 || quantized) of the CTC output distributions over a dev set.

    ``shard`` (under torchrun): the logits are this rank's batches; per-batch sums are
    all-reduced and added in global batch order, exactly as one process adds them.
    """

    def __init__(self, reference_logits: Sequence[torch.Tensor], shard: DevShard | None = None):
        self.ref = [F.log_softmax(l.float(), dim=-1) for l in reference_logits]
        self.shard = shard or DevShard.whole(len(self.ref))
        self.frames = int(sum(self.shard.per_batch([r.shape[0] * r.shape[1] for r in self.ref])))
        if not self.frames:
            raise ValueError("the dev set produced no output frames")

    def __call__(self, logits: Sequence[torch.Tensor]) -> float:
        return self.mean(self.batch_sums(logits))

    def batch_sums(self, logits: Sequence[torch.Tensor]) -> list[float]:
        """KL summed over each dev batch's frames, in global batch order (the paired units)."""
        if len(logits) != len(self.ref):
            raise ValueError(f"{len(logits)} outputs for {len(self.ref)} dev batches")
        sums = [(ref.exp() * (ref - F.log_softmax(out.float(), dim=-1))).sum() for ref, out in zip(self.ref, logits)]
        sums = torch.stack(sums).double().cpu().tolist() if sums else []  # one host sync per evaluation
        return self.shard.per_batch(sums)

    def mean(self, batch_sums: Sequence[float]) -> float:
        total = 0.0
        for value in batch_sums:
            total += value
        return total / self.frames

    def clearly_lower(self, new: Sequence[float], old: Sequence[float]) -> bool:
        """The one-standard-error rule: ``new`` is lower than ``old`` by more than the standard
        error of the paired difference over dev batches, not just lower (noise would do that)."""
        d = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
        if len(d) < 2:
            return bool(d.sum() < 0)
        se = math.sqrt(len(d) * d.var(ddof=1)) / self.frames
        return d.sum() / self.frames < -se


def distinct_candidates(amaxes: dict[str, float], num_bits: int) -> dict[str, float]:
    """Drop candidates within a quarter quantization step of one kept earlier (same grid)."""
    qmax = 2 ** (num_bits - 1) - 1
    kept: dict[str, float] = {}
    for label, a in amaxes.items():
        if all(abs(a - b) > 0.25 * max(a, b) / qmax for b in kept.values()):
            kept[label] = a
    return kept


@dataclass
class DefaultState(SearchState):
    starts: dict[str, dict] = field(default_factory=dict)  # "act/weights" -> {"kl", "wer"}
    start_batches: dict[str, list[float]] = field(default_factory=dict)  # "act/weights" -> per-batch KL sums
    layer_batches: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # quantizer -> label -> sums


@dataclass
class LayerChoice:
    quantizer: str
    layer: str
    kind: str
    chosen: str  # candidate label
    amax: float
    shift: float  # quantized x - shift (0: a symmetric range)
    kl: dict[str, float]  # candidate label -> dev KL with this layer at that candidate


@dataclass
class LayerwiseResult:
    recipe: str
    settings: dict
    float_wer: float
    starts: dict[str, dict]  # "act/weights" -> {"kl", "wer"}
    start: str
    weight_calibrator: str
    layers: list[LayerChoice]
    final_kl: float
    final_wer: float
    amax: dict[str, float]
    config: dict
    evaluations: int
    seconds: dict[str, float]
    dev_errors: dict[str, dict] = field(default_factory=dict)  # system -> per-utterance edits
    model: SpeechModel | None = None
    histograms: dict | None = None

    def to_json(self) -> dict:
        return result_json(self)


def start_key(act_label: str, weight_method: str) -> str:
    """The state's key of a uniform start: activation candidate label / weight calibrator."""
    return f"{act_label}/{weight_method}"


def split_start_key(key: str) -> tuple[str, str]:
    act_label, weight_method = key.rsplit("/", 1)
    return act_label, weight_method


class DefaultRun(SearchRun):
    """One default-recipe run: the calibrated copy, every quantizer's candidates, the choices so far."""

    state: DefaultState
    variants_per_forward: int = 2

    def outputs(self, module_path: str | None) -> list[torch.Tensor]:
        """Dev logits of the model as set now; the prefix before ``module_path`` from cache."""
        self.evaluations += 1
        with torch.inference_mode():
            return self.runner.run(module_path)

    def set_weights(self, method: str) -> None:
        for n, (_, q) in self.weights.items():
            q.amax = self.weight_amax[method][n]

    def own_label(self, n: str, label: str) -> str:
        """A shifted label on a quantizer without shifted candidates means its plain twin."""
        return label if label in self.candidates[n] else label.removesuffix(SHIFT)

    def apply(self, n: str, label: str) -> None:
        amax, bias = self.candidates[n][label]
        self.acts[n].amax = amax
        if n in self.shiftable:
            self.acts[n].bias_value = torch.tensor(bias)


def _calibrate(run: DefaultRun) -> None:
    """One calibration pass; every quantizer's candidates from its histogram; weight amax by max
    and by per-channel MSE."""
    from sq_plugin.modelopt_private import calibrator_of
    from sq_plugin.quantizers import set_mse_weight_amax, set_shift, weight_quantizers

    run.qsm, run.acts, run.quantizers, run.enabled = calibrated_copy(run.sm, run.calib, run.s)
    model = run.qsm.model
    run.shiftable = {n for n, q in run.acts.items() if one_sided(calibrator_of(q))}
    run.candidates = {n: layer_candidates(calibrator_of(q), run.s.num_bins, n in run.shiftable)
                      for n, q in run.acts.items()}
    run.specs = {spec_label(name, kw): (name, kw, False) for name, kw in CANDIDATES}
    run.specs.update({spec_label(name, kw) + SHIFT: (name, kw, True) for name, kw in CANDIDATES})
    for n in run.shiftable:
        set_shift(run.acts[n], 0.0)  # a zero shift is exact (x - 0 + 0); candidates then move it
    run.weights = weight_quantizers(model)
    run.weight_amax = {"max": {n: q.amax.clone() for n, (_, q) in run.weights.items()}}
    set_mse_weight_amax(model)
    run.weight_amax["mse"] = {n: q.amax.clone() for n, (_, q) in run.weights.items()}
    run.runner = PrefixRunner(model, forward_logits, run.dev)
    run.stack.enter_context(fast_fake_quant(model))


def _float_reference(run: DefaultRun) -> None:
    """fp32 logits (every quantizer off): the KL reference and the fp32 dev errors."""
    model = run.qsm.model
    for q in run.quantizers.values():
        q.disable()
    with torch.inference_mode():
        ref_logits = [forward_logits(model, b) for b in run.dev]
    run.divergence = LogitDivergence(ref_logits, run.scorer.shard)
    run.errors = {systems.FP32: run.scorer.errors(ref_logits)}
    for n, q in run.quantizers.items():
        q.enable() if n in run.enabled else q.disable()


def _score_start(run: DefaultRun, label: str, weight_method: str) -> None:
    """Dev KL and WER with every activation quantizer at candidate ``label`` (its plain twin where
    the quantizer has no shifted candidates) and the weights at ``weight_method``."""
    key = start_key(label, weight_method)
    if key in run.state.starts:
        return
    run.set_weights(weight_method)
    for n in run.acts:
        run.apply(n, run.own_label(n, label))
    with folded_weight_quantizers(run.qsm.model):
        logits = run.outputs(None)
    errs = run.scorer.errors(logits)
    sums = run.divergence.batch_sums(logits)
    run.state.starts[key] = {"kl": run.divergence.mean(sums), "wer": errs.wer}
    run.state.start_batches[key] = sums
    run.state.errors[key] = errs.to_json()
    run.save()


def _starts(run: DefaultRun) -> None:
    """Uniform starts: one method for every activation quantizer (weights per-channel max), each also
    shifted where the data is one-sided; then the best of them with MSE-optimal weights. The lowest
    dev KL is where the per-layer search starts."""
    uniform = [spec_label(name, kw) for name, kw in UNIFORM]
    for label in tqdm(uniform + [u + SHIFT for u in uniform if run.shiftable], desc="uniform starts",
                      disable=not run.progress):
        _score_start(run, label, "max")
    starts = run.state.starts
    best_act, _ = split_start_key(min(starts, key=lambda k: starts[k]["kl"]))  # ties: the first
    _score_start(run, best_act, "mse")
    run.start = min(starts, key=lambda k: starts[k]["kl"])
    start_label, run.w_method = split_start_key(run.start)
    run.set_weights(run.w_method)
    run.chosen = {n: run.own_label(n, start_label) for n in run.acts}
    for n in run.acts:
        run.apply(n, run.chosen[n])
    run.current_batches = run.state.start_batches[run.start]


class LayerWalk:
    """The candidate search of one activation quantizer, every other one as currently chosen: the
    dev KL per batch of each label it scores (from the state when done before), the one-standard-
    error comparison, and side-by-side scoring of the labels the walk compares next."""

    def __init__(self, run: DefaultRun, n: str):
        self.run, self.n, self.layer = run, n, n.rsplit(".", 1)[0]
        self.done = run.state.layer_batches.setdefault(n, {})
        self.per_batch = {run.chosen[n]: run.current_batches}

    def batches_of(self, label: str) -> list[float]:
        run = self.run
        if label not in self.per_batch:
            if label not in self.done:
                run.apply(self.n, label)
                self.done[label] = run.divergence.batch_sums(run.outputs(self.layer))
                run.save()
            self.per_batch[label] = self.done[label]
        return self.per_batch[label]

    def better(self, new: str, old: str) -> bool:
        return self.run.divergence.clearly_lower(self.batches_of(new), self.batches_of(old))

    def prefetch(self, labels: list[str]) -> None:
        """Score the walk's next unscored labels side by side, once two or more are due (one suffix
        forward of copies of each batch; one alone waits for batches_of)."""
        run = self.run
        due = [label for label in labels if label not in self.per_batch and label not in self.done]
        if len(due) < 2:
            return
        with torch.inference_mode():
            outs = run.runner.run_variants(self.layer, [lambda label=label: run.apply(self.n, label) for label in due])
        for label, logits in zip(due, outs):
            run.evaluations += 1
            self.done[label] = run.divergence.batch_sums(logits)
        run.save()

    def ladder(self, shifted: bool) -> list[str]:
        """The distinct candidates of one kind (plain or shifted), ordered by amax."""
        n, chosen = self.n, self.run.chosen[self.n]
        same = {k: a for k, (a, _) in self.run.candidates[n].items() if k.endswith(SHIFT) == shifted}
        kept = distinct_candidates(same, self.run.acts[n].num_bits)
        if shifted == chosen.endswith(SHIFT):
            kept.setdefault(chosen, same[chosen])
        return sorted(kept, key=kept.get)

    def best(self) -> str:
        """Walk the ladder of the current kind while the dev KL clearly falls, then try the other
        kind of the winner and walk that ladder if it is better."""
        run, n, chosen = self.run, self.n, self.run.chosen[self.n]
        ahead = self.prefetch if run.variants_per_forward > 1 else None
        best = walk_ladder(self.ladder(chosen.endswith(SHIFT)), chosen, self.better, ahead)
        if n in run.shiftable:
            twin = best.removesuffix(SHIFT) if best.endswith(SHIFT) else best + SHIFT
            if self.better(twin, best):
                other = self.ladder(twin.endswith(SHIFT))
                best = walk_ladder(other if twin in other else sorted([*other, twin],
                                   key=lambda k: run.candidates[n][k][0]), twin, self.better, ahead)
        return best


def _layers(run: DefaultRun) -> None:
    """The best candidate per activation quantizer, in model order (the prefix before it cached)."""
    run.layers = []
    with folded_weight_quantizers(run.qsm.model):
        for n in tqdm(list(run.acts), desc="per-layer calibrator search", disable=not run.progress):
            walk = LayerWalk(run, n)
            best = walk.best()
            run.chosen[n], run.current_batches = best, walk.per_batch[best]
            run.apply(n, best)
            kl = {label: run.divergence.mean(v) for label, v in walk.per_batch.items()}
            run.layers.append(LayerChoice(n, walk.layer, run.kinds.get(walk.layer, "other"), best,
                                          *run.candidates[n][best], kl))
    run.runner.clear()


def _final(run: DefaultRun) -> None:
    """Dev KL and errors of the chosen model, from one forward."""
    with folded_weight_quantizers(run.qsm.model), torch.inference_mode():
        final_logits = [forward_logits(run.qsm.model, b) for b in run.dev]
    run.errors[systems.DEFAULT] = run.scorer.errors(final_logits)
    run.final_kl = run.divergence(final_logits)


PHASES = (Phase("calibrate", _calibrate), Phase("float", _float_reference), Phase("starts", _starts),
          Phase("layers", _layers), Phase("final", _final))


def run_layerwise(
    sm: SpeechModel,
    calib_batches: Sequence,
    dev_batches: Sequence,
    settings: Settings | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    variants_per_forward: int = 2,
) -> LayerwiseResult:
    """The default recipe on ``sm``: best uniform start, then the best calibrator per layer.

    ``variants_per_forward`` 2 (default): the walk's next two candidates of a layer (its two
    neighbours on the ladder first) are scored side by side in one suffix forward of two copies
    of each dev batch (:meth:`PrefixRunner.run_variants`), which costs less than two forwards
    even when one of them turns out unneeded; 1: one candidate per forward, as needed."""
    from sq_plugin.modelopt_private import calibrator_of

    run = DefaultRun(sm, calib_batches, dev_batches, settings, state_path, resume, DefaultState, progress,
                     recipe="default")
    run.variants_per_forward = variants_per_forward
    run_phases(run, PHASES)
    config = base_config(run.s, layer_calibrators={n: spec_entry(*run.specs[run.chosen[n]]) for n in run.acts},
                         weight_calibrator=run.w_method)
    dev_errors = {k: v.to_json() for k, v in run.errors.items()}
    dev_errors.update(run.state.errors)
    return LayerwiseResult(
        recipe="default", settings=asdict(run.s), float_wer=run.errors[systems.FP32].wer, starts=dict(run.state.starts),
        start=run.start, weight_calibrator=run.w_method, layers=run.layers, final_kl=run.final_kl,
        final_wer=run.errors[systems.DEFAULT].wer, amax={n: float(q.amax) for n, q in run.acts.items()},
        config=config, evaluations=run.evaluations, seconds=run.clock.seconds, dev_errors=dev_errors,
        model=run.qsm, histograms={n: histogram_arrays(calibrator_of(q)) for n, q in run.acts.items()},
    )
