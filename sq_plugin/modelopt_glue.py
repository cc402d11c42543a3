"""ModelOpt glue: the ``"stablequant"`` calibration algorithm and calibrator bit-width sync.

Kept thin on purpose: the range search lives in :mod:`calibrators`; this module only decides
which quantizer gets which calibrator and lets ModelOpt's own max-calibration loop drive them.
It is also the one module that touches ModelOpt's private ``TensorQuantizer`` / calibrator
attributes (the accessors below; ``tests/test_layering.py`` greps for any other use), so a ModelOpt
release that renames them breaks in one place. Public properties (``amax``, ``num_bits``,
``unsigned``, ``axis``, ``narrow_range``, ``is_enabled``, ``disable_calib()``...) are used wherever
they exist.
"""

from __future__ import annotations

import fnmatch
from typing import ClassVar, Literal

import torch
import torch.nn as nn
from modelopt.torch.opt.config import ModeloptField
from modelopt.torch.quantization import model_calib
from modelopt.torch.quantization.config import QuantizeAlgorithmConfig
from modelopt.torch.quantization.mode import BaseCalibrateModeDescriptor, CalibrateModeRegistry
from modelopt.torch.quantization.nn import TensorQuantizer

from calibrators import HistogramCalibratorBase, StableQuantCalibrator, per_channel_mse_amax

METHOD = "stablequant"


class StableQuantCalibConfig(QuantizeAlgorithmConfig):
    """``{"method": "stablequant", "cutoff": p, "clip_layers": [...], "num_bins": 2048}``.

    Activation quantizers whose name matches a ``clip_layers`` pattern (fnmatch) are calibrated
    with cut-off ``p`` (percent of histogram mass removed from the top) then MSE; all other
    activation quantizers with MSE only; weight quantizers keep ModelOpt's max calibration.
    """

    _mutates_weights: ClassVar[bool] = False

    method: Literal["stablequant"] = ModeloptField("stablequant")
    cutoff: float = ModeloptField(0.0, ge=0.0, le=50.0, title="Cut-off p (percent) for clip_layers.")
    clip_layers: list[str] = ModeloptField(
        [], title="fnmatch patterns of quantizer names that get the cut-off."
    )
    num_bins: int = ModeloptField(2048, ge=16, title="Histogram bins per activation quantizer.")
    mse: bool = ModeloptField(True, title="Pick the MSE-optimal scale within the kept range.")
    layer_calibrators: dict[str, dict] = ModeloptField(
        {}, title="fnmatch pattern -> {'calibrator': registered name, **its kwargs}; the last "
        "matching pattern wins over cutoff/clip_layers for that activation quantizer."
    )
    equalize: list[str] = ModeloptField(
        [], title="fnmatch patterns of activation quantizers whose layer input is equalised per channel "
        "(SmoothQuant-style: x / s quantized, weight columns * s) before calibration."
    )
    equalize_alpha: float = ModeloptField(0.5, ge=0.0, le=1.0, title="Migration strength alpha of s = "
                                          "max|x_c|^alpha / max|w_c|^(1 - alpha).")
    weight_calibrator: Literal["max", "mse"] = ModeloptField(
        "max", title="Per-channel weight amax: max |w|, or the MSE-optimal clip of each channel."
    )


# ----------------------------------------------------------------------------- private attributes
# ModelOpt 0.47 has no public getter for these.


def calibrator_of(q: TensorQuantizer):
    """The quantizer's calibrator (None before one is configured)."""
    return getattr(q, "_calibrator", None)


def set_calibrator(q: TensorQuantizer, cal) -> None:
    q._calibrator = cal


def calibrator_bits(cal) -> tuple[int, bool]:
    """(num_bits, unsigned) a ModelOpt-API calibrator searches scales for."""
    return cal._num_bits, cal._unsigned


def _set_calibrator_bits(cal, q: TensorQuantizer) -> None:
    cal._num_bits, cal._unsigned, cal._axis = q.num_bits, q.unsigned, q.axis


def is_dynamic(q: TensorQuantizer) -> bool:
    """Dynamic ("type": "dynamic") quantizers compute amax per call and are never calibrated."""
    return bool(q._dynamic)


