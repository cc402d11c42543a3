"""The README's ModelOpt snippet runs as written on the shipped demo model."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text()
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
    from recipes.models import remove_weight_norm
    from recipes.qconfig import calibration_loop

    scope: dict = {}
    exec(compile(_python_block_after("### The whole recipe from Python"), "README.md", "exec"), scope)
    out = scope["out"]
    assert set(out.report["meta"]["dev"]) == {"fp32", "max", "percentile", "mse", "entropy", "stablequant"}
    assert out.report["recipe"] == "default" and out.config["algorithm"]["layer_calibrators"]
    # oracle: the same config re-applied by ModelOpt to a fresh copy gives the same scales
    fresh = remove_weight_norm(copy.deepcopy(scope["model"]))
    from recipes.api import speech_model

    sm = speech_model(fresh, scope["processor"])
    mtq.quantize(fresh, out.config, calibration_loop(as_batches(scope["pairs"]("calib", 8), sm)))
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
    text = README.read_text().replace("\\\n", " ")
    uses = re.findall(r"stablequant (quantize|compare|eval|export|calibrators)\b([^`|\n]*)", text)
    assert len(uses) >= 10
    checked = 0
    for command, rest in uses:
        known = {s for a in subparsers[command]._actions for s in a.option_strings}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
            assert flag in known, f"README: `stablequant {command}` has no option {flag}"
            checked += 1
    assert checked >= 20
