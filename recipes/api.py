"""The public Python entry point of the speech workflow: model loading, data, the calibration
loop, quantize / compare / export. Everything a README example needs is importable from here.

    from recipes.api import quantize
    out = quantize(model, processor, calib="calib.tsv", dev="dev.tsv", bits=8)
    out.config   # plain ModelOpt config: mtq.quantize(fresh_model, out.config, loop) re-applies it
    out.model    # the quantized (fake-quant) model
    out.report   # what report.json holds: dev WERs of fp32, baselines and the recipe, intervals

The CLI's ``stablequant quantize`` runs the same :func:`run_recipe`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from recipes.data.readers import BatchList, Utterance, group_batches, make_batches, normalize_waveform, open_dataset
from recipes.demo import DEMO_MODEL_DIR, demo_data
from recipes.evaluation import systems
from recipes.evaluation.asr import evaluate, wer_cer
from recipes.search.autoquant import run_auto_quantize
from recipes.search.engine import Settings
from recipes.search.qconfig import calibration_loop, load_config, quantize_copy
from recipes.speech import BlockLayout, SpeechFamily, hookimpl, wrap_speech_model
from recipes.speech.models import SpeechModel, remove_weight_norm, resolve_model

__all__ = ["DEMO_MODEL_DIR", "BatchList", "BlockLayout", "Quantized", "Settings", "SpeechFamily", "SpeechModel",
           "Utterance", "as_batches", "calibration_loop", "demo_data", "evaluate", "export_onnx", "hookimpl",
           "load_config", "make_batches", "open_dataset", "quantize", "quantize_copy", "remove_weight_norm",
           "resolve_model", "run_auto_quantize", "run_recipe", "speech_model", "wer_cer"]

RECIPES = ("default", "paper")


@dataclass
class Quantized:
    config: dict
    model: nn.Module
    report: dict
    result: object  # LayerwiseResult or StableQuantResult, with the per-layer decisions


def speech_model(model: nn.Module | SpeechModel | str | Path, processor=None) -> SpeechModel:
    """A SpeechModel from an in-memory model and its processor (HF: processor or tokenizer;
    torchaudio: the bundle or its labels), a model path or "demo".

    The positional conv's weight norm is folded into a plain weight in place (same outputs): ModelOpt
    cannot wrap it otherwise.
    """
    if isinstance(model, SpeechModel):
        return model
    if isinstance(model, (str, Path)):
        return resolve_model(model)
    return wrap_speech_model(remove_weight_norm(model), processor)


def as_batches(data, sm: SpeechModel, batch_seconds: float = 32.0) -> BatchList:
    """Batches from a data set path, or from ``(waveform at sm.sampling_rate, transcript)`` pairs."""
    if isinstance(data, (str, Path)):
        return make_batches(open_dataset(data), sm, batch_seconds=batch_seconds)
    loaded = []
    for i, (wav, text) in enumerate(data):
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1 or not wav.size or not np.isfinite(wav).all():
            raise ValueError(f"utterance {i}: expected a finite 1-D waveform, got shape {wav.shape}")
        if not str(text).strip():
            raise ValueError(f"utterance {i}: empty transcript")
        loaded.append((Utterance(f"utt{i:06d}", Path(f"utt{i:06d}"), " ".join(str(text).split())),
                       normalize_waveform(wav) if sm.do_normalize else wav))
    return group_batches(loaded, sm.return_attention_mask, batch_seconds, sm.sampling_rate)


def run_recipe(sm: SpeechModel, calib: Sequence, dev: Sequence, settings: Settings, recipe: str = "default",
               state_path: str | Path | None = None, resume: bool = False, seed: int = 0,
               progress: bool = True, variants_per_forward: int = 2):
    """Run a recipe; returns its result and the report meta (dev WERs of fp32, each uniform
    baseline and the recipe, with paired bootstrap intervals). ``variants_per_forward``: the
    default recipe's candidates scored side by side (at most 2 are useful; 1: one per forward)."""
    from recipes.compare import intervals, uniform_dev_errors
    from recipes.evaluation.asr import UtteranceErrors
    from recipes.search.engine import DevScorer
    from recipes.search.layerwise import run_layerwise
    from recipes.search.paper import run_stablequant

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    start = time.perf_counter()
    if recipe == "default":
        result = run_layerwise(sm, calib, dev, settings, state_path=state_path, resume=resume, progress=progress,
                               variants_per_forward=min(2, variants_per_forward))
    else:
        result = run_stablequant(sm, calib, dev, settings, state_path=state_path, resume=resume, progress=progress)
    elapsed = time.perf_counter() - start
    errors = {systems.FP32: UtteranceErrors.from_json(result.dev_errors[systems.FP32]),
              **uniform_dev_errors(result, DevScorer(sm, dev))}
    final = systems.DEFAULT if recipe == "default" else systems.PAPER
    errors[final] = UtteranceErrors.from_json(result.dev_errors[final])
    meta = {"model": sm.source or sm.name, "arch": sm.arch, "recipe": recipe,
            "calib_utterances": sum(len(b.ids) for b in calib), "dev_utterances": sum(len(b.ids) for b in dev),
            "seconds": round(elapsed, 1),
            "dev": {k: {"wer": e.wer, "cer": e.cer, "words": int(e.words.sum()),
                        "word_errors": int(e.word_edits.sum())} for k, e in errors.items()},
            "dev_intervals": intervals(errors, systems.FP32, [k for k in errors if k not in (systems.FP32, final)],
                                      seed=seed)}
    return result, meta


