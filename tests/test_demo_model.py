"""The shipped demo model loads offline and reproduces its recorded greedy transcripts."""
import json

import pytest
import soundfile as sf
import torch

from recipes.demo import DEMO_DIR, DEMO_MODEL_DIR, SPLITS, demo_data

EXPECTED = DEMO_MODEL_DIR / "expected_transcripts.json"
pytestmark = pytest.mark.skipif(not EXPECTED.is_file(), reason="demo model not shipped")


def test_demo_splits_exist_and_are_plain_tsv():
    for split in SPLITS:
        tsv = demo_data(split)
        rows = [l.split("\t") for l in tsv.read_text().splitlines()]
        assert rows and all(len(r) == 2 for r in rows), split
        assert all((tsv.parent / rel).is_file() for rel, _ in rows), split
    with pytest.raises(ValueError):
        demo_data("nope")


def test_demo_model_files_are_small_and_safetensors_only():
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert "model.safetensors" in names and "pytorch_model.bin" not in names
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size <= 15 * 2**20
    assert sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file()) <= 40 * 2**20


def test_demo_model_reproduces_expected_transcripts():
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    model = Wav2Vec2ForCTC.from_pretrained(DEMO_MODEL_DIR).eval()
    processor = Wav2Vec2Processor.from_pretrained(DEMO_MODEL_DIR)
    expected = json.loads(EXPECTED.read_text())["utterances"]
    assert len(expected) == 3
    for utt in expected:
        audio, sr = sf.read(str(DEMO_DIR / "data" / utt["audio"]), dtype="float32")
        x = processor(audio, sampling_rate=sr, return_tensors="pt").input_values
        with torch.no_grad():
            ids = model(x).logits.argmax(-1)
        assert processor.batch_decode(ids)[0] == utt["hypothesis"], utt["audio"]
