"""Oracle: relabelling a model's vocabulary changes nothing. The demo with its letters lowercased
(transcripts untouched), or mapped to Cyrillic with the transcripts mapped the same way, gives the
same WER/CER, recipe decisions, compare table, mixed allocation and ONNX figures, command by command."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import string

import pytest

from recipes.cli import main
from recipes.demo import DEMO_MODEL_DIR, demo_data

CYRILLIC = {c: chr(0x410 + i) for i, c in enumerate(string.ascii_uppercase)}  # А Б В ... Щ
VARIANTS = {
    "original": (lambda tok: tok, lambda text: text),
    "lowercase": (lambda tok: tok.lower() if len(tok) == 1 else tok, lambda text: text),
    "cyrillic": (lambda tok: CYRILLIC.get(tok, tok), lambda text: "".join(CYRILLIC.get(c, c) for c in text)),
}
UTTERANCES = 2  # per split: enough for every decision to be exercised, small enough for CI


def _make_variant(root, relabel_token, relabel_text):
    model = root / "model"
    shutil.copytree(DEMO_MODEL_DIR, model)
    vocab = json.loads((model / "vocab.json").read_text())
    (model / "vocab.json").write_text(json.dumps({relabel_token(t): i for t, i in vocab.items()}, ensure_ascii=False))
    for split in ("calib", "dev", "test"):
        src = demo_data(split)
        (root / split).mkdir()
        (root / split / "audio").symlink_to(src.parent / "audio")
        lines = src.read_text().splitlines()[:UTTERANCES]
        rows = [f"{path}\t{relabel_text(text)}" for path, text in (line.split("\t") for line in lines)]
        (root / split / "index.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def _run_all(root) -> dict:
    """Every sub-command on one variant; returns what they wrote, paths and timings left out."""
    m, data = ["--model", str(root / "model")], {s: str(root / s / "index.tsv") for s in ("calib", "dev", "test")}
    search = ["--calib", data["calib"], "--dev", data["dev"], "--grid", "0,0.1", "--num-bins", "256"]
    out = {}
    for name, extra in {"default": [], "paper": ["--recipe", "paper"], "mixed": ["--budget-bits", "6"]}.items():
        assert main(["quantize", *m, *search, *extra, "--out", str(root / name)]) == 0
        out[name] = {f: _plain(json.loads((root / name / f).read_text()))
                     for f in ("report.json", "modelopt_config.json")}
    assert main(["compare", *m, *search, "--test", data["test"], "--bits", "8", "--budgets", "6",
                 "--out", str(root / "cmp")]) == 0
    out["compare"] = _plain(json.loads((root / "cmp" / "compare.json").read_text()))
    out["compare.md"] = (root / "cmp" / "compare.md").read_text().replace(str(root), "ROOT")
    onnx = root / "model.onnx"
    assert main(["export", *m, "--config", str(root / "default" / "modelopt_config.json"),
                 "--calib", data["calib"], "--onnx", str(onnx)]) == 0
    for name, source in {"eval": m, "eval_quantized": [*m, "--quantized", str(root / "default" / "model.pth")],
                         "eval_onnx": ["--onnx", str(onnx)]}.items():
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["eval", *source, "--data", data["test"], "--json"]) == 0
        result = json.loads(printed.getvalue())
        out[name] = (result["wer"], result["cer"], result["n"])
    return out


def _plain(value):
    """JSON without what legitimately differs between the variants: timings and file paths."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()
                if not (k.endswith("seconds") or k in ("model", "source", "data", "elapsed", "rtf"))}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for name, (relabel_token, relabel_text) in VARIANTS.items():
        results[name] = _run_all(_make_variant(tmp_path_factory.mktemp(name), relabel_token, relabel_text))
    return results


def test_every_command_gives_the_same_figures_and_decisions_under_relabelling(runs):
    original = runs["original"]
    assert original["compare"]["bits"]["8"]["stablequant"] >= 0  # it did score something
    for name in ("lowercase", "cyrillic"):
        for command in original:
            assert runs[name][command] == original[command], (name, command)
