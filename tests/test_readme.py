"""The README's and docs/' snippets run as written on the shipped demo model."""

import re
import textwrap
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = sorted((README.parent / "docs").glob("*.md"))


def _all_text() -> str:
    """README then every docs/ page: where the tested code blocks and command lines live."""
    return "\n\n".join(path.read_text() for path in [README, *DOCS])


def _python_block_after(heading: str) -> str:
    text = _all_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_modelopt_snippet_runs_on_the_demo_model():
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.nn import TensorQuantizer

    from calibrators import EntropyCalibrator, MSECalibrator

    scope: dict = {}
    exec(compile(_python_block_after("## Use it from ModelOpt"), "README.md", "exec"), scope)
    model = scope["model"]
    acts = {n: q for n, q in model.named_modules()
            if isinstance(q, TensorQuantizer) and q.is_enabled and n.endswith("input_quantizer")}
    assert len(acts) > 20 and all(q.amax is not None and float(q.amax) > 0 for q in acts.values())
    ffn_out = {n: q for n, q in acts.items() if n.endswith("output_dense.input_quantizer")}
    assert ffn_out and all(isinstance(q._calibrator, MSECalibrator) and q.bias and float(q.bias_value) > 0
                           for q in ffn_out.values())  # shifted up: GELU outputs are one-sided
    assert all(isinstance(q._calibrator, EntropyCalibrator) and not q.bias for n, q in acts.items()
               if ".encoder.layers." in n and n not in ffn_out)


def test_python_entry_point_snippet_runs_and_its_config_reapplies():
    pytest.importorskip("modelopt.torch.quantization")
    import copy

    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    from recipes.api import as_batches
    from recipes.runtime.device import batches_to
    from recipes.search.qconfig import calibration_loop
    from recipes.speech.models import remove_weight_norm

    scope: dict = {}
    exec(compile(_python_block_after("### The whole recipe from Python"), "README.md", "exec"), scope)
    out = scope["out"]
    assert set(out.report["meta"]["dev"]) == {"fp32", "max", "percentile", "mse", "entropy", "stablequant"}
    assert out.report["recipe"] == "default" and out.config["algorithm"]["layer_calibrators"]
    # oracle: the same config re-applied by ModelOpt to a fresh copy gives the same scales
    fresh = remove_weight_norm(copy.deepcopy(scope["model"]))
    from recipes.api import speech_model

    sm = speech_model(fresh, scope["processor"])
    device = next(out.model.parameters()).device  # device="auto": CUDA where there is one
    fresh.to(device)
    mtq.quantize(fresh, out.config, calibration_loop(batches_to(as_batches(scope["pairs"]("calib", 8), sm), device)))
    mine = dict(out.model.named_modules())
    for name, q in fresh.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            assert torch.equal(q.amax, mine[name].amax), name


def test_every_stablequant_option_the_readme_names_exists():
    """Each `stablequant SUB ... --flag` in the README names a real sub-command and real flags."""
    import argparse

    from recipes.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    text = _all_text().replace("\\\n", " ")
    uses = re.findall(r"stablequant (quantize|compare|eval|export|calibrators)\b([^`|\n]*)", text)
    assert len(uses) >= 10
    checked = 0
    for command, rest in uses:
        known = {s for a in subparsers[command]._actions for s in a.option_strings}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
            assert flag in known, f"README: `stablequant {command}` has no option {flag}"
            checked += 1
    assert checked >= 20


def _as_module(name: str, heading: str):
    """The README block under ``heading`` executed as the module ``name`` (as a package would hold it)."""
    import sys
    import types

    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(_python_block_after(heading), f"README.md:{heading}", "exec"), module.__dict__)
    return module


def test_calibrator_plugin_snippet_registers_and_calibrates(monkeypatch):
    pytest.importorskip("modelopt.torch.quantization")
    import sys
    import types

    import sq_plugin

    monkeypatch.setitem(sys.modules, "my_pkg", types.ModuleType("my_pkg"))
    ext = _as_module("my_pkg.sq_ext", "### Add your own calibrator (pluggy)")
    monkeypatch.delitem(sys.modules, "my_pkg.sq_ext")
    sq_plugin.register_plugin(ext)
    try:
        assert "my-calibrator" in sq_plugin.calibrator_names()
        cls, args, kwargs = sq_plugin.calibrator("my-calibrator")
        cal = cls(*args, **kwargs)
        cal.collect(torch.tensor([0.5, -4.0, 2.0]))
        assert float(cal.compute_amax()) == pytest.approx(0.9 * 4.0)  # the snippet's rule, by hand
    finally:
        sq_plugin.unregister_plugin(ext)
    assert "my-calibrator" not in sq_plugin.calibrator_names()


def test_model_family_snippet_loads_and_runs_a_model(monkeypatch, tmp_path):
    """The family block as written, with MyCTC standing for the user's module (the toy of
    tests/test_speech_families.py has the block paths the snippet names)."""
    import sys
    import types

    from test_speech_families import ToyCTC

    from recipes.speech import family_of, layer_inventory, register_family_plugin, unregister_family_plugin
    from recipes.speech.models import resolve_model

    class MyCTC(ToyCTC):
        pass

    model_mod = types.ModuleType("my_pkg.model")
    model_mod.MyCTC = MyCTC
    monkeypatch.setitem(sys.modules, "my_pkg", types.ModuleType("my_pkg"))
    monkeypatch.setitem(sys.modules, "my_pkg.model", model_mod)
    family = _as_module("my_pkg.sq_family", "### Add a model family (pluggy)")
    monkeypatch.delitem(sys.modules, "my_pkg.sq_family")
    register_family_plugin(family, name="readme-family")
    try:
        torch.manual_seed(0)
        reference = MyCTC().eval()
        torch.save(reference.state_dict(), tmp_path / "m.myctc")
        sm = resolve_model(tmp_path / "m.myctc")
        assert family_of(sm).name == "my-ctc" and sm.vocab == ["<blank>", "|", "A", "B"]
        assert {i.kind for i in layer_inventory(sm)} >= {"cnn", "transformer", "head"}
        x = torch.randn(1, 4000)
        with torch.no_grad():
            assert torch.equal(family_of(sm).logits(sm.model, x), reference(x))
    finally:
        unregister_family_plugin(family)


