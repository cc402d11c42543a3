"""The skeleton every search shares, written once: settings, the dev scorer, the run fingerprint,
a typed and versioned state file, and a search as named phases over one run object.

A search (the paper recipe, the default recipe, mixed precision) is a list of :class:`Phase` run
in order by :func:`run_phases` over one :class:`SearchRun`: the runtime objects a phase sets up
(the calibrated copy, its quantizers, the prefix cache) live on the run; every finished evaluation
goes to ``run.state``, a :class:`SearchState` dataclass saved to the state file after each
evaluation and each phase. A killed run resumes (``--resume``): every phase runs again, and the
evaluations it finds in the state are not repeated, so the work resumes inside the phase it was in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.evaluation.asr import UtteranceErrors, decode_logits, utterance_errors
from recipes.runtime.atomic import write_json_atomic
from recipes.runtime.distributed import DevShard, barrier, current_ranks
from recipes.search.grid import parse_grid, validate_grid
from recipes.speech.models import SpeechModel, layer_inventory
from recipes.speech.text import text_codec

log = logging.getLogger(__name__)


@dataclass
class Settings:
    wbits: int = 8
    abits: int = 8
    gamma: float = 0.25  # absolute WER % rise that marks a layer in Stage 1 (paper recipe)
    grid: list[float] = field(default_factory=lambda: parse_grid("0:0.5:0.01"))  # paper recipe's cut-offs
    num_bins: int = 2048
    naive_stage1: bool = False  # re-run the whole model per layer (benchmark reference)
    equalize: list[str] = field(default_factory=list)  # activation quantizers equalised per channel
    equalize_alpha: float = 0.5

    def validate(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0 (absolute WER %), got {self.gamma}")
        self.grid = validate_grid(self.grid)


PAPER_ONLY_SETTINGS = ("gamma", "grid")  # read by the paper recipe's stages only


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
        names = UtteranceErrors.__dataclass_fields__
        if hyps:
            local = utterance_errors([t for b in self.batches for t in b.texts], hyps, codec=text_codec(self.sm))
            counts = np.stack([getattr(local, k) for k in names])
        else:  # more ranks than dev batches: this one holds none
            counts = np.zeros((len(names), 0), dtype=np.int64)
        return UtteranceErrors(*self.shard.per_utterance(counts))

    def wer(self, logits: Sequence[torch.Tensor]) -> float:
        return self.errors(logits).wer


# ----------------------------------------------------------------------------- fingerprint


def model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _ids_fingerprint(batches: Sequence) -> str:
    return hashlib.sha256("\n".join(i for b in batches for i in b.ids).encode()).hexdigest()[:16]


def run_fingerprint(sm: SpeechModel, calib: Sequence, dev: Sequence, s: Settings, paper: bool) -> dict:
    """What tells runs apart: model, data, and the settings this recipe reads (a default-recipe or
    mixed --resume with another --gamma / --grid is the same run)."""
    out = {
        "model": model_fingerprint(sm.model), "calib": _ids_fingerprint(calib), "dev": _ids_fingerprint(dev),
        "wbits": s.wbits, "abits": s.abits, "gamma": s.gamma, "grid": s.grid, "num_bins": s.num_bins,
        "equalize": list(s.equalize), "equalize_alpha": s.equalize_alpha,
    }
    return out if paper else {k: v for k, v in out.items() if k not in PAPER_ONLY_SETTINGS}


# ----------------------------------------------------------------------------- state


STATE_VERSION = 2


@dataclass
class SearchState:
    """What a search has finished, as plain JSON: a killed run resumes from it. Each recipe
    subclasses it with its own fields (``PaperState``, ``DefaultState``, ``MixedState``)."""

    fingerprint: dict = field(default_factory=dict)
    version: int = STATE_VERSION
    phases_done: list[str] = field(default_factory=list)
    float_wer: float | None = None
    errors: dict[str, dict] = field(default_factory=dict)  # system -> per-utterance edits (for intervals)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> SearchState:
        raw = migrate_state(raw)
        values = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            kind = type(f.default_factory()) if callable(f.default_factory) else None
            if kind is not None and not isinstance(value, kind):
                raise ValueError(f"{f.name!r} is a {type(value).__name__}, not a {kind.__name__}")
            values[f.name] = value
        return cls(**values)


def migrate_state(raw: dict) -> dict:
    """Bring a state file's dict to ``STATE_VERSION``.

    Version 1 (no ``"version"`` key, written before the state was typed) was one dict for every
    recipe: ``fingerprint``, ``float_wer``, ``stage1``, ``stage2``, ``errors`` and the recipe's own
    keys under the same names as today (a mixed state from before CTC scoring lacks
    ``sensitivity_ctc``: its dataclass default, empty, makes the search recompute those), so it
    only gains the version and an empty ``phases_done``; keys a recipe does not read are dropped
    by :meth:`SearchState.from_json`.
    """
    version = raw.get("version", 1)
    if not isinstance(version, int) or version > STATE_VERSION:
        raise ValueError(f"state version {version!r} is newer than this tool's ({STATE_VERSION})")
    if version == 1:
        raw = {**raw, "version": 2, "phases_done": []}
    return raw


class StateFile:
    """A search's state on disk (JSON, atomic writes), refused for a different run."""

    def __init__(self, path: str | Path | None, state_cls: type[SearchState], fingerprint: dict, resume: bool):
        self.path = Path(path) if path else None
        self.writer = current_ranks().main  # every rank reads it (resume), rank 0 writes it
        self.state = state_cls(fingerprint=fingerprint)
        if self.path and self.path.exists():
            if not resume:
                raise FileExistsError(f"{self.path} exists: pass --resume to continue that run, or use another --out")
            self.state = self._read(state_cls, fingerprint)

    def _read(self, state_cls: type[SearchState], fingerprint: dict) -> SearchState:
        try:
            old = json.loads(self.path.read_text())
            if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), dict):
                raise ValueError("no run fingerprint in it")
            state = state_cls.from_json(old)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot resume from {self.path}: not a state file written by this tool ({e}); "
                             "remove it or choose another --out") from None
        # keys this run's fingerprint no longer has (a mixed search's menu once) say nothing
        diff = sorted(k for k in fingerprint if fingerprint[k] != state.fingerprint.get(k))
        if diff:
            raise ValueError(f"cannot resume from {self.path}: it was made with a different {', '.join(diff)}")
        log.info("resuming %s: phases done: %s", self.path, ", ".join(state.phases_done) or "none")
        return state

    def save(self) -> None:
        if self.path and self.writer:
            write_json_atomic(self.path, self.state.to_json())


