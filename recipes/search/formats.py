"""The mixed-precision menu: per-layer formats, what each costs in bits, putting a quantized
model's layers at given formats (weights folded for the search, or as quantizers to save), and
the plain ModelOpt config of an allocation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recipes.search.allocation import average_bits
from recipes.search.engine import Settings
from recipes.search.fastquant import fake_quant_blocks, fake_quant_int
from recipes.speech.models import layer_inventory
from sq_plugin.quantizers import E4M3

FLOAT_BITS = 16  # a float layer counts 16 bits per weight (fp16/bf16 deployment)


SCALE_BITS = 16  # a block format stores one fp16 scale per block


@dataclass(frozen=True)
class Format:
    """One entry of the per-layer menu: weight bits and activation bits (None: float); ``blocks``:
    one weight scale per block (:func:`calibrators.weight_block` picks the block from the layer's
    shape) instead of one per output channel."""

    name: str
    wbits: int | None
    abits: int | None
    blocks: bool = False
    fp8: bool = False  # E4M3 weights and inputs, per tensor, max ranges (ModelOpt's FP8 default)

    @property
    def bits(self) -> int:
        """Bits per weight of the integer grid (float: ``FLOAT_BITS``), scales not counted."""
        return self.wbits or FLOAT_BITS

    @property
    def weight_num_bits(self) -> int | tuple[int, int] | None:
        """``num_bits`` of the weight quantizer as ModelOpt writes it."""
        return E4M3 if self.fp8 else self.wbits

    @property
    def input_num_bits(self) -> int | tuple[int, int] | None:
        return E4M3 if self.fp8 and self.abits else self.abits


MENU = {f.name: f for f in (
    Format("float", None, None),
    Format("W8A8", 8, 8),
    Format("W6A6", 6, 6),
    Format("W4A8", 4, 8),
    Format("W4A16", 4, None),
    Format("W4A8-blk", 4, 8, blocks=True),
    Format("W4A16-blk", 4, None, blocks=True),
    Format("FP8", 8, 8, fp8=True),
)}
UNIFORM_POINTS = ("W8A8", "W6A6", "W4A8")  # uniform references on the Pareto plot


def format_bits(fmt: Format, block: tuple[int, int] | None, scale_bits: float = SCALE_BITS) -> float:
    """Bits per weight of ``fmt`` on a layer whose block is ``block`` (axis, size): the grid's bits plus,
    for a block format, ``scale_bits`` per block. Per-channel scales are not counted (one per output
    channel, as ModelOpt's and the literature's "4-bit" do); ``scale_bits=0`` is ModelOpt 0.47
    auto_quantize's count, which charges INT4_BLOCKWISE_WEIGHT_ONLY_CFG num_bits = 4 per weight."""
    if not fmt.blocks:
        return float(fmt.bits)
    if block is None:
        raise ValueError(f"{fmt.name}: this layer's shape takes no block")
    return fmt.bits + scale_bits / block[1]


def model_weight_bits(model: torch.nn.Module, scale_bits: float = SCALE_BITS) -> float:
    """Average bits per Linear/Conv weight of any quantized model, read from its weight quantizers:
    num_bits, plus ``scale_bits`` per stored scale for a block quantizer (its amax has one per
    block, padded blocks included); 16 where the weight is not quantized. The same count for our
    allocations and for ``mtq.auto_quantize``'s, whatever formats they chose."""
    from sq_plugin.modelopt_private import quantizes, static_amax
    from sq_plugin.quantizers import is_float_format

    modules = dict(model.named_modules())
    sizes, bits = [], []
    for info in layer_inventory(model):
        m = modules[info.path]
        q = getattr(m, "weight_quantizer", None)
        n = m.weight.numel()
        sizes.append(n)
        if q is None or not q.is_enabled or not quantizes(q):
            bits.append(float(FLOAT_BITS))
        elif is_float_format(q):  # (exponent, mantissa): + sign bit, FP8 = 8
            bits.append(1.0 + sum(q.num_bits))
        elif not isinstance(q.num_bits, int):
            raise ValueError(f"{info.path}: cannot count bits of num_bits={q.num_bits!r}")
        else:
            amax = static_amax(q)
            scales = amax.numel() if q.block_sizes and amax is not None else 0
            bits.append(q.num_bits + scale_bits * scales / n)
    return average_bits(sizes, bits)


def block_sizes_cfg(block: tuple[int, int], ndim: int) -> dict:
    """ModelOpt ``block_sizes`` of a weight's (axis, size) block: static, axis counted from the end."""
    return {block[0] - ndim: block[1], "type": "static"}


def fp8_note() -> str:
    """How FP8 W8A8 is evaluated and where it runs as FP8."""
    where = "this GPU runs it in FP8" if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) \
        else "TensorRT runs it in FP8 on Ada/Hopper GPUs; ONNX Runtime's CPU EP dequantizes it to fp32"
    return ("FP8 W8A8: E4M3 weights and inputs per tensor with max ranges (ModelOpt's FP8 default), "
            f"scored with ModelOpt's fake quant; {where}")


