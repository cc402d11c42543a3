"""Package and score the demo model: copy it and small data splits into recipes/demo, then
measure greedy-CTC WER/CER with the shipped files exactly as a user loads them.

Why: the model card's numbers and tests/test_demo_model.py's expected transcripts must
come from the shipped artifacts (HF from_pretrained + Wav2Vec2Processor), not from
the trainer's in-memory model.

    python -m recipes.data.ship_demo --model work_data/model --work work_data
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import jiwer
import soundfile as sf
import torch
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

from recipes.demo import DEMO_DATA_DIR, DEMO_MODEL_DIR

MODEL_FILES = ["config.json", "model.safetensors", "vocab.json", "tokenizer_config.json",
               "special_tokens_map.json", "preprocessor_config.json", "processor_config.json",
               "training_state.json"]


def read_index(tsv: Path) -> list[tuple[str, str]]:
    return [tuple(l.split("\t")) for l in tsv.read_text().splitlines() if l.strip()]


def copy_split(rows, src: Path, dst: Path, prefix: str = "") -> list[tuple[str, str]]:
    """Copy FLACs into dst/audio (optionally renamed with a prefix); return new rows."""
    (dst / "audio").mkdir(parents=True, exist_ok=True)
    out = []
    for rel, text in rows:
        new = f"audio/{prefix}{Path(rel).name}"
        shutil.copyfile(src / rel, dst / new)
        out.append((new, text))
    return out


def write_index(path: Path, rows) -> None:
    path.write_text("".join(f"{r}\t{t}\n" for r, t in rows))


def pack(model_dir: Path, work: Path, n_calib: int, n_dev: int, n_seen: int, n_heldout: int) -> None:
    DEMO_MODEL_DIR.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (model_dir / name).exists():
            shutil.copyfile(model_dir / name, DEMO_MODEL_DIR / name)
    for split, n in [("calib", n_calib), ("dev", n_dev)]:
        shutil.rmtree(DEMO_DATA_DIR / split, ignore_errors=True)
        rows = copy_split(read_index(work / split / "index.tsv")[:n], work / split, DEMO_DATA_DIR / split)
        write_index(DEMO_DATA_DIR / split / "index.tsv", rows)
    test = DEMO_DATA_DIR / "test"
    shutil.rmtree(test, ignore_errors=True)
    seen = copy_split(read_index(work / "test" / "index.tsv")[:n_seen], work / "test", test, "seen_")
    held = copy_split(read_index(work / "test_heldout" / "index.tsv")[:n_heldout],
                      work / "test_heldout", test, "heldout_")
    write_index(test / "index.tsv", seen + held)
    write_index(test / "index_seen.tsv", seen)
    write_index(test / "index_heldout.tsv", held)


@torch.no_grad()
def transcribe(model, processor, path: Path) -> str:
    """Single unpadded utterance through the shipped processor, greedy CTC decoding."""
    audio, sr = sf.read(str(path), dtype="float32")
    x = processor(audio, sampling_rate=sr, return_tensors="pt").input_values
    return processor.batch_decode(model(x).logits.argmax(-1))[0]


def score(model, processor, tsv: Path) -> dict:
    rows = read_index(tsv)
    hyps = [transcribe(model, processor, tsv.parent / r) for r, _ in rows]
    refs = [t for _, t in rows]
    return dict(n=len(rows), wer=jiwer.wer(refs, hyps), cer=jiwer.cer(refs, hyps), hyps=hyps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="trained HF model dir")
    ap.add_argument("--work", type=Path, default=Path("work_data"),
                    help="dir with calib/ dev/ test/ test_heldout/ made by recipes.data.synth")
    ap.add_argument("--no-pack", action="store_true", help="only score what is shipped")
    ap.add_argument("--counts", type=int, nargs=4, default=[64, 100, 100, 50],
                    metavar=("CALIB", "DEV", "TEST_SEEN", "TEST_HELDOUT"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not a.no_pack:
        pack(a.model, a.work, *a.counts)
    model = Wav2Vec2ForCTC.from_pretrained(DEMO_MODEL_DIR).eval()
    processor = Wav2Vec2Processor.from_pretrained(DEMO_MODEL_DIR)
    sets = {"shipped dev": DEMO_DATA_DIR / "dev/index.tsv",
            "shipped test (training voices)": DEMO_DATA_DIR / "test/index_seen.tsv",
            "shipped test (held-out voices)": DEMO_DATA_DIR / "test/index_heldout.tsv",
            "full dev": a.work / "dev/index.tsv",
            "full test (training voices)": a.work / "test/index.tsv",
            "full test (held-out voices)": a.work / "test_heldout/index.tsv"}
    results = {}
    for name, tsv in sets.items():
        if tsv.is_file():
            results[name] = score(model, processor, tsv)
    print("| set | utts | WER | CER |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['n']} | {100 * r['wer']:.1f}% | {100 * r['cer']:.1f}% |")
    # Three fixed shipped test utterances (2 training-voice, 1 held-out) for the unit test.
    picks = []
    for key, tsv, k in [("shipped test (training voices)", "test/index_seen.tsv", 2),
                        ("shipped test (held-out voices)", "test/index_heldout.tsv", 1)]:
        for (rel, ref), hyp in list(zip(read_index(DEMO_DATA_DIR / tsv), results[key]["hyps"]))[:k]:
            picks.append(dict(audio=f"test/{rel}", reference=ref, hypothesis=hyp))
    (DEMO_MODEL_DIR / "expected_transcripts.json").write_text(json.dumps(
        dict(decoding="greedy CTC, Wav2Vec2Processor, one unpadded utterance",
             data_dir="recipes/demo/data", utterances=picks), indent=1) + "\n")
    (DEMO_MODEL_DIR / "eval_results.json").write_text(json.dumps(
        {k: {m: v[m] for m in ("n", "wer", "cer")} for k, v in results.items()}, indent=1) + "\n")
    for p in picks:
        print(f"{p['audio']}: {p['hypothesis']!r} (ref {p['reference']!r})")


if __name__ == "__main__":
    main()
