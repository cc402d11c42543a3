"""The ``stablequant`` command on a tiny saved model: outputs, refusals, re-applied config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from recipes.cli import main
from recipes.speech.models import random_model, save_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_model(random_model("tiny", seed=5), root / "model")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        sf.write(root / f"u{i}.flac", rng.standard_normal(5000 + 700 * i).astype("float32") * 0.1, 16000)
        rows.append(f"u{i}.flac\tHELLO THERE")
    (root / "set.tsv").write_text("\n".join(rows) + "\n")
    return root


def _quantize_args(ws, out, *extra):
    return ["quantize", "--model", str(ws / "model"), "--calib", str(ws / "set.tsv"), "--dev", str(ws / "set.tsv"),
            "--grid", "0,0.1,0.2", "--num-bins", "256", "--out", str(out), *extra]


def _check_dev_summary(report, final):
    dev = report["meta"]["dev"]
    assert set(dev) == {"fp32", "max", "percentile", "mse", "entropy", final}
    assert all(v["words"] == dev["fp32"]["words"] > 0 for v in dev.values())
    ci = report["meta"]["dev_intervals"][final]["vs_fp32"]
    assert ci["low"] <= ci["diff"] <= ci["high"] and ci["resamples"] >= 1000


def test_quantize_paper_recipe_writes_its_stages(workspace):
    out = workspace / "paper"
    assert main(_quantize_args(workspace, out, "--recipe", "paper")) == 0
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "modelopt_config.json", "model.pth", "state.json",
            "activation_ranges.png", "wer_vs_cutoff.png"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["grid"] == [0.0, 0.1, 0.2] and report["meta"]["recipe"] == "paper"
    assert len(report["stage1"]) > 10 and set(report["stage2"]) == {"0.0", "0.1", "0.2"}
    _check_dev_summary(report, "stablequant_paper")
    assert "| layer | kind | MAX amax |" in (out / "report.md").read_text()


def test_quantize_budget_bits_writes_mixed_report_and_resumes(workspace, capsys):
    out = workspace / "mixed"
    assert main(_quantize_args(workspace, out, "--budget-bits", "6")) == 0
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "modelopt_config.json", "model.pth", "state.json", "state_w8a8.json",
            "pareto.png"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["recipe"] == "mixed" and report["avg_weight_bits"] <= 6.0
    assert len(report["choices"]) > 10 and {c["format"] for c in report["choices"]} <= \
        {"float", "W8A8", "W6A6", "W4A8", "W4A16", "W4A8-blk", "W4A16-blk"}
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| layer | kind | weights | format |" in (out / "report.md").read_text()
    config = json.loads((out / "modelopt_config.json").read_text())
    named = {e["quantizer_name"]: e["cfg"]["num_bits"] for e in config["quant_cfg"] if "cfg" in e}
    blocks = {e["quantizer_name"]: e["cfg"].get("block_sizes") for e in config["quant_cfg"] if "cfg" in e}
    for c in report["choices"]:  # one exact entry per quantizer, with the chosen bits (and blocks)
        assert named.get(f"{c['layer']}.weight_quantizer") == c["wbits"]
        assert named.get(f"{c['layer']}.input_quantizer") == c["abits"]
        if c["block"]:
            assert list(blocks[f"{c['layer']}.weight_quantizer"].values()) == [c["block"][1], "static"]
    # another budget reuses the sensitivities (no new evaluation of the default recipe or layers)
    state = json.loads((out / "state.json").read_text())
    assert main(_quantize_args(workspace, out, "--budget-bits", "4", "--resume")) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["avg_weight_bits"] <= 4.0 and again["sensitivity"] == report["sensitivity"]
    assert json.loads((out / "state.json").read_text())["sensitivity"] == state["sensitivity"]
    capsys.readouterr()
    assert main(_quantize_args(workspace, workspace / "never", "--budget-bits", "6", "--recipe", "paper")) == 2
    assert "drop --recipe paper" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_quantize_args(workspace, workspace / "never", "--budget-bits", "3.5"))
    assert "must be >= 4.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_quantize_args(workspace, workspace / "never", "--budget-bits", "6", "--variants-per-forward", "0"))
    assert "--variants-per-forward" in capsys.readouterr().err


def test_quantize_writes_reports_and_refuses_existing_dir(workspace, capsys):
    out = workspace / "run"
    assert main(_quantize_args(workspace, out)) == 0
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "modelopt_config.json", "model.pth", "state.json",
            "activation_ranges.png"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["recipe"] == "default" and report["recipe"] == "default"
    assert len(report["layers"]) > 10 and report["final_kl"] <= min(v["kl"] for v in report["starts"].values())
    _check_dev_summary(report, "stablequant")
    assert (out / "activation_ranges.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "modelopt_config.json").read_text())
    assert config["algorithm"]["method"] == "stablequant"
    assert len(config["algorithm"]["layer_calibrators"]) == len(report["layers"])
    md = (out / "report.md").read_text()
    assert "| layer | kind | chosen calibrator |" in md and "Δ vs fp32 [95 % CI]" in md

    (out / "my_notes.txt").write_text("mine")
    assert main(_quantize_args(workspace, out)) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(_quantize_args(workspace, out, "--overwrite")) == 0
    assert (out / "my_notes.txt").read_text() == "mine"  # never deletes user files

    # the written config re-applies through `stablequant eval --config`
    assert main(["eval", "--model", str(workspace / "model"), "--data", str(workspace / "set.tsv"),
                 "--calib", str(workspace / "set.tsv"), "--config", str(out / "modelopt_config.json")]) == 0
    printed = capsys.readouterr().out
    assert "WER" in printed and '"wer"' not in printed  # the table for people
    assert main(["eval", "--model", str(workspace / "model"), "--data", str(workspace / "set.tsv"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # one JSON object for machines, nothing else
    assert 0 <= data["wer"] and len(data["hyps"]) == len(data["ids"]) == 4


def test_bad_input_is_a_clear_error(workspace, capsys):
    assert main(["quantize", "--model", "no-such-model", "--out", str(workspace / "x")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_quantize_args(workspace, workspace / "g", "--gamma", "-1"))
    assert "gamma" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_quantize_args(workspace, workspace / "h")[:-2] + ["--grid", "0.3,0.1", "--out", "h"])
    assert "increasing" in capsys.readouterr().err


def test_calibrators_listing(capsys):
    assert main(["calibrators"]) == 0
    out = capsys.readouterr().out
    for name in ("stablequant", "max", "percentile", "mse", "entropy"):
        assert name in out


def test_help_and_usage_errors_load_nothing_heavy():
    """`stablequant --help` and argument errors answer before torch/ModelOpt are imported."""
    import subprocess
    import sys

    code = ("import sys\nfrom recipes.cli import main\n"
            "for argv in (['--help'], ['quantize', '--help'], ['quantize', '--grid', '0.3,0.1', '--out', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'modelopt', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_library_packages_never_import_the_application():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for package in ("sq_plugin", "calibrators"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            assert "import recipes" not in text and "from recipes" not in text, path


def test_outputs_get_the_umask_mode_not_0600(tmp_path):
    import os

    from recipes.runtime.atomic import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_corrupt_state_and_ctrl_c_are_one_line_each(workspace, capsys, monkeypatch):
    out = workspace / "broken"
    out.mkdir()
    (out / "state.json").write_text('{"fingerprint": ')
    assert main(_quantize_args(workspace, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "state.json" in err and "not a state file" in err and "Traceback" not in err

    from recipes import workflows

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflows, "run_quantize", interrupted)
    assert main(_quantize_args(workspace, workspace / "ctrl-c")) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--resume" in err and "ctrl-c" in err


def test_export_engine_without_tensorrt_writes_nothing(workspace, capsys):
    pytest.importorskip("modelopt")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    onnx = workspace / "never.onnx"
    assert main(["export", "--model", str(workspace / "model"), "--calib", str(workspace / "set.tsv"),
                 "--allow-fp32", "--onnx", str(onnx), "--engine", str(workspace / "never.plan")]) == 2
    assert "TensorRT" in capsys.readouterr().err and not onnx.exists()


def test_export_into_a_read_only_directory_is_one_line_and_writes_nothing(workspace, capsys, monkeypatch):
    import os
    import tempfile

    ro = workspace / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: refuse the directory as a read-only mount would
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.samefile(dir, ro):
                raise PermissionError(13, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    args = ["export", "--model", str(workspace / "model"), "--calib", str(workspace / "set.tsv"),
            "--allow-fp32", "--onnx", str(ro / "model.onnx")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"directory {ro} is not writable" in err and "Traceback" not in err
    assert list(ro.iterdir()) == []
    ro.chmod(0o755)


def test_compare_writes_intervals_and_subsets(workspace):
    sub = workspace
    (sub / "half.tsv").write_text("./u0.flac\tHELLO THERE\nx/../u2.flac\tHELLO THERE\n")  # other spellings
    out = workspace / "cmp"
    args = ["compare", "--model", str(workspace / "model"), "--calib", str(workspace / "set.tsv"),
            "--dev", str(workspace / "set.tsv"), "--test", str(workspace / "set.tsv"), "--bits", "8",
            "--grid", "0,0.1", "--num-bins", "256", "--subset", f"half={sub / 'half.tsv'}", "--out", str(out)]
    assert main(args) == 0
    table = json.loads((out / "compare.json").read_text())
    row = table["bits"]["8"]
    for key in ("max", "percentile", "mse", "entropy", "stablequant", "stablequant_paper"):
        assert 0 <= row[key] and set(row["subsets"]["half"]) >= {key, "fp32"}
        assert row["intervals"][key]["vs_fp32"]["resamples"] == 1000
    assert "fp32_test_wer" in table and table["test_utterances"] == 4
    md = (out / "compare.md").read_text()
    assert "Test subsets" in md and "| W8A8 | half |" in md and "95 % CI" in md
    assert set(table["mixed"]) == {"6.0", "4.0"}  # default --budgets
    for budget, row in table["mixed"].items():
        assert row["avg_weight_bits"] <= float(budget) and 0 <= row["test_wer"]
        assert row["vs_fp32"]["resamples"] == 1000
    assert "| mixed, budget 6.0 |" in md
    # the mixed search resumed the 8-bit default-recipe run instead of searching again
    assert not (out / "state_w8a8.json").exists() and (out / "state_default_w8a8.json").exists()


@pytest.mark.parametrize("option,value,message", [
    ("--bits", "1", "must be >= 2"), ("--bits", "17", "must be <= 16"), ("--bits", "8.5", "not an integer"),
    ("--num-bins", "1000", "power of two"), ("--gamma", "-0.1", ">= 0.0"), ("--gamma", "nan", "finite"),
    ("--limit", "0", ">= 1"), ("--batch-seconds", "0", "> 0.0"),
])
def test_out_of_range_options_refused_before_loading(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model", "no-such-model", "--out", "never", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and message in err and "no-such-model" not in err


def test_corrupt_onnx_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(bytes(range(256)) * 12)
    assert main(["eval", "--onnx", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.onnx: not a readable ONNX model" in err and len(err.splitlines()) == 1


def test_saved_quantized_model_evaluates_and_exports_as_it_is(workspace, capsys):
    """OUT/model.pth: `eval --quantized` gives the report's own dev WER (no re-calibration), and
    `export --quantized` writes an ONNX that ONNX Runtime scores the same; bad files are one line."""
    pytest.importorskip("modelopt")
    out = workspace / "saved"
    assert main(_quantize_args(workspace, out)) == 0
    report = json.loads((out / "report.json").read_text())
    capsys.readouterr()
    common = ["--model", str(workspace / "model"), "--data", str(workspace / "set.tsv"), "--json"]
    assert main(["eval", *common, "--quantized", str(out / "model.pth")]) == 0
    saved = json.loads(capsys.readouterr().out)  # stdout is the JSON alone (ModelOpt's prints go to stderr)
    assert saved["wer"] == pytest.approx(report["final_wer"])  # dev set == this set in the fixture
    onnx_path = workspace / "saved.onnx"
    assert main(["export", "--model", str(workspace / "model"), "--quantized", str(out / "model.pth"),
                 "--onnx", str(onnx_path)]) == 0
    capsys.readouterr()
    assert main(["eval", *common, "--onnx", str(onnx_path)]) == 0
    assert json.loads(capsys.readouterr().out)["hyps"] == saved["hyps"]

    garbage = workspace / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for path, message in ((garbage, "garbage.pth"), (workspace / "missing.pth", "missing.pth")):
        assert main(["eval", *common, "--quantized", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["eval", *common, "--quantized", str(out / "model.pth"), "--config",
                 str(out / "modelopt_config.json")]) == 2
    assert "alternatives" in capsys.readouterr().err
    assert main(["eval", *common, "--calib", str(workspace / "set.tsv"), "--config",
                 str(out / "modelopt_config.json")]) == 0
    assert json.loads(capsys.readouterr().out)["wer"] == saved["wer"]  # re-calibrated: the same model