class FormatSetter:
    """Put each layer of a quantized model at a menu format (weights folded, or as quantizers)."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[str], act_amax, weight_amax,
                 blocks: dict[str, tuple[int, int] | None] | None = None):
        modules = dict(model.named_modules())
        self.modules = {l: modules[l] for l in layers}
        self.original = {l: m.weight.data for l, m in self.modules.items()}
        # callables: (layer, bits) -> (amax, shift or None) of the input; (layer, Format) -> weight
        # amax (per channel, ModelOpt's shape; or per block, calibrators.weight_blocks' layout)
        self.act_amax, self.weight_amax = act_amax, weight_amax
        self.blocks = blocks or {}  # layer -> (axis, size) of its block formats
        self._folded: dict[tuple[str, int, bool, bool], torch.Tensor] = {}

    def folded_weight(self, layer: str, fmt: Format) -> torch.Tensor:
        key = (layer, fmt.wbits, fmt.blocks, fmt.fp8)
        if key not in self._folded:
            from modelopt.torch.quantization.tensor_quant import scaled_e4m3

            from sq_plugin.quantizers import amax_shape

            q, w = self.modules[layer].weight_quantizer, self.original[layer]
            amax = self.weight_amax(layer, fmt)
            if fmt.fp8:
                self._folded[key] = scaled_e4m3(w, amax, None, *E4M3)
            elif fmt.blocks:
                self._folded[key] = fake_quant_blocks(w, amax, *self.blocks[layer], fmt.wbits, q.narrow_range)
            else:
                self._folded[key] = fake_quant_int(w, amax.reshape(amax_shape(q, w)), fmt.wbits, False,
                                                   q.narrow_range)
        return self._folded[key]

    def _activation(self, layer: str, fmt: Format) -> None:
        from sq_plugin.quantizers import clear_shift, set_shift

        q = self.modules[layer].input_quantizer
        if fmt.abits is None:
            q.disable()
        else:
            q.num_bits = fmt.input_num_bits
            q.amax, shift = self.act_amax(layer, fmt.input_num_bits)
            if shift is not None:  # a one-sided range: its shift moves with the bit width
                if q.bias is None:
                    set_shift(q, shift)
                else:
                    q.bias_value = shift
            elif q.bias is not None:  # FP8 takes the plain range
                clear_shift(q)
            q.enable()

    def fold(self, assign: dict[str, Format]) -> None:
        """Search form: weights replaced by their fake-quant values, weight quantizers off."""
        for layer in self.modules:
            self.fold_layer(layer, assign.get(layer, MENU["float"]))

    def fold_layer(self, layer: str, fmt: Format) -> None:
        m = self.modules[layer]
        m.weight_quantizer.disable()
        m.weight.data = self.original[layer] if fmt.wbits is None else self.folded_weight(layer, fmt)
        self._activation(layer, fmt)

    def as_quantizers(self, assign: dict[str, Format]) -> None:
        """Final form: float weights, each weight quantizer at its bits and amax (saveable)."""
        from sq_plugin.quantizers import set_weight_format

        for layer, m in self.modules.items():
            fmt = assign.get(layer, MENU["float"])
            m.weight.data = self.original[layer]
            wq = m.weight_quantizer
            if fmt.wbits is None:
                wq.disable()
            else:
                w = self.original[layer]
                blocks = block_sizes_cfg(self.blocks[layer], w.dim()) if fmt.blocks else None
                set_weight_format(wq, w, fmt.weight_num_bits, self.weight_amax(layer, fmt), blocks)
                wq.enable()
            self._activation(layer, fmt)


def mixed_config(s: Settings, assign: dict[str, Format], layer_calibrators: dict[str, dict],
                 weight_calibrator: str, block_sizes: dict[str, dict] | None = None) -> dict:
    """Plain ModelOpt config: every quantizer named exactly, with its bits (or disabled); a block
    format's weight quantizer with its ``block_sizes`` (``block_sizes[layer]``)."""
    quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for layer, fmt in assign.items():
        if fmt.wbits is not None:
            cfg = {"num_bits": fmt.wbits, "block_sizes": dict(block_sizes[layer])} if fmt.blocks \
                else {"num_bits": fmt.weight_num_bits, "axis": None if fmt.fp8 else 0}
            quant_cfg.append({"quantizer_name": f"{layer}.weight_quantizer", "cfg": cfg})
        if fmt.abits is not None:
            quant_cfg.append({"quantizer_name": f"{layer}.input_quantizer",
                              "cfg": {"num_bits": fmt.input_num_bits, "axis": None}})
    # FP8 inputs keep ModelOpt's max calibration (the "stablequant" algorithm leaves them be)
    enabled = {f"{l}.input_quantizer" for l, f in assign.items() if f.abits is not None and not f.fp8}
    return {"quant_cfg": quant_cfg, "algorithm": {
        "method": "stablequant", "cutoff": 0.0, "clip_layers": [], "num_bins": int(s.num_bins),
        "layer_calibrators": {n: e for n, e in layer_calibrators.items() if n in enabled},
        "weight_calibrator": weight_calibrator}}


