"""Fixtures shared by several test files (pytest finds them here; no test file imports another)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from recipes.data.readers import make_batches, open_dataset
from recipes.evaluation.asr import transcribe
from recipes.speech.models import random_model, remove_weight_norm


def _write_set(root, name, n, rng, texts=None):
    d = root / name
    d.mkdir()
    rows = []
    for i in range(n):
        x = rng.standard_normal(6000 + 1000 * i).astype("float32") * 0.1
        x[rng.integers(len(x))] = 3.0  # a spike: outliers for the CNN input
        sf.write(d / f"{name}{i}.flac", x, 16000)
        rows.append(f"{name}{i}.flac\t{texts[i] if texts else 'X'}")
    (d / "index.tsv").write_text("\n".join(rows) + "\n")
    return d / "index.tsv"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random model, 4 calibration and 5 dev utterances whose references are the float
    model's own transcripts (float WER 0: every quantization error shows as WER)."""
    root = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(0)
    sm = random_model("tiny", seed=3)
    remove_weight_norm(sm.model)
    calib = make_batches(open_dataset(_write_set(root, "calib", 4, rng)), sm, batch_seconds=2)
    utts0 = open_dataset(_write_set(root, "dev0", 5, np.random.default_rng(1)))
    dev0 = make_batches(utts0, sm, batch_seconds=1.5)
    by_id = dict(zip([i for b in dev0 for i in b.ids], transcribe(sm, dev0, progress=False)))
    texts = [by_id[u.id] or "A" for u in utts0]  # same audio, in file order
    dev = make_batches(open_dataset(_write_set(root, "dev", 5, np.random.default_rng(1), texts)), sm, batch_seconds=1.5)
    return sm, calib, dev
