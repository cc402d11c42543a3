"""Speech data readers: LibriSpeech trees, fairseq manifests, plain TSVs and saved Hugging Face
``datasets`` directories -> batches of equal-length utterances.

Audio is decoded once by make_batches and kept in memory, because the recipe evaluates the same
dev set many times (once per calibration candidate).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import torch

from recipes.data.utterance import Utterance

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".flac", ".wav")


@dataclass
class Batch:
    """Model inputs (equal-length utterances, never padded) plus what evaluation needs to score them."""

    input_values: torch.Tensor  # [B, T] float32
    attention_mask: torch.Tensor | None  # [B, T] long, only if the model was trained with one
    lengths: torch.Tensor  # [B] samples per utterance
    texts: list[str]
    ids: list[str]

    def repeat(self, k: int) -> "Batch":
        """The batch ``k`` times over along the batch dim (copy i is rows i*B..(i+1)*B-1)."""
        mask = None if self.attention_mask is None else self.attention_mask.repeat(k, 1)
        return Batch(self.input_values.repeat(k, 1), mask, self.lengths.repeat(k), self.texts * k, self.ids * k)


class BatchList(list):
    """List of Batch; `skipped` names utterances dropped as unreadable (skip_bad=True)."""

    def __init__(self, batches=(), skipped: list[str] | None = None, sampling_rate: int = 16000):
        super().__init__(batches)
        self.skipped = skipped or []
        self.sampling_rate = sampling_rate

    @property
    def num_utterances(self) -> int:
        return sum(len(b.ids) for b in self)

    @property
    def seconds(self) -> float:
        return float(sum(int(b.lengths.sum()) for b in self)) / self.sampling_rate


class AudioError(RuntimeError):
    """Unreadable or corrupt audio file (the message names it)."""


# ----------------------------------------------------------------------------- readers


def _inside(root: Path, rel: str, where: str) -> Path:
    """Join a manifest path onto its root, refusing anything that would escape the root."""
    root_abs = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(root_abs, rel))
    if os.path.commonpath([root_abs, full]) != root_abs:
        raise ValueError(f"{where}: audio path {rel!r} escapes the manifest root {root_abs}")
    return Path(full)


def _require_file(path: Path, where: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{where}: audio file not found: {path}")
    return path


def read_librispeech(root: str | Path) -> list[Utterance]:
    """LibriSpeech layout: SPK/CHAP/SPK-CHAP-UTT.flac with SPK-CHAP.trans.txt beside them."""
    root = Path(root)
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise FileNotFoundError(f"{root}: no LibriSpeech transcripts (*.trans.txt) found")
    utts = []
    for trans in trans_files:
        for lineno, line in enumerate(_read_lines(trans), 1):
            where = f"{trans}:{lineno}"
            utt_id, _, text = line.strip().partition(" ")
            if not utt_id:
                raise ValueError(f"{where}: empty transcript line")
            if not text.strip():
                raise ValueError(f"{where}: empty transcript for {utt_id}")
            candidates = [trans.parent / f"{utt_id}{s}" for s in AUDIO_SUFFIXES]
            audio = next((c for c in candidates if c.is_file()), None)
            if audio is None:
                raise FileNotFoundError(f"{where}: audio file not found: {candidates[0]}")
            utts.append(Utterance(utt_id, audio, text.strip(), where=where))
    return sorted(utts, key=lambda u: u.id)


def _read_lines(path: Path, first_only: bool = False) -> list[str]:
    """UTF-8 text lines; a byte that is not UTF-8 is an error naming the file and line."""
    if first_only:
        with open(path, "rb") as f:
            data = f.readline()
    else:
        data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                         "save transcripts and manifests as UTF-8") from None


def read_fairseq_manifest(tsv: str | Path) -> list[Utterance]:
    """fairseq manifest: line 1 is the root, then relpath<TAB>num_samples; text in .wrd or .ltr."""
    tsv = Path(tsv)
    lines = _read_lines(tsv)
    if not lines:
        raise ValueError(f"{tsv}: empty manifest")
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = tsv.parent / root
    if not root.is_dir():
        raise FileNotFoundError(f"{tsv}:1: manifest root directory not found: {root}")
    entries = [(n, line) for n, line in enumerate(lines[1:], 2) if line.strip()]

    wrd, ltr = tsv.with_suffix(".wrd"), tsv.with_suffix(".ltr")
    if wrd.is_file():
        label_path, letters = wrd, False
    elif ltr.is_file():
        label_path, letters = ltr, True
    else:
        raise FileNotFoundError(f"{tsv}: no transcripts: neither {wrd.name} nor {ltr.name} exists")
    labels = _read_lines(label_path)
    if len(labels) != len(entries):
        raise ValueError(f"{label_path}: {len(labels)} transcript lines but {tsv.name} lists "
                         f"{len(entries)} audio files")
    utts = []
    for (lineno, entry), (label_no, label) in zip(entries, enumerate(labels, 1)):
        where = f"{tsv}:{lineno}"
        rel = entry.split("\t")[0].strip()
        audio = _require_file(_inside(root, rel, where), where)
        text = label.replace(" ", "").replace("|", " ") if letters else label
        if not text.strip():
            raise ValueError(f"{label_path}:{label_no}: empty transcript for {rel}")
        utts.append(Utterance(Path(rel).with_suffix("").as_posix(), audio, " ".join(text.split()),
                              where=f"{label_path}:{label_no}"))
    return utts


def read_plain_tsv(tsv: str | Path) -> list[Utterance]:
    """Plain TSV: audio_path<TAB>transcript per line, paths relative to the TSV's directory."""
    tsv = Path(tsv)
    utts = []
    for lineno, line in enumerate(_read_lines(tsv), 1):
        where = f"{tsv}:{lineno}"
        if not line.strip():
            raise ValueError(f"{where}: empty line (expected audio_path<TAB>transcript)")
        rel, sep, text = line.partition("\t")
        if not sep:
            raise ValueError(f"{where}: no tab in {line.strip()!r} (expected audio_path<TAB>transcript)")
        if not text.strip():
            raise ValueError(f"{where}: empty transcript for {rel.strip()!r}")
        audio = _require_file(_inside(tsv.parent, rel.strip(), where), where)
        utts.append(Utterance(Path(rel.strip()).with_suffix("").as_posix(), audio,
                              " ".join(text.split()), where=where))
    return utts