def quantizes(q: TensorQuantizer) -> bool:
    """Fake quantization switched on (``enable_quant()`` / ``disable_quant()``)."""
    return bool(q._if_quant)


def collects(q: TensorQuantizer) -> bool:
    """Calibration switched on (``enable_calib()`` / ``disable_calib()``)."""
    return bool(q._if_calib)


def static_amax(q: TensorQuantizer) -> torch.Tensor | None:
    """The stored amax, or None when not calibrated or dynamic (``q.amax`` asserts on dynamic)."""
    return None if q._dynamic else getattr(q, "_amax", None)


def amax_for(q: TensorQuantizer, inputs: torch.Tensor) -> torch.Tensor:
    """The amax the quantizer applies to ``inputs`` (for quant backends, which get the quantizer)."""
    return q._get_amax(inputs)


def bias_for(q: TensorQuantizer, inputs: torch.Tensor) -> torch.Tensor | None:
    """The static shift (bias) the quantizer subtracts before quantizing, or None."""
    return q._get_bias(inputs)


# ----------------------------------------------------------------------------- the algorithm


E4M3 = (4, 3)  # ModelOpt's num_bits for FP8 E4M3


def is_float_format(q: TensorQuantizer) -> bool:
    """ModelOpt's float formats give num_bits as (exponent, mantissa) bits, e.g. (4, 3) for FP8 E4M3."""
    return isinstance(q.num_bits, (tuple, list))