def quantize(model, processor=None, *, calib, dev, bits: int = 8, wbits: int | None = None,
             recipe: str = "default", out_dir: str | Path | None = None, batch_seconds: float = 32.0,
             seed: int = 0, progress: bool = True, device="auto", **settings) -> Quantized:
    """The whole recipe on ``model``: calibration + dev data in, config + quantized model + report out.

    ``calib``/``dev``: a data set path (LibriSpeech dir, fairseq or plain TSV) or a list of
    ``(waveform, transcript)`` pairs at the model's sampling rate. ``out_dir`` also writes the CLI's
    outputs there (report.md/json, modelopt_config.json, model.pth, plots). Extra keyword arguments
    are :class:`recipes.search.engine.Settings` fields (gamma, grid, num_bins). ``device``:
    ``auto`` (CUDA when available), ``cpu``, ``cuda[:N]`` or a torch.device; the model moves there.
    Under torchrun the search is sharded over the ranks and only rank 0 writes ``out_dir``.
    """
    from recipes.runtime.device import batches_to, resolve_device, to_device
    from recipes.runtime.distributed import init_ranks, ranks_from_env

    torch.manual_seed(seed)
    dev_ = resolve_device(device, ranks_from_env().local_rank)
    ranks = init_ranks(dev_)
    sm = to_device(speech_model(model, processor), dev_)
    calib_b, dev_b = (batches_to(as_batches(d, sm, batch_seconds), dev_) for d in (calib, dev))
    s = Settings(wbits=wbits or bits, abits=bits, **settings)
    result, meta = run_recipe(sm, calib_b, dev_b, s, recipe, seed=seed, progress=progress and ranks.main)
    meta.update(device=str(dev_), ranks=ranks.world)
    if out_dir is not None and ranks.main:
        from recipes.report import write_quantize_outputs

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_quantize_outputs(Path(out_dir), result, meta)
    return Quantized(config=result.config, model=result.model.model, report={"meta": meta, **result.to_json()},
                     result=result)


def export_onnx(sm: SpeechModel, path: str | Path, **kwargs) -> dict:
    """Q/DQ ONNX of a quantized model (:func:`recipes.export.onnx.export_onnx`; ONNX loads on use)."""
    from recipes.export.onnx import export_onnx as export

    return export(sm, path, **kwargs)
