"""ASR evaluation: greedy CTC decoding, LibriSpeech-style text normalisation, WER/CER (percent)."""

from __future__ import annotations

import re
from itertools import groupby

import jiwer
import torch
from tqdm.auto import tqdm

_SPECIAL = re.compile(r"^<[^>]*>$")


def _decode_ids(ids, vocab: list[str], blank_id: int, word_delimiter: str) -> str:
    """CTC rule: collapse repeats first, then drop blanks, so "A _ A" keeps both A's."""
    pieces = []
    for token_id, _ in groupby(ids):
        if token_id == blank_id:
            continue
        token = vocab[token_id] if 0 <= token_id < len(vocab) else ""
        if token == word_delimiter:
            pieces.append(" ")
        elif not _SPECIAL.match(token):  # <s>, </s>, <unk>, ...: never part of the text
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
    """LibriSpeech style: uppercase; keep letters, apostrophes, spaces; other chars -> space."""
    kept = "".join(c if c.isalpha() or c == "'" else " " for c in text.upper())
    return " ".join(kept.split())


def wer_cer(refs: list[str], hyps: list[str], normalize: bool = True) -> tuple[float, float]:
    """Corpus-level WER and CER in percent (total edits / total reference words or chars).

    Empty hypothesis: all its reference words count as deletions. Empty reference: every
    hypothesis word counts as an insertion (adds to the errors, not to the denominator).
    If the whole corpus has no reference words, the rate is 0.0 when there are no errors and
    inf otherwise. CER counts characters including the spaces between words.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no utterances to score")
    if normalize:
        refs, hyps = [normalize_text(r) for r in refs], [normalize_text(h) for h in hyps]
    return 100.0 * _rate(refs, hyps, words=True), 100.0 * _rate(refs, hyps, words=False)


def _rate(refs: list[str], hyps: list[str], words: bool) -> float:
    if all(not r for r in refs):  # jiwer cannot score a corpus with no reference tokens
        inserted = sum(len(h.split()) if words else len(h) for h in hyps)
        return 0.0 if inserted == 0 else float("inf")
    if words:
        return jiwer.process_words(refs, hyps).wer
    return jiwer.process_characters(refs, hyps).cer


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def forward_logits(model: torch.nn.Module, batch) -> torch.Tensor:
    """One batch through an HF-style CTC model (attention mask only when the model uses one)."""
    device = _model_device(model)
    kwargs = {} if batch.attention_mask is None else {"attention_mask": batch.attention_mask.to(device)}
    return model(batch.input_values.to(device), **kwargs).logits


def decode_logits(sm, logits: torch.Tensor, batch) -> list[str]:
    """Greedy transcripts of one batch's logits, each cut to its own valid frames."""
    out_lengths = sm.model._get_feat_extract_output_lengths(batch.lengths)
    return greedy_ctc_decode(logits.float().cpu(), sm.vocab, sm.blank_id, sm.word_delimiter, out_lengths)


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
    wer, cer = wer_cer(refs, hyps)
    return {"wer": wer, "cer": cer, "n": len(refs), "hyps": hyps, "refs": refs, "ids": ids}
