"""The shipped demo: a tiny wav2vec2 CTC model trained on espeak-ng English, plus small data sets.

Why: examples, tests and CI need a real speech model and real audio without any
download. See model/README.md for how both were made (recipes.data.synth, recipes.data.train_demo).

Splits (each a plain TSV `audio/X.flac<TAB>TRANSCRIPT` next to its audio):
  calib, dev, test   -- test mixes training voices and held-out voices
  test_seen          -- the training-voice part of test (same audio files)
  test_heldout       -- the held-out-voice part of test (voices never trained on)
"""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODEL_DIR = DEMO_DIR / "model"
DEMO_DATA_DIR = DEMO_DIR / "data"
SPLITS = {"calib": "calib/index.tsv", "dev": "dev/index.tsv", "test": "test/index.tsv",
          "test_seen": "test/index_seen.tsv", "test_heldout": "test/index_heldout.tsv"}


def demo_data(split: str) -> Path:
    """Path of the index.tsv of a shipped split (calib, dev, test, test_seen, test_heldout)."""
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; choose from {sorted(SPLITS)}")
    path = DEMO_DATA_DIR / SPLITS[split]
    if not path.is_file():
        raise FileNotFoundError(f"demo split {split!r} is missing: {path}")
    return path


__all__ = ["DEMO_DIR", "DEMO_MODEL_DIR", "DEMO_DATA_DIR", "SPLITS", "demo_data"]
