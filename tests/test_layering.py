"""Layering guards: ModelOpt's private quantizer/calibrator attributes are touched in one module;
model-family module paths stay in the family files."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT / "sq_plugin" / "modelopt_private.py"
# private TensorQuantizer / _Calibrator attributes of ModelOpt 0.47 (not a calibrator's own `self._x`)
PRIVATE = re.compile(r"(?<!\bself)\._(amax|calibrator|num_bits|unsigned|axis|if_calib|if_quant|disabled|dynamic|"
                     r"narrow_range|get_amax|get_bias|bias_value|bias_type|use_constant_amax|block_sizes|fake_quant|"
                     r"block_reshape_size|setup_for_blockquant|process_for_blockquant)\b")


def _sources():
    for package in ("recipes", "sq_plugin", "calibrators", "benchmarks"):
        yield from sorted((ROOT / package).rglob("*.py"))


def test_private_modelopt_attributes_only_in_the_glue_module():
    offenders = []
    for path in _sources():
        if path == GLUE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_guard_would_catch_an_access():
    assert PRIVATE.search("cal = q._calibrator") and PRIVATE.search("bits = quantizer._num_bits")
    assert not PRIVATE.search("return self._num_bits") and not PRIVATE.search("q.num_bits")


def test_family_module_paths_stay_in_family_files():
    """HF / torchaudio module names appear only in recipes/speech (the config patterns of the demo's
    HF layout in qconfig are data for users, not structure the code relies on)."""
    paths = re.compile(r"conv_layers|encoder\.layers|encoder\.transformer|_get_feat_extract_output_lengths|"
                       r"\.lm_head\b|\.logits\b(?!\()")
    allowed = {ROOT / "recipes" / name for name in ("qconfig.py", "train_demo.py", "ship_demo.py", "onnx_runner.py")}
    offenders = []
    for path in sorted((ROOT / "recipes").rglob("*.py")):
        if "speech" in path.parts or path in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if paths.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_calibrator_bit_sync_is_needed_on_this_modelopt_and_applied():
    """The bit-width workaround is active exactly while ModelOpt does not pass the bits itself."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    import sq_plugin  # noqa: F401
    from calibrators import StableQuantCalibrator
    from sq_plugin.modelopt_private import calibrator_bits, calibrator_of, tuple_calibrators_get_quantizer_bits

    patched = getattr(TensorQuantizer.set_from_attribute_config, "_sq_plugin_sync", False)
    q = TensorQuantizer()
    q.set_from_attribute_config({"num_bits": 6, "calibrator": (StableQuantCalibrator, (), {})})
    assert calibrator_bits(calibrator_of(q))[0] == 6
    assert patched or tuple_calibrators_get_quantizer_bits()