def detect_format(path: str | Path) -> str:
    """'datasets' for a save_to_disk directory, 'librispeech' for another directory; 'fairseq' if
    the TSV's first line is a root (no tab), else 'plain'."""
    from recipes.data.datasets_dir import is_datasets_dir

    path = Path(path)
    if is_datasets_dir(path):
        return "datasets"
    if path.is_dir():
        return "librispeech"
    if not path.is_file():
        raise FileNotFoundError(f"dataset not found: {path}")
    first = (_read_lines(path, first_only=True) or [""])[0]
    return "plain" if "\t" in first else "fairseq"


def open_dataset(path: str | Path) -> list[Utterance]:
    """Read any supported dataset format (auto-detected) into a list of utterances."""
    fmt = detect_format(path)
    from recipes.data.datasets_dir import read_datasets_dir

    reader = {"librispeech": read_librispeech, "fairseq": read_fairseq_manifest,
              "plain": read_plain_tsv, "datasets": read_datasets_dir}[fmt]
    utts = reader(path)
    if not utts:
        raise ValueError(f"{path}: dataset is empty")
    log.info("%s: %d utterances (%s format)", path, len(utts), fmt)
    return utts


# ----------------------------------------------------------------------------- audio


def _decode(path: str | Path, audio=None) -> tuple[np.ndarray, int]:
    """[samples, channels] float32 and its rate, from a file or from in-table audio."""
    import io

    import soundfile as sf

    source = path
    try:
        if audio is not None:
            raw = audio.read()
            if isinstance(raw, tuple):  # decoded samples and their rate
                wav = np.asarray(raw[0], dtype=np.float32)
                return (wav[:, None] if wav.ndim == 1 else wav), int(raw[1])
            source = io.BytesIO(raw) if isinstance(raw, bytes) else raw
        wav, sr = sf.read(source if isinstance(source, io.BytesIO) else str(source), dtype="float32",
                          always_2d=True)
    except AudioError:
        raise
    except Exception as e:  # libsndfile raises several types for corrupt/unknown files
        raise AudioError(f"{path}: cannot read audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    return wav, sr


def load_audio(path: str | Path, sampling_rate: int = 16000, audio=None) -> np.ndarray:
    """Decode to float32 mono at `sampling_rate`: several channels are averaged and other rates
    resampled, each with a warning naming the file."""
    from scipy.signal import resample_poly

    wav, sr = _decode(path, audio)
    if wav.ndim != 2 or wav.shape[0] == 0:
        raise AudioError(f"{path}: audio file has no samples")
    if wav.shape[1] > 1:
        log.warning("%s: %d channels, mixed down to mono", path, wav.shape[1])
        wav = wav.mean(axis=1)
    else:
        wav = wav[:, 0]
    if sr != sampling_rate:
        if sr <= 0:
            raise AudioError(f"{path}: invalid sampling rate {sr}")
        g = gcd(sr, sampling_rate)
        log.warning("%s: %d Hz, resampled to the model's %d Hz", path, sr, sampling_rate)
        wav = resample_poly(wav, sampling_rate // g, sr // g).astype(np.float32)
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: audio contains NaN/Inf samples")
    return np.ascontiguousarray(wav, dtype=np.float32)


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
    """Zero-mean unit-variance per utterance, as Wav2Vec2FeatureExtractor does (eps 1e-7)."""
    return ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)).astype(np.float32)