def is_weight_quantizer(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("weight_quantizer")


def activation_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Enabled, statically calibrated activation quantizers by module path, in model order."""
    return {
        name: q
        for name, q in model.named_modules()
        if isinstance(q, TensorQuantizer)
        and q.is_enabled
        and not is_dynamic(q)
        and not is_weight_quantizer(name)
    }


def match_clip_layers(names: list[str], patterns: list[str]) -> set[str]:
    """Names matched by any pattern; a pattern that matches nothing is an error naming it."""
    matched: set[str] = set()
    unmatched = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            unmatched.append(pattern)
        matched.update(hits)
    if unmatched:
        raise ValueError(
            f"clip_layers patterns match no enabled activation quantizer: {unmatched}; "
            f"quantizer names look like {names[:3]}"
        )
    return matched


def _layer_calibrator(name: str, layer_calibrators: dict[str, dict]) -> tuple[str, dict] | None:
    """(registered name, kwargs) of the last ``layer_calibrators`` pattern matching ``name``."""
    spec = None
    for pattern, entry in layer_calibrators.items():
        if fnmatch.fnmatchcase(name, pattern):
            spec = entry
    if spec is None:
        return None
    kwargs = dict(spec)
    return kwargs.pop("calibrator", "stablequant"), kwargs


def install_stablequant_calibrators(
    model: nn.Module,
    cutoff: float = 0.0,
    clip_layers: list[str] | tuple[str, ...] = (),
    num_bins: int = 2048,
    mse: bool = True,
    layer_calibrators: dict[str, dict] | None = None,
) -> dict[str, HistogramCalibratorBase]:
    """Give every integer activation quantizer a histogram calibrator with the quantizer's own bits.

    StableQuantCalibrator (cut-off for ``clip_layers``) unless a ``layer_calibrators`` entry
    names another registered calibrator for it, or the quantizer's ``quant_cfg`` entry already
    chose one of this package's histogram calibrators (kept, not silently replaced). Float
    formats (FP8 E4M3, ``num_bits=(4, 3)``) keep ModelOpt's max calibration, its FP8 default:
    the range searches here are for integer grids.
    """
    from .registry import calibrator_class

    quantizers = activation_quantizers(model)
    clipped = match_clip_layers(list(quantizers), list(clip_layers))
    layer_calibrators = dict(layer_calibrators or {})
    named = match_clip_layers(list(quantizers), list(layer_calibrators))  # every pattern must match
    installed = {}
    for name, q in quantizers.items():
        if is_float_format(q):
            if name in named:
                raise ValueError(f"{name}: layer_calibrators names a {q.num_bits} float-format quantizer; "
                                 "those keep max calibration")
            continue
        if q.axis is not None or q.block_sizes:
            raise ValueError(
                f"{name}: StableQuant calibrates per-tensor activations; this quantizer has "
                f"axis={q.axis} block_sizes={q.block_sizes}"
            )
        chosen = _layer_calibrator(name, layer_calibrators)
        current = calibrator_of(q)
        if chosen is None and isinstance(current, HistogramCalibratorBase) \
                and not isinstance(current, StableQuantCalibrator):
            _set_calibrator_bits(current, q)  # built by ModelOpt from a constructor tuple: no bits
            installed[name] = current  # the calibrator the user put in quant_cfg stays
            continue
        if chosen is None:
            cal = StableQuantCalibrator(
                num_bits=q.num_bits,
                unsigned=q.unsigned,
                num_bins=num_bins,
                cutoff=cutoff if name in clipped else 0.0,
                mse=mse,
            )
        else:
            cls_name, kwargs = chosen
            try:
                cal = calibrator_class(cls_name)(num_bits=q.num_bits, unsigned=q.unsigned,
                                                 num_bins=num_bins, **kwargs)
            except TypeError as e:
                raise ValueError(f"{name}: bad layer_calibrators entry {chosen}: {e}") from None
        set_calibrator(q, cal)
        installed[name] = cal
    return installed


def set_shift(q: TensorQuantizer, bias: torch.Tensor | float) -> None:
    """Quantize ``x - bias`` and add ``bias`` back: a one-sided range on a symmetric grid.

    Uses ModelOpt's static affine bias (``fake_tensor_quant(x, amax, bias)``) with our value, set
    after calibration so ModelOpt's own bias calibrator never shifts the data being collected.
    ``recipes.export`` folds it into the consumer's bias for TensorRT.
    """
    q.set_from_attribute_config({"bias": {0: None, "type": "static", "method": "max_min"}})
    q.bias_value = torch.as_tensor(bias, dtype=torch.float32, device=q.amax.device).reshape(())


def clear_shift(q: TensorQuantizer) -> None:
    """Undo :func:`set_shift` (ModelOpt has no public way to drop a bias once configured)."""
    q._bias = None
    q._bias_calibrator = None
    if hasattr(q, "_bias_value"):
        delattr(q, "_bias_value")


def weight_quantizers(model: nn.Module) -> dict[str, tuple[nn.Module, TensorQuantizer]]:
    """Enabled weight quantizers by module path, with the module whose ``weight`` they quantize."""
    return {
        name: (module, module.weight_quantizer)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight_quantizer", None), TensorQuantizer)
        and module.weight_quantizer.is_enabled
        and getattr(module, "weight", None) is not None
    }


def set_mse_weight_amax(model: nn.Module) -> None:
    """Replace each per-channel (or per-block) max weight amax by the channel's (block's) MSE-optimal
    clip (integer weights; float formats keep their max)."""
    for name, (module, q) in weight_quantizers(model).items():
        if is_float_format(q):
            continue
        if q.amax is None or q.amax.numel() == 1:
            raise ValueError(f"{name}: weight_calibrator 'mse' needs per-channel or block weight quantizers")
        if q.block_sizes:
            q.amax = per_channel_mse_amax(blocked_weight(q, module.weight), q.amax, q.num_bits,
                                          q.unsigned).reshape(q.amax.shape)
            continue
        q.amax = per_channel_mse_amax(module.weight, q.amax.reshape(_amax_shape(q, module.weight)),
                                      q.num_bits, q.unsigned).reshape(q.amax.shape)


_BLOCK_LAYOUT = ("_block_reshape_size", "_original_shape", "_padding", "_slices", "_amax_shape_for_export")


def blocked_weight(q: TensorQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a static block quantizer reshapes it before quantizing (its amax's layout, keepdim)."""
    q._setup_for_blockquant(weight)
    return q._process_for_blockquant(weight)


