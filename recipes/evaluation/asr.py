"""ASR evaluation: greedy CTC decoding, WER/CER (percent) of text as the model's vocabulary spells it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

import jiwer
import numpy as np
import torch
from tqdm.auto import tqdm

from recipes.speech.text import TextCodec, is_special, text_codec


def _decode_ids(ids, vocab: list[str], blank_id: int, word_delimiter: str) -> str:
    """CTC rule: collapse repeats first, then drop blanks, so "A _ A" keeps both A's."""
    pieces = []
    for token_id, _ in groupby(ids):
        if token_id == blank_id:
            continue
        token = vocab[token_id] if 0 <= token_id < len(vocab) else ""
        if token == word_delimiter:
            pieces.append(" ")
        elif not is_special(token):  # <s>, </s>, <unk>, [PAD], ...: never part of the text
            pieces.append(token)
    return " ".join("".join(pieces).split())


def greedy_ctc_decode(logits_or_ids: torch.Tensor, vocab: list[str], blank_id: int,
                      word_delimiter: str = "|", output_lengths=None) -> list[str]:
    """Best-path CTC decoding of a batch.

    Accepts logits [B, T, V] (argmax taken) or token ids [B, T]; a single utterance ([T, V] float
    or [T] int) is treated as a batch of one. `output_lengths` [B] cuts each row to its valid
    frames so padding frames never leak into the text. Special tokens like <unk> are dropped.
    """
    x = torch.as_tensor(logits_or_ids)
    if x.is_floating_point():
        if x.dim() == 2:
            x = x.unsqueeze(0)
        ids = x.argmax(dim=-1)
    else:
        ids = x.unsqueeze(0) if x.dim() == 1 else x
    if ids.dim() != 2:
        raise ValueError(f"expected logits [B, T, V] or ids [B, T], got shape {tuple(x.shape)}")
    rows = ids.tolist()
    if output_lengths is not None:
        rows = [row[: int(n)] for row, n in zip(rows, torch.as_tensor(output_lengths).tolist())]
    return [_decode_ids(row, vocab, blank_id, word_delimiter) for row in rows]


def normalize_text(text: str) -> str:
    """LibriSpeech style, for text with no model: uppercase; keep letters, apostrophes, spaces; other
    chars -> space. Scores of a model's output use its vocabulary's codec instead (``codec=``)."""
    kept = "".join(c if c.isalpha() or c == "'" else " " for c in text.upper())
    return " ".join(kept.split())


@dataclass(frozen=True)
class UtteranceErrors:
    """Edit counts per utterance: what corpus WER/CER and paired bootstrap intervals are built on."""

    word_edits: np.ndarray  # substitutions + deletions + insertions, per utterance
    words: np.ndarray  # reference words per utterance
    char_edits: np.ndarray
    chars: np.ndarray  # reference characters (spaces between words included)

    @property
    def wer(self) -> float:
        return _percent(self.word_edits.sum(), self.words.sum())

    @property
    def cer(self) -> float:
        return _percent(self.char_edits.sum(), self.chars.sum())

    def to_json(self) -> dict:
        return {k: getattr(self, k).tolist() for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict) -> UtteranceErrors:
        return cls(**{k: np.asarray(data[k], dtype=np.int64) for k in cls.__dataclass_fields__})


def _percent(edits, total) -> float:
    """Corpus rate in percent; a corpus with no reference tokens: 0 if no edits else inf."""
    if total == 0:
        return 0.0 if edits == 0 else float("inf")
    return 100.0 * float(edits) / float(total)


def _edits(refs: list[str], hyps: list[str], process, tokens) -> np.ndarray:
    """Levenshtein edits per pair from jiwer's alignments (jiwer refuses an all-empty corpus)."""
    edits = np.array([len(tokens(h)) for h in hyps], dtype=np.int64)  # empty reference: insertions
    keep = [i for i, r in enumerate(refs) if r]
    if keep:
        out = process([refs[i] for i in keep], [hyps[i] for i in keep])
        for i, chunks in zip(keep, out.alignments):
            edits[i] = sum(max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx)
                           for c in chunks if c.type != "equal")
    return edits


