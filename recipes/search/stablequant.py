"""StableQuant, Algorithm 1: WER-driven layer selection, then one cut-off for the marked layers.

Histograms are collected once (one calibration pass through ModelOpt with the "stablequant"
algorithm); every candidate scale afterwards comes from those histograms. Stage 1 serves the
float prefix of each layer from cache (:mod:`recipes.search.reuse`); Stage 2 skips cut-offs whose
scales equal an already evaluated candidate. Every finished evaluation goes to a state file, so
a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from recipes.evaluation.asr import UtteranceErrors, decode_logits, forward_logits, utterance_errors
from recipes.runtime.atomic import write_json_atomic
from recipes.runtime.distributed import DevShard, barrier, current_ranks
from recipes.search.fastquant import fast_fake_quant
from recipes.search.grid import parse_grid, validate_grid
from recipes.search.qconfig import quantize_copy, stablequant_config
from recipes.search.reuse import PrefixRunner
from recipes.speech.models import SpeechModel, layer_inventory
from recipes.speech.text import text_codec

log = logging.getLogger(__name__)


@dataclass
class Settings:
    wbits: int = 8
    abits: int = 8
    gamma: float = 0.25  # absolute WER % rise that marks a layer in Stage 1
    grid: list[float] = field(default_factory=lambda: parse_grid("0:0.5:0.01"))
    num_bins: int = 2048
    naive_stage1: bool = False  # re-run the whole model per layer (benchmark reference)
    equalize: list[str] = field(default_factory=list)  # activation quantizers equalised per channel
    equalize_alpha: float = 0.5

    def validate(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0 (absolute WER %), got {self.gamma}")
        self.grid = validate_grid(self.grid)


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


def result_json(result) -> dict:
    """A recipe result's fields but the model and histograms, nested dataclasses as dicts.

    Built field by field: ``dataclasses.asdict`` would deep-copy the quantized model first.
    """
    def plain(value):
        if isinstance(value, list):
            return [asdict(v) if is_dataclass(v) else v for v in value]
        return value

    return {name: plain(getattr(result, name)) for name in result.__dataclass_fields__
            if name not in ("model", "histograms")}


class DevScorer:
    """Dev-set WER of whatever a model produces, from logits (decoding stays in one place).

    Under torchrun each rank scores only its shard (``batches``: forward those); ``errors``
    returns the whole set's per-utterance edits, all-reduced (:mod:`recipes.runtime.distributed`).
    """

    def __init__(self, sm: SpeechModel, batches: Sequence):
        if not batches or not sum(len(b.texts) for b in batches):
            raise ValueError("the dev set is empty")
        self.sm, self.all_batches = sm, batches
        self.refs = [t for b in batches for t in b.texts]
        if any(not r.strip() for r in self.refs):
            raise ValueError("the dev set has empty reference transcripts")
        self.shard = DevShard(batches)
        self.batches = self.shard.batches  # this rank's batches

    def errors(self, logits: Sequence[torch.Tensor]) -> UtteranceErrors:
        """Per-utterance word/char edits of the transcripts decoded from ``logits`` (of ``batches``)."""
        if len(logits) != len(self.batches):
            raise ValueError(f"{len(logits)} outputs for {len(self.batches)} dev batches")
        hyps = [h for out, batch in zip(logits, self.batches) for h in decode_logits(self.sm, out, batch)]
        fields = UtteranceErrors.__dataclass_fields__
        if hyps:
            local = utterance_errors([t for b in self.batches for t in b.texts], hyps, codec=text_codec(self.sm))
            counts = np.stack([getattr(local, k) for k in fields])
        else:  # more ranks than dev batches: this one holds none
            counts = np.zeros((len(fields), 0), dtype=np.int64)
        return UtteranceErrors(*self.shard.per_utterance(counts))

    def wer(self, logits: Sequence[torch.Tensor]) -> float:
        return self.errors(logits).wer


class StateFile:
    """Finished evaluations on disk (JSON, atomic writes), refused for a different run."""

    def __init__(self, path: str | Path | None, fingerprint: dict, resume: bool):
        self.path = Path(path) if path else None
        self.writer = current_ranks().main  # every rank reads it (resume), rank 0 writes it
        self.fingerprint = fingerprint
        self.data: dict = {"fingerprint": fingerprint, "float_wer": None, "stage1": {}, "stage2": {},
                           "errors": {}}
        if self.path and self.path.exists():
            if not resume:
                raise FileExistsError(f"{self.path} exists: pass --resume to continue that run, or use another --out")
            try:
                old = json.loads(self.path.read_text())
                if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), dict):
                    raise ValueError("no run fingerprint in it")
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot resume from {self.path}: not a state file written by this tool ({e}); "
                                 "remove it or choose another --out") from None
            # keys this run's fingerprint no longer has (a mixed search's menu once) say nothing
            diff = sorted(k for k in fingerprint if fingerprint[k] != old["fingerprint"].get(k))
            if diff:
                raise ValueError(f"cannot resume from {self.path}: it was made with a different {', '.join(diff)}")
            self.data = old
            log.info("resuming: %d stage-1 and %d stage-2 evaluations already done",
                     len(old["stage1"]), len(old["stage2"]))

    def save(self) -> None:
        if self.path and self.writer:
            write_json_atomic(self.path, self.data)


def model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


PAPER_ONLY_SETTINGS = ("gamma", "grid")  # read by the paper recipe's stages only


def _fingerprint(sm, calib, dev, s: Settings, paper: bool) -> dict:
    """What tells runs apart: model, data, and the settings this recipe reads (a default-recipe or
    mixed --resume with another --gamma / --grid is the same run)."""
    out = {
        "model": model_fingerprint(sm.model),
        "calib": hashlib.sha256("\n".join(i for b in calib for i in b.ids).encode()).hexdigest()[:16],
        "dev": hashlib.sha256("\n".join(i for b in dev for i in b.ids).encode()).hexdigest()[:16],
        "wbits": s.wbits, "abits": s.abits, "gamma": s.gamma, "grid": s.grid, "num_bins": s.num_bins,
        "equalize": list(s.equalize), "equalize_alpha": s.equalize_alpha,
    }
    return out if paper else {k: v for k, v in out.items() if k not in PAPER_ONLY_SETTINGS}


@contextmanager
def folded_weight_quantizers(model: torch.nn.Module):
    """Replace each weight by its fake-quantized value once, instead of on every forward.

    Bitwise the same computation (the weight quantizer's own output); weights and quantizers
    are restored on exit, so the saved model still holds float weights + amax.
    """
    from modelopt.torch.quantization.nn import QuantModule

    folded = []
    try:
        with torch.no_grad():
            for module in model.modules():
                wq = getattr(module, "weight_quantizer", None)
                if isinstance(module, QuantModule) and wq is not None and wq.is_enabled:
                    original = module.weight.data
                    module.weight.data = wq(original)
                    wq.disable()
                    folded.append((module, original))
        yield
    finally:
        for module, original in folded:
            module.weight.data = original
            module.weight_quantizer.enable()


def histogram_arrays(cal) -> tuple:
    """(counts, edges, exact max) of a histogram calibrator, for baselines and plots."""
    h = cal.histogram
    return h.counts_numpy(), h.edges(), float(h.amax)


class PhaseClock:
    """Wall time per phase of a recipe run (``seconds`` in its result)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


def base_config(s: Settings, **algorithm) -> dict:
    """The recipe's ModelOpt config for these settings (``algorithm`` adds decided fields)."""
    config = stablequant_config(s.wbits, s.abits, num_bins=s.num_bins, equalize=s.equalize,
                                equalize_alpha=s.equalize_alpha)
    config["algorithm"].update(algorithm)
    return config


def calibrated_copy(sm: SpeechModel, calib_batches: Sequence, s: Settings):
    """One calibration pass: a histogram per activation quantizer, per-channel max weight amax.

    Returns the quantized copy, its activation quantizers, all quantizers, and the names of
    those the config enabled.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    from sq_plugin.quantizers import activation_quantizers

    qsm = quantize_copy(sm, base_config(s), calib_batches)
    acts = activation_quantizers(qsm.model)
    if not acts:
        raise ValueError("the model has no enabled activation quantizers to calibrate")
    quantizers = {n: m for n, m in qsm.model.named_modules() if isinstance(m, TensorQuantizer)}
    return qsm, acts, quantizers, {n for n, q in quantizers.items() if q.is_enabled}


def begin_recipe(sm: SpeechModel, calib_batches: Sequence, dev_batches: Sequence, settings: Settings | None,
                 state_path: str | Path | None, resume: bool, paper: bool = False, **fingerprint):
    """What every recipe run starts with: validated settings, the dev scorer, the state file
    (``fingerprint`` adds fields that tell runs apart), layer kinds and a phase clock."""
    s = settings or Settings()
    s.validate()
    scorer = DevScorer(sm, dev_batches)
    state = StateFile(state_path, {**_fingerprint(sm, calib_batches, dev_batches, s, paper), **fingerprint}, resume)
    barrier()  # every rank has read the state file before rank 0 writes it again
    return s, scorer, state, _layer_kinds(sm), PhaseClock()


def _layer_kinds(sm: SpeechModel) -> dict[str, str]:
    return {info.path: info.kind for info in layer_inventory(sm.model)}


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
    from sq_plugin.modelopt_private import calibrator_of

    s, scorer, state, kinds, clock = begin_recipe(sm, calib_batches, dev_batches, settings, state_path, resume,
                                                      paper=True)
    lap = clock.lap
    qsm, acts, quantizers, enabled = calibrated_copy(sm, calib_batches, s)
    model = qsm.model
    cals = {n: calibrator_of(q) for n, q in acts.items()}
    dev = scorer.batches  # this rank's share of the dev set
    runner = PrefixRunner(model, forward_logits, dev)
    evaluations = 0
    lap("calibrate")

    def only(active: set[str]) -> None:
        for n, q in quantizers.items():
            q.enable() if n in active else q.disable()

    def evaluate(module_path: str | None) -> float:
        nonlocal evaluations
        evaluations += 1
        with torch.inference_mode():
            return scorer.wer(runner.run(None if s.naive_stage1 else module_path))

    with fast_fake_quant(model):  # bitwise ModelOpt's fake quant, in place: faster search
        # float reference (all quantizers off)
        if state.data["float_wer"] is None:
            only(set())
            evaluations += 1
            with torch.inference_mode():
                errors = scorer.errors(runner.run(None))
            state.data["float_wer"] = errors.wer
            state.data["errors"]["fp32"] = errors.to_json()
            state.save()
        float_wer = state.data["float_wer"]
        lap("float")

        # Stage 1: each activation quantizer alone, MAX calibration
        stage1 = []
        progress = progress and current_ranks().main
        for name in tqdm(list(acts), desc="stage 1: one layer at a time (MAX)", disable=not progress):
            layer = name.rsplit(".", 1)[0]
            amax_max = float(cals[name].compute_amax(cutoff=0.0, mse=False))
            if name not in state.data["stage1"]:
                only({name})
                acts[name].amax = amax_max
                state.data["stage1"][name] = evaluate(layer)
                state.save()
            wer = state.data["stage1"][name]
            stage1.append(LayerResult(name, layer, kinds.get(layer, "other"), wer, wer - float_wer,
                                      wer - float_wer > s.gamma, amax_max))
        runner.clear()
        lap("stage1")
        marked = [r.quantizer for r in stage1 if r.marked]
        log.info("stage 1 marked %d layer(s): %s", len(marked), marked)

        # Stage 2: every quantizer on; marked layers cut-off p + MSE, the rest MSE only
        only(enabled)
        mse_amax = {n: float(cals[n].compute_amax(cutoff=0.0, mse=True)) for n in acts if n not in marked}
        grids = {n: [float(a) for a in cals[n].amax_grid(s.grid, mse=True)] for n in marked}
        for n, a in mse_amax.items():
            acts[n].amax = a
        # What is constant across cut-offs is computed once: fake-quantized weights (folded in) and
        # the quantized prefix before the first marked layer (cached by a second prefix runner).
        stage2_runner = PrefixRunner(model, forward_logits, dev)
        first_marked = marked[0].rsplit(".", 1)[0] if marked else None
        by_candidate: dict[tuple, float] = {}
        with folded_weight_quantizers(model):
            for k, p in enumerate(tqdm(s.grid, desc="stage 2: cut-off search", disable=not progress)):
                key = tuple(grids[n][k] for n in marked)
                if str(p) not in state.data["stage2"]:
                    if key not in by_candidate:
                        for n in marked:
                            acts[n].amax = grids[n][k]
                        evaluations += 1
                        with torch.inference_mode():
                            state.data["stage2"][str(p)] = scorer.wer(stage2_runner.run(first_marked))
                        state.save()
                    else:  # same scales as an evaluated cut-off: same WER
                        state.data["stage2"][str(p)] = by_candidate[key]
                by_candidate.setdefault(key, state.data["stage2"][str(p)])
        stage2_runner.clear()
        stage2 = {str(p): state.data["stage2"][str(p)] for p in s.grid}
        k_opt = min(range(len(s.grid)), key=lambda k: (stage2[str(s.grid[k])], k))  # ties -> smaller p
        p_opt = s.grid[k_opt]
        for n in marked:
            acts[n].amax = grids[n][k_opt]
        if "stablequant_paper" not in state.data["errors"]:  # per-utterance edits, for intervals
            with folded_weight_quantizers(model), torch.inference_mode():
                final = scorer.errors([forward_logits(model, b) for b in dev])
            state.data["errors"]["stablequant_paper"] = final.to_json()
            state.save()
        lap("stage2")

    config = base_config(s, cutoff=float(p_opt), clip_layers=sorted(marked))
    amax = {n: float(q.amax) for n, q in acts.items()}
    histograms = {n: histogram_arrays(cals[n]) for n in acts}
    return StableQuantResult(
        settings=asdict(s), float_wer=float_wer, stage1=stage1, marked=marked, stage2=stage2,
        p_opt=p_opt, final_wer=stage2[str(p_opt)], amax=amax, config=config,
        evaluations=evaluations, seconds=clock.seconds, dev_errors=dict(state.data["errors"]), model=qsm,
        histograms=histograms,
    )