# ----------------------------------------------------------------------------- phases


class PhaseClock:
    """Wall time per phase of a recipe run (``seconds`` in its result)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now


@dataclass(frozen=True)
class Phase:
    """One named step of a search: ``run(search_run)`` sets up runtime objects on the run or records
    finished evaluations in its state; the name keys the phase's wall time and ``phases_done``."""

    name: str
    run: Callable[[Any], None]


class SearchRun:
    """What every search starts with (validated settings, the dev scorer, the state file, layer
    kinds, a clock, an evaluation count); each recipe's subclass adds the runtime objects its
    phases set up."""

    def __init__(self, sm: SpeechModel, calib: Sequence, dev: Sequence, settings: Settings | None,
                 state_path: str | Path | None, resume: bool, state_cls: type[SearchState],
                 progress: bool = True, paper: bool = False, **fingerprint):
        self.s = settings or Settings()
        self.s.validate()
        self.sm, self.calib = sm, calib
        self.scorer = DevScorer(sm, dev)
        self.dev = self.scorer.batches  # this rank's share of the dev set (all of it in one process)
        self.store = StateFile(state_path, state_cls,
                               {**run_fingerprint(sm, calib, dev, self.s, paper), **fingerprint}, resume)
        barrier()  # every rank has read the state file before rank 0 writes it again
        self.kinds = {info.path: info.kind for info in layer_inventory(sm.model)}
        self.clock = PhaseClock()
        self.progress = progress and current_ranks().main
        self.evaluations = 0
        self.stack: contextlib.ExitStack | None = None  # contexts a phase opens for the later ones

    @property
    def state(self):
        return self.store.state

    def save(self) -> None:
        self.store.save()


def run_phases(run: SearchRun, phases: Sequence[Phase]) -> None:
    """Run ``phases`` in order; contexts a phase enters on ``run.stack`` (fast fake quant, ...) stay
    open for the phases after it and close when the last one is done."""
    with contextlib.ExitStack() as stack:
        run.stack = stack
        for phase in phases:
            phase.run(run)
            if phase.name not in run.state.phases_done:
                run.state.phases_done.append(phase.name)
            run.save()
            run.clock.lap(phase.name)
    run.stack = None


# ----------------------------------------------------------------------------- results


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
