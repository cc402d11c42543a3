"""`stablequant eval`: WER/CER of an (unquantized) CTC model on a speech dataset."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from recipes.data.readers import Utterance, make_batches, open_dataset
from recipes.evaluation.asr import evaluate
from recipes.speech.models import SpeechModel, resolve_model

log = logging.getLogger(__name__)


def _demo_utterances() -> tuple[list[Utterance], str]:
    try:
        from recipes.demo import demo_data
    except ImportError as e:
        raise FileNotFoundError(f"the demo test set is not available (recipes.demo): {e}") from e
    data = demo_data("test")
    if isinstance(data, (str, Path)):  # a dataset path in any supported format
        return open_dataset(data), str(data)
    return list(data), "demo:test"


def load_eval_data(model, data: str | Path | None) -> tuple[list[Utterance], str]:
    """Utterances to score and a label for them; the demo test set is the default for 'demo'.

    `model` is a name/directory or a SpeechModel (demo if it was resolved from "demo").
    """
    if data is not None:
        return open_dataset(data), str(data)
    if isinstance(model, SpeechModel):
        model = model.source
    if str(model) == "demo":
        return _demo_utterances()
    raise ValueError("--data is required unless --model demo (which uses the demo test set)")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run_eval(model: str | Path | SpeechModel = "demo", data: str | Path | None = None,
             limit: int | None = None, batch_seconds: float = 32.0, skip_bad: bool = False,
             seed: int = 0, progress: bool = True, print_table: bool = True, device=None) -> dict:
    """Load model and data, transcribe, score; returns the metrics (and transcripts).

    `model` may also be a ready SpeechModel (e.g. a quantized copy of the demo model). ``device``
    (``auto|cpu|cuda[:N]`` or a torch.device): where to run; default: where the model is.
    """
    from recipes.runtime.device import batches_to, model_device, resolve_device, to_device

    sm = model if isinstance(model, SpeechModel) else resolve_model(model)
    if device is not None:
        to_device(sm, resolve_device(device))
    utts, data_label = load_eval_data(model, data)
    batches = make_batches(utts, sm, batch_seconds=batch_seconds, limit=limit, seed=seed,
                           skip_bad=skip_bad)
    batches = batches_to(batches, model_device(sm.model))
    start = time.perf_counter()
    result = evaluate(sm, batches, progress=progress)
    elapsed = time.perf_counter() - start
    result.update(model=sm.name or str(model), arch=sm.arch, data=data_label,
                  audio_seconds=batches.seconds, skipped=list(batches.skipped),
                  elapsed_seconds=elapsed)
    if print_table:
        print(format_table([
            ("model", f"{result['model']} ({sm.arch})"),
            ("data", data_label),
            ("utterances", f"{result['n']}" + (f" ({len(batches.skipped)} skipped)"
                                                 if batches.skipped else "")),
            ("audio", _duration(batches.seconds)),
            ("WER", f"{result['wer']:.2f} %"),
            ("CER", f"{result['cer']:.2f} %"),
            ("time", f"{elapsed:.1f} s (RTF {elapsed / max(batches.seconds, 1e-9):.3f})"),
        ]))
    return result
