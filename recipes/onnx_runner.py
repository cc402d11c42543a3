"""Run an exported CTC .onnx with ONNX Runtime, and score it with the same evaluator as torch models.

OnnxCTCModel looks enough like an HF CTC model (``model(x, attention_mask=...).logits``,
``_get_feat_extract_output_lengths``, ``parameters()``) that recipes.asr.evaluate needs no
ONNX-specific branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recipes.export import read_metadata


@dataclass
class _Output:
    logits: torch.Tensor


def _conv_output_length(lengths: torch.Tensor, kernels, strides) -> torch.Tensor:
    """Frames the strided CNN front end yields for `lengths` samples (as HF computes it)."""
    for kernel, stride in zip(kernels, strides):
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths


class OnnxCTCModel:
    """An exported CTC model in an ONNX Runtime session, plus its decoder facts from metadata."""

    def __init__(self, path: str | Path, providers: list[str] | None = None,
                 session_options=None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.meta = read_metadata(self.path)
        self._input_names = {i.name for i in self.session.get_inputs()}

    def logits(self, input_values: np.ndarray) -> np.ndarray:
        """[batch, samples] float32 (normalised as the model expects) -> [batch, frames, vocab]."""
        x = np.ascontiguousarray(input_values, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        return self.session.run(["logits"], {"input_values": x})[0]

    # --- HF-model look-alike for recipes.asr -------------------------------------------------

    def __call__(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = input_values.detach().cpu().numpy()
        if attention_mask is None or "attention_mask" in self._input_names:
            return _Output(torch.from_numpy(self.logits(x)))
        # Models trained with a mask must not see padding: run each utterance at its own length
        # and pad the logits back to the batch's frame count.
        lengths = attention_mask.sum(-1).tolist()
        rows = [self.logits(x[i : i + 1, : int(n)])[0] for i, n in enumerate(lengths)]
        frames = self._frames(x.shape[1]) or max(r.shape[0] for r in rows)
        out = np.zeros((len(rows), frames, rows[0].shape[-1]), dtype=np.float32)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return _Output(torch.from_numpy(out))

    def _frames(self, samples: int) -> int | None:
        if "conv_kernel" not in self.meta:
            return None
        return int(self._get_feat_extract_output_lengths(torch.tensor([samples]))[0])

    def _get_feat_extract_output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        if "conv_kernel" not in self.meta:
            raise ValueError(f"{self.path}: metadata lacks conv_kernel/conv_stride; re-export it "
                             "with recipes.export.export_onnx")
        return _conv_output_length(torch.as_tensor(lengths), self.meta["conv_kernel"],
                                   self.meta["conv_stride"])

    def parameters(self):
        return iter(())

    def speech_model(self, vocab_source=None):
        """A recipes.models.SpeechModel around this session, for evaluate()/transcribe().

        The vocab and preprocessing facts come from the ONNX metadata, or from `vocab_source`
        (a SpeechModel, "demo" or an HF model directory) for files exported without them.
        """
        from recipes.models import SpeechModel, resolve_model

        if vocab_source is not None and not hasattr(vocab_source, "vocab"):
            vocab_source = resolve_model(vocab_source)
        meta = self.meta
        if vocab_source is None and "vocab" not in meta:
            raise ValueError(f"{self.path}: no vocabulary in the ONNX metadata; pass the source "
                             "model directory to take it from")

        def fact(key, attr, default):
            if vocab_source is not None:
                return getattr(vocab_source, attr, default)
            return meta.get(key, default)

        return SpeechModel(
            model=self, arch=str(meta.get("arch", "onnx")), vocab=list(fact("vocab", "vocab", None)),
            blank_id=int(fact("blank_id", "blank_id", 0)),
            word_delimiter=str(fact("word_delimiter", "word_delimiter", "|")),
            sampling_rate=int(fact("sampling_rate", "sampling_rate", 16000)),
            do_normalize=bool(fact("do_normalize", "do_normalize", True)),
            return_attention_mask=bool(fact("return_attention_mask", "return_attention_mask", False)),
            name=self.path.name,
        )


def run_eval_onnx(onnx_path: str | Path, data=None, model: str | Path | None = "demo", *,
                  limit: int | None = None, batch_seconds: float = 60.0, skip_bad: bool = False,
                  seed: int = 0, providers: list[str] | None = None, progress: bool = True,
                  print_table: bool = True) -> dict:
    """`stablequant eval --onnx`: WER/CER of an exported .onnx, scored like recipes.evaluate.run_eval.

    `data` is a data set path (None: the demo test set when model is "demo") or ready batches.
    `model` supplies the vocabulary only if the .onnx lacks it in its metadata.
    """
    import time

    from recipes.asr import evaluate
    from recipes.data import make_batches
    from recipes.evaluate import format_table, load_eval_data

    runner = OnnxCTCModel(onnx_path, providers=providers)
    sm = runner.speech_model(None if "vocab" in runner.meta else model)
    if data is None or isinstance(data, (str, Path)):
        utts, data_label = load_eval_data(str(model), data)
        batches = make_batches(utts, sm, batch_seconds=batch_seconds, limit=limit, seed=seed,
                               skip_bad=skip_bad)
    else:
        batches, data_label = data, "batches"
    start = time.perf_counter()
    result = evaluate(sm, batches, progress=progress)
    elapsed = time.perf_counter() - start
    audio_seconds = sum(float(b.lengths.sum()) for b in batches) / sm.sampling_rate
    result.update(model=str(onnx_path), arch=sm.arch, data=data_label, audio_seconds=audio_seconds,
                  precision=runner.meta.get("precision", "unknown"), elapsed_seconds=elapsed)
    if print_table:
        print(format_table([
            ("onnx", f"{onnx_path} ({result['precision']}, ONNX Runtime "
                     f"{runner.session.get_providers()[0]})"),
            ("data", data_label),
            ("utterances", str(result["n"])),
            ("WER", f"{result['wer']:.2f} %"),
            ("CER", f"{result['cer']:.2f} %"),
            ("time", f"{elapsed:.1f} s (RTF {elapsed / max(audio_seconds, 1e-9):.3f})"),
        ]))
    return result