def set_weight_format(q: TensorQuantizer, weight: torch.Tensor, num_bits: int | tuple, amax: torch.Tensor,
                      block_sizes: dict | None = None) -> None:
    """Put a weight quantizer at ``num_bits`` with ``amax``: per output channel (axis 0), or static
    blocks (``block_sizes`` as in a ModelOpt config; ``amax`` one per block, any shape, block order).

    ModelOpt caches a block quantizer's reshape on its first input and refuses an amax of another
    shape, so both are reset here (private attributes: this module only).
    """
    for attr in _BLOCK_LAYOUT:
        if hasattr(q, attr):
            delattr(q, attr)
    if hasattr(q, "_amax"):
        delattr(q, "_amax")
    q.num_bits = num_bits
    if block_sizes is None:
        q.block_sizes = None
        q.axis = None if isinstance(num_bits, (tuple, list)) else 0  # FP8: per tensor
        q.amax = amax
        return
    q.block_sizes = dict(block_sizes)
    shape = blocked_weight(q, weight).shape
    keep = q.axis  # the quantized (kept) dims of the block layout
    q.amax = amax.reshape([n if d in keep else 1 for d, n in enumerate(shape)])


def _amax_shape(q: TensorQuantizer, weight) -> tuple[int, ...]:
    """ModelOpt keeps per-channel amax as [C, 1] for any weight rank; broadcastable form here."""
    return tuple(n if d == (q.axis if isinstance(q.axis, int) else q.axis[0]) % weight.dim() else 1
                 for d, n in enumerate(weight.shape))