def utterance_errors(refs: list[str], hyps: list[str], normalize: bool = True,
                     codec: TextCodec | None = None) -> UtteranceErrors:
    """Word and character edit counts of every (reference, hypothesis) pair.

    Both sides are written as ``codec`` (the model's vocabulary) spells them; with no codec,
    LibriSpeech-style ``normalize_text``; ``normalize=False`` only collapses whitespace.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no utterances to score")
    norm = (codec.canonical if codec is not None else normalize_text) if normalize else (lambda t: " ".join(t.split()))
    refs, hyps = [norm(r) for r in refs], [norm(h) for h in hyps]
    return UtteranceErrors(
        word_edits=_edits(refs, hyps, jiwer.process_words, str.split),
        words=np.array([len(r.split()) for r in refs], dtype=np.int64),
        char_edits=_edits(refs, hyps, jiwer.process_characters, list),
        chars=np.array([len(r) for r in refs], dtype=np.int64),
    )


def wer_cer(refs: list[str], hyps: list[str], normalize: bool = True,
            codec: TextCodec | None = None) -> tuple[float, float]:
    """Corpus-level WER and CER in percent (total edits / total reference words or chars).

    Empty hypothesis: all its reference words count as deletions. Empty reference: every
    hypothesis word counts as an insertion (adds to the errors, not to the denominator).
    If the whole corpus has no reference words, the rate is 0.0 when there are no errors and
    inf otherwise. CER counts characters including the spaces between words.
    """
    errors = utterance_errors(refs, hyps, normalize, codec)
    return errors.wer, errors.cer


def paired_bootstrap(edits_a, edits_b, words, resamples: int = 1000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """Paired bootstrap interval of WER(a) - WER(b) in points, resampling utterances.

    Both systems are scored on the same resampled utterances (paired), so the interval reflects
    how much the difference depends on which utterances happened to be in the set. Percentile
    interval; ``significant`` when it excludes 0.
    """
    a, b, n_words = (np.asarray(v, dtype=np.int64) for v in (edits_a, edits_b, words))
    if not (a.shape == b.shape == n_words.shape) or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need three equal-length 1-D per-utterance arrays, got {a.shape}, {b.shape}, {n_words.shape}")
    if int(n_words.sum()) == 0:
        raise ValueError("no reference words: WER differences are undefined")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"bad bootstrap settings: resamples={resamples}, confidence={confidence}")
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    delta = a - b
    chunk = max(1, 2_000_000 // a.size)  # bounded memory for large sets
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, a.size, size=(min(chunk, resamples - start), a.size))
        total = n_words[idx].sum(axis=1)
        diffs[start:start + idx.shape[0]] = 100.0 * delta[idx].sum(axis=1) / np.maximum(total, 1)
    tail = 100.0 * (1 - confidence) / 2
    low, high = np.percentile(diffs, [tail, 100.0 - tail])
    return {"diff": 100.0 * float(delta.sum()) / float(n_words.sum()), "low": float(low), "high": float(high),
            "significant": bool(low > 0 or high < 0), "resamples": int(resamples), "seed": int(seed),
            "confidence": float(confidence)}


def intervals(errors: dict[str, UtteranceErrors], reference: str, baselines: Sequence[str],
              resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Paired bootstrap CIs of each system's WER minus the reference's and the best baseline's."""
    best = min(baselines, key=lambda m: errors[m].wer)
    out = {"best_baseline": best}
    for name, e in errors.items():
        if name == reference:
            continue
        entry = {f"vs_{reference}": paired_bootstrap(e.word_edits, errors[reference].word_edits, e.words,
                                                      resamples, seed)}
        if name != best:
            entry["vs_best_baseline"] = paired_bootstrap(e.word_edits, errors[best].word_edits, e.words,
                                                         resamples, seed)
        out[name] = entry
    return out


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def forward_logits(model: torch.nn.Module, batch) -> torch.Tensor:
    """One batch through a CTC model of any family (attention mask only when the model uses one)."""
    from recipes.speech import family_of

    device = _model_device(model)
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    return family_of(model).logits(model, batch.input_values.to(device), mask)


def decode_logits(sm, logits: torch.Tensor, batch) -> list[str]:
    """Greedy transcripts of one batch's logits, each cut to its own valid frames."""
    from recipes.speech import output_lengths

    out_lengths = output_lengths(sm.model, batch.lengths)
    ids = logits.argmax(dim=-1).cpu()  # only the ids cross from the device, not the logits
    return greedy_ctc_decode(ids, sm.vocab, sm.blank_id, sm.word_delimiter, out_lengths)


def transcribe(sm, batches, progress: bool = True) -> list[str]:
    """Greedy transcripts for every utterance, in batch order (matches the batches' ids/texts)."""
    hyps = []
    with torch.inference_mode():
        for batch in tqdm(batches, desc="transcribe", unit="batch", disable=not progress):
            hyps += decode_logits(sm, forward_logits(sm.model, batch), batch)
    return hyps


def evaluate(sm, batches, progress: bool = True) -> dict:
    """Transcribe and score: dict(wer=%, cer=%, n=..., hyps, refs, ids)."""
    hyps = transcribe(sm, batches, progress=progress)
    refs = [t for b in batches for t in b.texts]
    ids = [i for b in batches for i in b.ids]
    wer, cer = wer_cer(refs, hyps, codec=text_codec(sm))
    return {"wer": wer, "cer": cer, "n": len(refs), "hyps": hyps, "refs": refs, "ids": ids}
