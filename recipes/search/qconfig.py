"""Plain, JSON-serialisable ModelOpt configs for SFMs, and applying them to a model.

The recipe's final product is one of these dicts: anyone can re-apply it with ``mtq.quantize``
on a fresh copy of the model (with ``import sq_plugin`` first, which registers "stablequant").
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from recipes.evaluation.asr import forward_logits
from recipes.speech.models import SpeechModel, remove_weight_norm

SUPPORTED_BITS = range(2, 17)
# quantizer-name patterns for each layer kind of the HF SFM family
CNN_PATTERN = "*feature_extractor.conv_layers.*"
# inputs of the CNN layers after the first (its input is the one-channel waveform)
CNN_EQUALIZE = ("*feature_extractor.conv_layers.[1-9]*.input_quantizer",)


def quant_cfg(wbits: int = 8, abits: int = 8, disable: Sequence[str] = ()) -> list[dict]:
    """ModelOpt 0.47 list-style ``quant_cfg``: per-channel weights, per-tensor activations.

    Every Conv1d/Linear input (activation) and weight is quantized; ``disable`` lists extra
    quantizer-name patterns to keep in float (e.g. the CNN for "Transformer layers only").
    """
    for name, bits in (("weight", wbits), ("activation", abits)):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"{name} bits must be in 2..16, got {bits}")
    cfg = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": wbits, "axis": 0}},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": abits, "axis": None}},
        # ModelOpt also wraps LayerNorm; the paper (and TensorRT's fused kernels) quantize only
        # the inputs of Conv1d/Linear layers
        {"quantizer_name": "*layer_norm*", "enable": False},
        # ... and, by class, what other families hold under other names: SEW-D's DeBERTa-style
        # "LayerNorm"s and relative-position Embedding, SEW's AvgPool1d squeeze, the conformer's
        # BatchNorm1d
        *({"quantizer_name": "*", "parent_class": cls, "enable": False}
          for cls in ("nn.LayerNorm", "nn.Embedding", "nn.AvgPool1d", "nn.BatchNorm1d")),
    ]
    cfg += [{"quantizer_name": pattern, "enable": False} for pattern in disable]
    return cfg


def stablequant_config(
    wbits: int = 8,
    abits: int = 8,
    cutoff: float = 0.0,
    clip_layers: Iterable[str] = (),
    num_bins: int = 2048,
    disable: Sequence[str] = (),
    equalize: Sequence[str] = (),
    equalize_alpha: float = 0.5,
) -> dict:
    """The full ``mtq.quantize`` config that reproduces a StableQuant result."""
    algorithm = {
        "method": "stablequant",
        "cutoff": float(cutoff),
        "clip_layers": sorted(clip_layers),
        "num_bins": int(num_bins),
    }
    if equalize:
        algorithm.update(equalize=list(equalize), equalize_alpha=float(equalize_alpha))
    return {"quant_cfg": quant_cfg(wbits, abits, disable), "algorithm": algorithm}


def calibration_loop(batches: Sequence):
    """A ModelOpt ``forward_loop`` over calibration batches."""

    def forward_loop(model: nn.Module) -> None:
        with torch.inference_mode():
            for batch in batches:
                forward_logits(model, batch)

    return forward_loop


def modelopt_prints_to_stderr():
    """ModelOpt prints progress ("Inserted N quantizers") to stdout; `--json` output must stay JSON."""
    return contextlib.redirect_stdout(sys.stderr)


def quantize_copy(sm: SpeechModel, config: dict, calib_batches: Sequence) -> SpeechModel:
    """A quantized deep copy of ``sm`` (the original stays float)."""
    import modelopt.torch.quantization as mtq

    import sq_plugin  # noqa: F401  (registers the "stablequant" algorithm)

    if not calib_batches:
        raise ValueError("calibration data is empty")
    # weight norm is removed in place first (outputs unchanged): parametrized modules cannot be
    # deep-copied, and ModelOpt cannot wrap them
    model = copy.deepcopy(remove_weight_norm(sm.model)).eval()
    with modelopt_prints_to_stderr():
        mtq.quantize(model, copy.deepcopy(config), calibration_loop(calib_batches))
    check_config_matches(model, config)
    return SpeechModel(**{**sm.__dict__, "model": model})


def quantizer_names(model: nn.Module) -> list[str]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def check_config_matches(model: nn.Module, config: dict) -> None:
    """Every ``clip_layers`` pattern must name a quantizer of this model (error lists them)."""
    names = quantizer_names(model)
    if not names:
        raise ValueError("the model has no quantizable layers (no Conv1d/Linear quantizers)")
    algo = config.get("algorithm") or {}
    patterns = algo.get("clip_layers", []) if isinstance(algo, dict) else []
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise ValueError(f"config clip_layers match no quantizer of this model: {unknown}")


def load_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ModelOpt config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "quant_cfg" not in config:
        raise ValueError(f"{path}: expected a ModelOpt config with a 'quant_cfg' key")
    return config_from_json(config)


def config_from_json(config: dict) -> dict:
    """A config read from JSON, with the integer axes of every ``block_sizes`` restored.

    Workaround: JSON object keys are strings, and ModelOpt 0.47's ``QuantizerAttributeConfig``
    refuses ``{"-1": 128}`` (it wants ``{-1: 128}``), so a saved block-format config would not
    re-apply. Remove when ModelOpt coerces numeric string keys itself.
    """
    def fix(cfg):
        if isinstance(cfg, list):
            return [fix(c) for c in cfg]
        if not isinstance(cfg, dict):
            return cfg
        out = {k: fix(v) for k, v in cfg.items()}
        if isinstance(out.get("block_sizes"), dict):
            out["block_sizes"] = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v
                                  for k, v in out["block_sizes"].items()}
        return out

    return {**config, "quant_cfg": fix(config["quant_cfg"])}


def load_quantized(sm: SpeechModel, path: str | Path) -> SpeechModel:
    """``sm`` with the quantized model ``stablequant quantize`` saved as ``model.pth`` (``mto.save``).

    Read with ``torch.load(weights_only=True)``: tensors and plain containers only, never pickled
    code. The file must come from the same architecture as ``sm`` (the error says so otherwise).
    """
    import pickle

    import modelopt.torch.opt as mto

    import sq_plugin  # noqa: F401  (quantizers with our calibrators restore only once it is registered)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantized model not found: {path}")
    model = copy.deepcopy(remove_weight_norm(sm.model)).eval()
    try:
        with modelopt_prints_to_stderr():
            restored = mto.restore(model, path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a quantized model saved by 'stablequant quantize' for this --model "
                         f"({type(e).__name__}: {first[:200]})") from None
    return SpeechModel(**{**sm.__dict__, "model": restored.eval()})