def equalize_inputs(model: nn.Module, forward_loop, patterns: list[str], alpha: float = 0.5) -> dict:
    """Per-input-channel scales s for the layers of the matched activation quantizers.

    One float pass collects max |x| per input channel (quantizers off); then the quantizer gets
    ``pre_quant_scale = 1 / s`` and the weight's input columns are multiplied by s, so the
    layer's float output is unchanged while the quantized activation's channels are evened out.
    Conv1d inputs [B, C, T] and Linear inputs [..., C] only. Returns the scales by layer.
    """
    quantizers = activation_quantizers(model)
    names = sorted(match_clip_layers(list(quantizers), list(patterns)))
    modules = dict(model.named_modules())
    layers = {}
    for name in names:
        layer = modules[name.rsplit(".", 1)[0]]
        if not isinstance(layer, (nn.Conv1d, nn.Linear)) or getattr(layer, "groups", 1) != 1:
            raise ValueError(f"{name}: equalize needs a plain Conv1d or Linear layer, got {type(layer).__name__}")
        layers[name] = layer
    x_max: dict[str, torch.Tensor] = {}

    def hook(name):
        channel = 1 if isinstance(layers[name], nn.Conv1d) else -1  # [B, C, T] or [..., C]

        def record(_module, args):
            x = args[0].detach()
            m = x.abs().amax(dim=[d for d in range(x.dim()) if d != channel % x.dim()]).float()
            x_max[name] = m if name not in x_max else torch.maximum(x_max[name], m)
        return record

    all_q = [q for q in model.modules() if isinstance(q, TensorQuantizer)]
    was_enabled = [q.is_enabled for q in all_q]
    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        for q in all_q:
            q.disable()
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
        for q, on in zip(all_q, was_enabled):
            q.enable() if on else q.disable()
    scales = {}
    with torch.no_grad():
        for name, layer in layers.items():
            if name not in x_max:
                raise ValueError(f"{name}: the forward_loop never reached this layer; cannot equalize it")
            w_max = layer.weight.detach().abs().amax(dim=[d for d in range(layer.weight.dim()) if d != 1]).float()
            s = (x_max[name].clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            shape = [1] * layer.weight.dim()
            shape[1] = -1
            layer.weight.mul_(s.view(shape).to(layer.weight.dtype))
            quantizers[name].pre_quant_scale = (1.0 / s).view(-1, 1) if isinstance(layer, nn.Conv1d) else 1.0 / s
            scales[name] = s
    return scales


def stablequant_calibrate(
    model: nn.Module,
    forward_loop=None,
    cutoff: float = 0.0,
    clip_layers: list[str] | tuple[str, ...] = (),
    num_bins: int = 2048,
    mse: bool = True,
    layer_calibrators: dict[str, dict] | None = None,
    weight_calibrator: str = "max",
    equalize: list[str] | tuple[str, ...] = (),
    equalize_alpha: float = 0.5,
    **_ignored,
) -> None:
    """Algorithm 2 on every activation quantizer, driven by ModelOpt's max-calibration loop."""
    if forward_loop is None:
        raise ValueError("the 'stablequant' algorithm needs a forward_loop with calibration data")
    if equalize:
        equalize_inputs(model, forward_loop, list(equalize), equalize_alpha)
    installed = install_stablequant_calibrators(model, cutoff, clip_layers, num_bins, mse, layer_calibrators)
    model_calib.max_calibrate(model, forward_loop, distributed_sync=False)
    quantizers = activation_quantizers(model)
    for name, cal in installed.items():
        if cal.shift:
            set_shift(quantizers[name], cal.compute_bias())
    if weight_calibrator == "mse":
        set_mse_weight_amax(model)


def _register_mode() -> None:
    """Register ``"stablequant"`` in CalibrateModeRegistry once (re-import is a no-op)."""
    if f"{METHOD}_calibrate" in CalibrateModeRegistry:
        return

    @CalibrateModeRegistry.register_mode
    class StableQuantCalibrateModeDescriptor(BaseCalibrateModeDescriptor):
        """Mode for the StableQuant calibration algorithm (sq-plugin)."""

        @property
        def config_class(self) -> type[QuantizeAlgorithmConfig]:
            return StableQuantCalibConfig

        _calib_func = stablequant_calibrate


def tuple_calibrators_get_quantizer_bits() -> bool:
    """Does this ModelOpt hand a quantizer's num_bits to a calibrator built from a constructor tuple?

    ModelOpt 0.47 does not (only "max"/"histogram" get them), so a W6 quantizer with
    ``"calibrator": sq_plugin.calibrator("mse")`` would search 8-bit scales.
    """
    probe = TensorQuantizer()
    probe.set_from_attribute_config({"num_bits": 5, "calibrator": (StableQuantCalibrator, (), {})})
    return calibrator_bits(calibrator_of(probe))[0] == 5


def _sync_calibrator_attributes() -> None:
    """Make a quantizer's ``num_bits``/``unsigned``/``axis`` reach our calibrators.

    WORKAROUND for ModelOpt <= 0.47 (see :func:`tuple_calibrators_get_quantizer_bits`); applied only
    while the probe shows it is needed, so it switches itself off on a ModelOpt that passes the
    settings. Drop it (and the probe) once the oldest supported ModelOpt does. The "stablequant"
    algorithm does not rely on it: it sets bits where it installs calibrators. The patch covers
    our calibrators used with ModelOpt's own algorithms (``"max"``), where no code of ours runs.
    """
    original = TensorQuantizer.set_from_attribute_config
    if getattr(original, "_sq_plugin_sync", False) or tuple_calibrators_get_quantizer_bits():
        return

    def set_from_attribute_config(self, attribute_cfg):
        original(self, attribute_cfg)
        cal = calibrator_of(self)
        if isinstance(cal, HistogramCalibratorBase):
            _set_calibrator_bits(cal, self)

    set_from_attribute_config._sq_plugin_sync = True
    set_from_attribute_config.__doc__ = original.__doc__
    TensorQuantizer.set_from_attribute_config = set_from_attribute_config


def _allow_in_auto_quantize() -> None:
    """Let ``mtq.auto_quantize`` take formats whose algorithm is ``"stablequant"``.

    ModelOpt 0.47 checks each candidate format's algorithm against a private allow-list
    (``model_quant._AUTO_QUANTIZE_SUPPORTED_ALGORITHMS``: max, mse, smoothquant, awq, ...) with
    no public way to register one, and refuses the rest before any work. StableQuant qualifies
    as those do: per recipe, auto_quantize runs ``calibrate(model, algorithm, forward_loop)``
    with that recipe's quantizers enabled and stores their state; ours only sets amax (no
    weights change). Workaround: remove when ModelOpt offers a registration hook for
    auto_quantize algorithms (or drops the allow-list).
    """
    from modelopt.torch.quantization import model_quant

    allowed = getattr(model_quant, "_AUTO_QUANTIZE_SUPPORTED_ALGORITHMS", None)
    if isinstance(allowed, set):
        allowed.add(METHOD)


def register() -> None:
    """Idempotent: everything ``import sq_plugin`` needs to do with ModelOpt."""
    _register_mode()
    _sync_calibrator_attributes()
    _allow_in_auto_quantize()
