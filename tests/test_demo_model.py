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


def test_wer_does_not_depend_on_batch_seconds(tmp_path):
    """Same transcripts and WER whether utterances go one at a time or grouped (never padded).

    Half the set is cut to one common length so that large budgets really do batch them."""
    from recipes.evaluation.evaluate import run_eval

    tsv = demo_data("test")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()][:12]
    lines = []
    for i, (rel, text) in enumerate(rows):
        audio, sr = sf.read(str(tsv.parent / rel), dtype="float32")
        if i % 2:
            audio = audio[: 2 * sr]  # 2 s each; their transcripts are then wrong, which is fine
        sf.write(tmp_path / f"u{i}.flac", audio, sr)
        lines.append(f"u{i}.flac\t{text}")
    (tmp_path / "set.tsv").write_text("\n".join(lines) + "\n")
    results = {s: run_eval("demo", tmp_path / "set.tsv", batch_seconds=s, progress=False, print_table=False)
               for s in (1.0, 4.5, 200.0)}
    ref = results[1.0]
    for s, r in results.items():
        assert dict(zip(r["ids"], r["hyps"])) == dict(zip(ref["ids"], ref["hyps"])), s
        assert (r["wer"], r["cer"]) == (ref["wer"], ref["cer"]), s