def _bash_lines(prefix: str) -> list[str]:
    text = _all_text().replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith(prefix)]


def test_synth_lines_build_a_data_set_the_cli_reads(tmp_path):
    """The README's `python -m recipes.data.synth` lines, run as written but with 2 utterances each."""
    import shutil
    import subprocess
    import sys

    lines = _bash_lines("python -m recipes.data.synth")
    assert len(lines) == 2
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng/sox not installed (apt-get install espeak-ng sox)")
    from recipes.data.readers import open_dataset

    for line in lines:
        args = line.split()[3:]
        args[args.index("--count") + 1] = "2"
        out = tmp_path / Path(args[args.index("--out") + 1]).name
        args[args.index("--out") + 1] = str(out)
        subprocess.run([sys.executable, "-m", "recipes.data.synth", *args], check=True, capture_output=True,
                       cwd=README.parent)
        utterances = list(open_dataset(out / "index.tsv"))
        assert len(utterances) == 2 and all(u.text.strip() for u in utterances)


def test_trtexec_line_matches_the_exported_onnx(tmp_path):
    """`trtexec ... --minShapes=input_values:1x8000 ...`: the input the exporter writes, with
    dynamic batch and length, and shapes long enough for the model's receptive field."""
    pytest.importorskip("modelopt.torch.quantization")
    import copy

    import modelopt.torch.quantization as mtq
    import onnx

    from recipes.export.onnx import export_onnx
    from recipes.speech.models import random_model, remove_weight_norm

    (line,) = _bash_lines("trtexec")
    assert "--stronglyTyped" in line and "--onnx=model.onnx" in line
    shapes = dict(re.findall(r"--(min|opt|max)Shapes=(\S+)", line))
    sm = random_model("tiny", seed=0)
    remove_weight_norm(sm.model)
    mtq.quantize(sm.model, copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: m(torch.randn(1, 16000)))
    proto = onnx.load(export_onnx(sm, tmp_path / "model.onnx")["path"])
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert len(dims) == 2 and all(d.dim_param for d in dims)  # batch and samples are dynamic
    for spec in shapes.values():
        name, shape = spec.split(":")
        batch, samples = map(int, shape.split("x"))
        assert name == graph_input.name and batch >= 1 and samples >= 400  # 400: wav2vec2's receptive field
    assert [int(shapes[k].split("x")[1]) for k in ("min", "opt", "max")] == \
        sorted(int(shapes[k].split("x")[1]) for k in ("min", "opt", "max"))


def test_auto_quantize_snippet_runs_on_the_demo_model():
    pytest.importorskip("modelopt.torch.quantization")
    scope: dict = {}
    exec(compile(_python_block_after("**Next to `mtq.auto_quantize`.**"), "README.md", "exec"), scope)
    best = scope["state"]["best"]
    assert best["is_satisfied"] and best["constraints"]["effective_bits"] <= 7.0
    assert any(str(r).startswith("CUSTOM_0") for r in best["recipe"].values())  # the StableQuant format


def _python_blocks() -> list[str]:
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", _all_text(), re.S)]


def test_calibrator_entry_snippet_puts_that_calibrator_on_the_quantizers():
    pytest.importorskip("modelopt.torch.quantization")
    import modelopt.torch.quantization as mtq
    from torch import nn

    from calibrators import StableQuantCalibrator

    (block,) = [b for b in _python_blocks() if "cfg_entry" in b]
    scope: dict = {}
    exec(compile(block, "README.md:cfg_entry", "exec"), scope)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    config = {"quant_cfg": [{"quantizer_name": "*", "enable": False}, scope["cfg_entry"]], "algorithm": "max"}
    x = torch.randn(256, 4)
    with torch.no_grad():
        h = torch.relu(model[0](x))  # what the last layer sees during calibration (nothing quantized yet)
    mtq.quantize(model, config, lambda m: m(x))
    cal = model[2].input_quantizer._calibrator
    assert isinstance(cal, StableQuantCalibrator) and cal._cutoff == 0.2
    # oracle: the same cut-off + MSE on the same data, directly
    ref = StableQuantCalibrator(num_bits=8, cutoff=0.2)
    ref.collect(h)
    assert torch.equal(model[2].input_quantizer.amax.reshape(()), ref.compute_amax().reshape(()))


def test_every_python_block_has_a_test():
    """A new README python block needs a test here that runs it: this count says when one is added."""
    blocks = _python_blocks()
    covered = ["import modelopt.torch.quantization as mtq", "cfg_entry", "from recipes.api import quantize",
               "my_pkg/sq_ext.py", "my_pkg/sq_family.py", "auto_quantize"]
    assert len(blocks) == len(covered), [b.splitlines()[0] for b in blocks]
    for marker in covered:
        assert sum(marker in b for b in blocks) >= 1, marker


def test_readme_is_a_front_page_and_its_links_resolve():
    import re as _re

    assert len(README.read_text().splitlines()) <= 250
    for page in [README, *DOCS]:
        for target in _re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).is_file(), f"{page.name}: broken link {target}"
