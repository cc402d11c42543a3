"""The README's ModelOpt snippet runs as written on the shipped demo model."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_modelopt_snippet_runs_on_the_demo_model():
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.nn import TensorQuantizer

    from calibrators import EntropyCalibrator

    scope: dict = {}
    exec(compile(_python_block_after("## Use it from ModelOpt"), "README.md", "exec"), scope)
    model = scope["model"]
    acts = {n: q for n, q in model.named_modules()
            if isinstance(q, TensorQuantizer) and q.is_enabled and n.endswith("input_quantizer")}
    assert len(acts) > 20 and all(q.amax is not None and float(q.amax) > 0 for q in acts.values())
    assert all(isinstance(q._calibrator, EntropyCalibrator) for n, q in acts.items() if ".encoder.layers." in n)