# ----------------------------------------------------------------------------- batching


def select_subset(utts: list[Utterance], limit: int | None, seed: int = 0) -> list[Utterance]:
    """Deterministic (seeded) subset of `limit` utterances, kept in dataset order."""
    if limit is None or limit >= len(utts):
        return list(utts)
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(utts)), limit))
    return [utts[i] for i in keep]


def _collate(items: list[tuple[Utterance, np.ndarray]], with_mask: bool) -> Batch:
    """Stack equal-length utterances (the mask, where the model takes one, is all ones)."""
    x = torch.from_numpy(np.stack([w for _, w in items]))
    lengths = torch.full((len(items),), x.shape[1], dtype=torch.long)
    mask = torch.ones(x.shape, dtype=torch.long) if with_mask else None
    return Batch(x, mask, lengths, [u.text for u, _ in items], [u.id for u, _ in items])


def make_batches(utts: list[Utterance], sm, batch_seconds: float = 32.0, limit: int | None = None,
                 seed: int = 0, skip_bad: bool = False) -> BatchList:
    """Load audio once and group it into batches of equal-length utterances (never padded).

    No padding inside a forward: a model without an attention mask (wav2vec2-base's GroupNorm
    front end) normalises over the padded frames, and padded zeros would also land in the
    calibration histograms, so a padded batch's WER would depend on how utterances were grouped.
    Utterances of the same length share a batch of at most `batch_seconds` of audio (always at
    least one utterance), so every WER here is the same whatever `batch_seconds` is.
    `sm` is a SpeechModel (or anything with sampling_rate, do_normalize, return_attention_mask).
    """
    if not batch_seconds > 0:
        raise ValueError(f"batch_seconds must be > 0, got {batch_seconds}")
    sr = int(getattr(sm, "sampling_rate", 16000))
    do_normalize = bool(getattr(sm, "do_normalize", True))
    with_mask = bool(getattr(sm, "return_attention_mask", False))
    model = getattr(sm, "model", None)
    frames = None
    if model is not None:
        from recipes.speech import output_lengths

        frames = lambda n: output_lengths(model, n)  # noqa: E731
    chosen = select_subset(utts, limit, seed)
    if getattr(sm, "vocab", None) is not None:  # before any audio is decoded or any search starts
        from recipes.speech.text import check_transcripts, text_codec

        check_transcripts(text_codec(sm), chosen)
    loaded, skipped = [], []
    for utt in chosen:
        try:
            wav = load_audio(utt.path, sr, utt.audio)
            if frames is not None and int(frames(torch.tensor([len(wav)]))) < 1:
                raise AudioError(f"{utt.path}: {len(wav)} samples is shorter than the model's receptive "
                                 "field (no output frame)")
        except AudioError as e:
            if not skip_bad:
                raise
            log.warning("skipping unreadable audio: %s", e)
            skipped.append(str(utt.path))
            continue
        loaded.append((utt, normalize_waveform(wav) if do_normalize else wav))
    if skipped:
        log.warning("skipped %d unreadable audio file(s)", len(skipped))
    return group_batches(loaded, with_mask, batch_seconds, sr, skipped)


def group_batches(loaded: list[tuple[Utterance, np.ndarray]], with_mask: bool, batch_seconds: float,
                  sampling_rate: int = 16000, skipped: list[str] | None = None) -> BatchList:
    """Sort by length and batch equal-length waveforms, at most ``batch_seconds`` each."""
    if not loaded:
        raise ValueError("no readable utterances to batch")
    loaded = sorted(loaded, key=lambda item: (len(item[1]), item[0].id))
    budget = batch_seconds * sampling_rate
    batches, current = [], []
    for item in loaded:
        n = len(item[1])
        if current and (n != len(current[0][1]) or n * (len(current) + 1) > budget):
            batches.append(_collate(current, with_mask))
            current = []
        current.append(item)
    batches.append(_collate(current, with_mask))
    return BatchList(batches, skipped or [], sampling_rate)
