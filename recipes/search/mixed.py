"""Mixed precision under a size budget: one format per layer, chosen from dev sensitivities.

Uniform bit widths waste bits where they are cheap and starve the layers that need them (on the
demo the CNN front end carries almost the whole W6A6 loss). ``stablequant quantize --budget-bits B``:

1. **Activations** are calibrated by the default recipe at W8A8 (:func:`recipes.search.layerwise.run_layerwise`):
   its histograms (collected once) and its chosen calibrator per activation quantizer give every
   activation scale of the menu (the same calibrator re-run on the same histogram at 6 bits for
   A6). Weights get MSE-optimal scales at each width, per output channel or, for the block
   formats (``-blk``), per block of up to 128 weights along the reduction dim (the block size
   from the layer's shape, :func:`calibrators.weight_block`).
2. **Sensitivity**: each layer alone at each format of the menu, every other layer float. From
   the same suffix-forward logits, two scores: the dev KL of the output distribution to fp32
   (the default recipe's score: fidelity, at best 0) and the change of the dev CTC loss of the
   transcripts from fp32's (auto_quantize's loss, :class:`recipes.search.autoquant.CtcLossChange`: it
   can be negative, a layer whose rounding helps the transcripts). The float prefix of each layer
   is served from cache (:class:`recipes.search.reuse.PrefixRunner`), so one layer × format costs one
   suffix forward. Finished scores go to the state file (``--resume``).
3. **Exact allocation**, once per score (``score``: ``auto`` both, or ``kl`` / ``ctc``): minimise
   the summed scores subject to the average weight bits (Σ bits·weights / Σ weights over every
   Linear/Conv weight, float counted as 16, a block format's fp16 scales as 16/block more bits
   per weight) ≤ B — a multiple-choice knapsack solved as an integer program with ``pulp`` (CBC).
4. **Verification** of each allocation on dev with every layer as allocated (dev KL, CTC change
   and WER from one forward); when the measured score misses the additive prediction, i.e.
   exceeds it by more than ``tolerance`` × |prediction| (the same rule for KL, where the
   prediction is ≥ 0, and for CTC, where it can be negative), a greedy repair fixes the layer
   with the largest predicted gain one format up, re-solves the rest under the same budget, and
   keeps the change only if the measured score falls.
5. **Choice** (``auto``): the verified allocation with the lower WER on the calibration
   utterances, whose transcripts neither score saw (the CTC allocation is fitted to the dev
   transcripts, so its dev WER is optimistic); a tie, or a calibration set without transcripts,
   goes to KL, the fidelity objective.

Under ``torchrun`` the dev (and calibration-check) utterances are sharded as in the default recipe
(:mod:`recipes.runtime.distributed`): each rank forwards its share for every layer × format, per-batch KL and
CTC sums and per-utterance edits are all-reduced, so every rank holds the one-process numbers, and
rank 0's allocation is broadcast so all ranks measure the same one; rank 0 writes.

The output is a plain ModelOpt config with one entry per quantizer (bits, axis or block_sizes, enable) and the
"stablequant" algorithm's ``layer_calibrators`` / ``weight_calibrator``; a fresh
``mtq.quantize`` re-applies it. FP8 W8A8 (E4M3 per tensor, max ranges) is scored with
ModelOpt's own fake quant, which runs on the CPU (``fp8_note``).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recipes.evaluation.asr import forward_logits
from recipes.runtime.distributed import broadcast_from_main, current_ranks
from recipes.search.fastquant import fake_quant_blocks, fake_quant_int, fast_fake_quant
from recipes.search.layerwise import CANDIDATES, SHIFT, LogitDivergence, run_layerwise, spec_entry, spec_label
from recipes.search.reuse import PrefixRunner
from recipes.search.stablequant import DevScorer, Settings, begin_recipe, result_json
from recipes.speech.models import SpeechModel, layer_inventory
from sq_plugin.quantizers import E4M3

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- allocation (pure)


def average_bits(sizes: Sequence[int], bits: Sequence[float]) -> float:
    """Σ bits·weights / Σ weights."""
    total = sum(sizes)
    return sum(n * b for n, b in zip(sizes, bits)) / total


def allocate(scores: Sequence[dict[str, float]], sizes: Sequence[int],
             bits: dict[str, float] | Sequence[dict[str, float]], budget_bits: float,
             fixed: dict[int, str] | None = None) -> list[str]:
    """The format per layer minimising Σ scores[l][f] with average weight bits ≤ ``budget_bits``.

    ``scores[l]`` maps the formats allowed for layer l to its (additive) cost, ``sizes[l]`` is its
    weight count, ``bits[f]`` the bits per weight of format f (or ``bits[l][f]``: per layer, as
    block scales make it); ``fixed`` pins layers to a format. An exact integer program (pulp/CBC,
    integer budget arithmetic). Raises ValueError when no assignment fits the budget.
    """
    import pulp

    fixed = dict(fixed or {})
    if len(scores) != len(sizes):
        raise ValueError(f"{len(scores)} score rows for {len(sizes)} layers")
    bits = [bits] * len(scores) if isinstance(bits, dict) else list(bits)
    total = sum(sizes)
    # integer coefficients: bits in units of 1/den so fractional bit widths stay exact
    den = 1
    while any(abs(bits[l][f] * den - round(bits[l][f] * den)) > 1e-9 for l, row in enumerate(scores) for f in row) \
            and den < 10**6:
        den *= 10
    capacity = int(budget_bits * den * total + 1e-6)
    lowest = sum(n * min(round(bits[l][f] * den) for f in (scores[l] if l not in fixed else [fixed[l]]))
                 for l, n in enumerate(sizes))
    if lowest > capacity:
        raise ValueError(f"budget {budget_bits} bits per weight is below the smallest the menu allows "
                         f"({lowest / den / total:.3f})")
    prob = pulp.LpProblem("mixed_precision", pulp.LpMinimize)
    x = {(l, f): prob.add_variable(f"x_{l}_{k}", cat="Binary")
         for l, row in enumerate(scores) for k, f in enumerate(row)}
    prob += pulp.lpSum(scores[l][f] * v for (l, f), v in x.items())
    for l, row in enumerate(scores):
        prob += pulp.lpSum(x[l, f] for f in row) == 1
        if l in fixed:
            prob += x[l, fixed[l]] == 1
    prob += pulp.lpSum(sizes[l] * round(bits[l][f] * den) * v for (l, f), v in x.items()) <= capacity
    with warnings.catch_warnings():
        # Workaround: PuLP 3.3 deprecates its bundled CBC for PuLP 4's `pulp[cbc]` + COIN_CMD; ModelOpt 0.47
        # pins plain pulp, so the bundled one is what exists. Remove when pulp >= 4 is required.
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        raise ValueError(f"no per-layer allocation fits {budget_bits} bits per weight ({pulp.LpStatus[status]})")
    choice = [max(row, key=lambda f: x[l, f].value()) for l, row in enumerate(scores)]
    used = sum(sizes[l] * round(bits[l][f] * den) for l, f in enumerate(choice))
    if used > capacity:  # the solver's tolerance must never buy bits beyond the budget
        raise ValueError(f"allocation uses {used / den / total:.4f} > {budget_bits} bits per weight")
    return choice


SCORES = ("kl", "ctc")  # per-layer sensitivity scores an allocation can minimise
SCORE_CHOICES = ("auto", *SCORES)


def choose_score(candidates: dict[str, dict]) -> tuple[str, str]:
    """The verified allocation to keep: the lower WER on the calibration utterances
    (``candidates[score]["calib_wer"]``), whose transcripts neither score saw; a tie, or no such
    WER, goes to ``kl``, the fidelity objective. Not the dev WER: the CTC allocation is fitted to
    the dev transcripts, so its dev WER is optimistic (demo, 6.4 bits: dev 14.31 vs KL's 15.46, yet
    20.32 vs 19.83 on 600 held-out utterances). Returns the score and a one-line reason."""
    if not candidates:
        raise ValueError("no candidate allocation to choose from")
    if len(candidates) == 1:
        (only,) = candidates
        return only, f"--mixed-score {only}: the only candidate"
    if any(v.get("calib_wer") is None for v in candidates.values()):
        if "kl" in candidates:
            return "kl", "no calibration transcripts to compare on (dev WER favours the dev-fitted ctc): kl"
        raise ValueError("candidates without a calibration WER and no kl candidate")
    ranked = sorted(candidates, key=lambda k: (candidates[k]["calib_wer"], SCORES.index(k)))
    best, other = ranked[0], ranked[1]
    a, b = candidates[best]["calib_wer"], candidates[other]["calib_wer"]
    if a == b:
        return best, f"calibration-set WER tie ({a:.2f}): {best}, the fidelity objective"
    return best, f"lower WER on the calibration utterances: {best} {a:.2f} < {other} {b:.2f}"


# ----------------------------------------------------------------------------- the search


@dataclass
class LayerFormat:
    layer: str
    kind: str
    weights: int
    format: str
    wbits: int | None
    abits: int | None
    predicted_kl: float  # this layer's dev KL at its format (others float)
    bits: float  # bits per weight as the budget counts them (block scales included)
    block: list[int] | None = None  # (axis, size) of the weight blocks of a block format
    predicted_ctc: float = 0.0  # this layer's dev CTC-loss change at its format (others float)


@dataclass
class MixedResult:
    recipe: str
    settings: dict
    budget_bits: float
    avg_weight_bits: float  # block scales counted at block_scale_bits per block
    avg_weight_bits_no_scales: float  # ModelOpt auto_quantize's count: grid bits only
    block_scale_bits: float
    compression_vs_fp32: float
    menu: list[str]
    fp8: str
    float_wer: float
    sensitivity: dict[str, dict[str, float]]  # layer -> format -> dev KL (that layer alone)
    choices: list[LayerFormat]
    predicted_kl: float
    final_kl: float
    final_wer: float
    repairs: list[dict]
    pareto: list[dict]  # {"budget", "avg_bits", "predicted_kl", "kl", "wer"} of allocations
    uniform: dict[str, dict]  # format -> {"avg_bits", "kl", "wer"} with every layer at it
    base: dict  # the default recipe's W8A8 run: dev KL / WER, weights, calibrators
    config: dict
    evaluations: int
    seconds: dict[str, float]
    dev_errors: dict[str, dict] = field(default_factory=dict)
    score: str = "kl"  # the score whose allocation was kept: "kl" or "ctc"
    score_reason: str = ""
    candidates: dict[str, dict] = field(default_factory=dict)  # score -> its verified allocation
    sensitivity_ctc: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> format -> CTC change
    predicted_ctc: float = 0.0
    final_ctc: float = 0.0  # measured dev CTC loss minus fp32's
    model: SpeechModel | None = None
    histograms: dict | None = None

    def to_json(self) -> dict:
        return result_json(self)


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


def run_mixed(
    sm: SpeechModel,
    calib_batches: Sequence,
    dev_batches: Sequence,
    budget_bits: float,
    settings: Settings | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    menu: Sequence[str] = tuple(MENU),
    tolerance: float = 0.25,
    max_repairs: int = 3,
    pareto_budgets: Sequence[float] = (4.0, 5.0, 6.0, 7.0, 8.0),
    block_scale_bits: float = SCALE_BITS,
    score: str = "auto",
    variants_per_forward: int = 8,
    base_state_path: str | Path | None = None,
) -> MixedResult:
    """Mixed precision of ``sm`` under ``budget_bits`` average bits per weight (see module doc).

    ``block_scale_bits``: what the budget charges per block scale of a block format (0: ModelOpt
    auto_quantize's count). It only moves the allocation, so runs that differ in it share the state.
    ``variants_per_forward``: formats of one layer scored side by side in one suffix forward of
    that many copies of each dev batch (:meth:`PrefixRunner.run_variants`; 1: one at a time, the
    least memory). ``base_state_path``: a state file of the default recipe at W8A8 on the same model,
    data and settings (``compare``'s own 8-bit run), resumed instead of searching again (default:
    ``state_w8a8.json`` beside ``state_path``). ``score``: ``kl`` or ``ctc`` allocates with that
    sensitivity; ``auto`` verifies both and keeps the lower WER on the calibration utterances (ties:
    ``kl``; :func:`choose_score`). Both scores are always computed (same forwards) and stored.
    """
    from calibrators import per_block_mse_amax, per_channel_mse_amax, weight_block
    from recipes.search.autoquant import CtcLossChange
    from sq_plugin import calibrator_class
    from sq_plugin.modelopt_private import calibrator_of

    if variants_per_forward < 1:
        raise ValueError(f"variants_per_forward must be >= 1; got {variants_per_forward}")
    if score not in SCORE_CHOICES:
        raise ValueError(f"score must be one of {SCORE_CHOICES}; got {score!r}")
    unknown = [m for m in menu if m not in MENU]
    if unknown or "float" not in menu:
        raise ValueError(f"menu must include 'float' and only formats of {list(MENU)}; got {list(menu)}")
    formats = {m: MENU[m] for m in menu}
    base_settings = Settings(**{**asdict(settings or Settings()), "wbits": 8, "abits": 8})
    base_state = Path(base_state_path) if base_state_path else \
        Path(state_path).with_name("state_w8a8.json") if state_path else None
    progress = progress and current_ranks().main
    started = time.perf_counter()
    base = run_layerwise(sm, calib_batches, dev_batches, base_settings, state_path=base_state,
                         resume=resume or base_state_path is not None,
                         progress=progress, variants_per_forward=min(2, variants_per_forward))
    s, scorer, state, kinds, clock = begin_recipe(sm, calib_batches, dev_batches, base_settings, state_path,
                                                  resume, recipe="mixed")  # menu-free: scores are per format
    state.data.setdefault("sensitivity", {})
    lap = clock.lap
    dev = scorer.batches  # this rank's share of the dev set (all of it in one process)
    clock.seconds["default recipe W8A8"] = round(time.perf_counter() - started, 3)
    qsm = base.model
    model = qsm.model
    layers = [i.path for i in layer_inventory(model)]
    modules = dict(model.named_modules())
    missing = [l for l in layers if not hasattr(modules[l], "weight_quantizer")
               or not hasattr(modules[l], "input_quantizer")]
    if missing:
        raise ValueError(f"layers without ModelOpt quantizers (not converted): {missing}")
    sizes = [modules[l].weight.numel() for l in layers]
    blocks = {l: weight_block(modules[l].weight.shape) for l in layers}
    allowed = {l: [f for f in formats if not formats[f].blocks or blocks[l] is not None] for l in layers}
    lbits = [{f: format_bits(formats[f], blocks[l], block_scale_bits) for f in allowed[l]} for l in layers]
    grid_bits = [{f: float(formats[f].bits) for f in allowed[l]} for l in layers]

    specs = {spec_label(name, kw): (name, kw, False) for name, kw in CANDIDATES}
    specs.update({spec_label(name, kw) + SHIFT: (name, kw, True) for name, kw in CANDIDATES})
    chosen_spec = {c.layer: specs[c.chosen] for c in base.layers}
    act_cache: dict[tuple[str, int], tuple] = {}

    def act_amax(layer: str, bits) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The default recipe's calibrator for this input, re-run on its histogram at ``bits``;
        FP8 (``E4M3``): the histogram's max |x| (max calibration, ModelOpt's FP8 default)."""
        if (layer, bits) not in act_cache:
            q = modules[layer].input_quantizer
            cal = calibrator_of(q)
            if bits == E4M3:
                act_cache[layer, bits] = (torch.as_tensor(float(cal.histogram.amax)).to(q.amax.device), None)
                return act_cache[layer, bits]
            name, kw, shift = chosen_spec[layer]
            searcher = calibrator_class(name)(num_bits=bits, unsigned=q.unsigned, num_bins=s.num_bins,
                                              shift=shift, **kw)
            if shift:
                amax, bias = searcher.search(cal.histogram, cal.signed_min)
                amax, bias = torch.as_tensor(float(amax)), torch.as_tensor(float(bias))
            else:
                amax, bias = torch.as_tensor(float(searcher.search(cal.histogram))), None
            device = q.amax.device  # the model's device (--device)
            act_cache[layer, bits] = (amax.to(device), None if bias is None else bias.to(device))
        return act_cache[layer, bits]

    weight_max = {l: modules[l].weight_quantizer.amax.clone() for l in layers}
    w_cache: dict[tuple[str, int, bool, bool], torch.Tensor] = {}

    def weight_amax(layer: str, fmt: Format) -> torch.Tensor:
        """MSE-optimal weight amax per output channel, or per block of a block format; FP8: the
        max |w| (per tensor, as ModelOpt's FP8 default)."""
        key = (layer, fmt.wbits, fmt.blocks, fmt.fp8)
        if key not in w_cache:
            m = modules[layer]
            from sq_plugin.quantizers import amax_shape

            if fmt.fp8:
                w_cache[key] = weight_max[layer].max().reshape(())
            elif fmt.blocks:
                w_cache[key] = per_block_mse_amax(setter.original[layer], *blocks[layer], fmt.wbits)
            else:
                shape = amax_shape(m.weight_quantizer, m.weight)
                w_cache[key] = per_channel_mse_amax(setter.original[layer], weight_max[layer].reshape(shape),
                                                    fmt.wbits, False).reshape(weight_max[layer].shape)
        return w_cache[key]

    # weight amax from the recipe's weights: it may have set MSE amax at 8 bits; recover the max
    for l in layers:
        weight_max[l] = modules[l].weight.detach().abs().amax(
            dim=tuple(range(1, modules[l].weight.dim())), keepdim=True).reshape(weight_max[l].shape)
    setter = FormatSetter(model, layers, act_amax, weight_amax, blocks)
    evaluations = 0

    with fast_fake_quant(model), torch.inference_mode():
        setter.fold({})
        ref = [forward_logits(model, b) for b in dev]
        divergence = LogitDivergence(ref, scorer.shard)
        errors = {"fp32": scorer.errors(ref)}
        float_wer = errors["fp32"].wer

        ctc_change = CtcLossChange(qsm, dev, ref, scorer.shard)
        runner = PrefixRunner(model, forward_logits, dev)
        sens = state.data["sensitivity"]
        sens_ctc = state.data.setdefault("sensitivity_ctc", {})
        todo = [(l, f) for l in layers for f in allowed[l] if f != "float"]
        stale = sum(1 for l, f in todo if f in sens.get(l, {}) and f not in sens_ctc.get(l, {}))
        if stale:
            log.warning("the state file has %d KL sensitivities without a CTC score (written before CTC "
                        "scoring): recomputing them", stale)
        bar = tqdm(total=len(todo), desc="per-layer sensitivity (layer x format)", disable=not progress)
        setter.fold({})
        for l in layers:
            done, done_ctc = sens.setdefault(l, {"float": 0.0}), sens_ctc.setdefault(l, {"float": 0.0})
            mine = [f for f in allowed[l] if f != "float"]
            missing = [f for f in mine if f not in done or f not in done_ctc]
            bar.update(len(mine) - len(missing))
            for group in (missing[i:i + variants_per_forward] for i in range(0, len(missing), variants_per_forward)):
                # the layer's formats side by side in one suffix forward (both scores from it)
                outs = runner.run_variants(l, [lambda f=f: setter.fold_layer(l, formats[f]) for f in group])
                for f, logits in zip(group, outs):
                    evaluations += 1
                    done[f], done_ctc[f] = divergence(logits), ctc_change(logits)
                state.save()
                bar.update(len(group))
            setter.fold_layer(l, formats["float"])
        bar.close()
        runner.clear()
        sensitivity = {l: {f: sens[l][f] for f in allowed[l]} for l in layers}
        sensitivity_ctc = {l: {f: sens_ctc[l][f] for f in allowed[l]} for l in layers}
        tables = {"kl": sensitivity, "ctc": sensitivity_ctc}
        lap("sensitivity")

        def avg_bits(assign, per_layer=lbits) -> float:
            return average_bits(sizes, [per_layer[i][assign[l].name] for i, l in enumerate(layers)])

        def measure(assign: dict[str, Format]) -> dict:
            """Dev KL, CTC-loss change and errors of one allocation, from one full forward."""
            nonlocal evaluations
            evaluations += 1
            setter.fold(assign)
            logits = [forward_logits(model, b) for b in dev]
            return {"kl": divergence(logits), "ctc": ctc_change(logits), "err": scorer.errors(logits)}

        def solve(budget: float, by: str, fixed=None) -> dict[str, Format]:
            rows = [tables[by][l] for l in layers]
            # every rank holds the same scores; rank 0's solution is the one all ranks measure
            choice = broadcast_from_main(allocate(rows, sizes, lbits, budget, fixed))
            return {l: formats[f] for l, f in zip(layers, choice)}

        def predicted(assign, by: str = "kl") -> float:
            return sum(tables[by][l][assign[l].name] for l in layers)

        uniform = {}
        for name in UNIFORM_POINTS:
            if name in formats:
                m = measure({l: formats[name] for l in layers})
                uniform[name] = {"avg_bits": float(formats[name].bits), "kl": m["kl"], "ctc": m["ctc"],
                                 "wer": m["err"].wer}
                errors[f"uniform_{name}"] = m["err"]

        try:  # the choice between scores is checked on transcripts neither score saw
            check = DevScorer(sm, calib_batches) if score == "auto" else None
        except ValueError:
            check = None  # calibration utterances without transcripts: kl (choose_score)

        def check_wer(assign: dict[str, Format]) -> float | None:
            if check is None:
                return None
            setter.fold(assign)
            return check.wer([forward_logits(model, b) for b in check.batches])

        calib_fp32_wer = check_wer({})

        def verify(by: str) -> dict:
            """Allocate by score ``by``, measure on dev, repair while the measured score misses the
            prediction by more than ``tolerance`` × |prediction| (CTC predictions can be < 0)."""
            assign = solve(budget_bits, by)
            pred, m = predicted(assign, by), measure(assign)
            repairs: list[dict] = []
            fixed: dict[int, str] = {}  # kept upgrades stay pinned for later re-solves
            tried: set[int] = set()
            table = tables[by]
            while m[by] > pred + tolerance * abs(pred) and len(repairs) < max_repairs:
                # the layer whose next better format has the largest predicted gain
                gains = []
                for i, l in enumerate(layers):
                    if i in tried:
                        continue
                    better = [f for f in allowed[l] if lbits[i][f] > lbits[i][assign[l].name]]
                    if better:
                        f = min(better, key=lambda g: table[l][g])
                        gains.append((table[l][assign[l].name] - table[l][f], i, f))
                if not gains or max(gains)[0] <= 0:
                    break  # no upgrade is predicted to help
                gain, i, f = max(gains)
                try:
                    trial = solve(budget_bits, by, {**fixed, i: f})
                except ValueError:
                    break
                t = measure(trial)
                step = {"score": by, "layer": layers[i], "to": f, "bits_from": lbits[i][assign[layers[i]].name],
                        "bits_to": lbits[i][f], "predicted_gain": gain, "before": m[by], "after": t[by],
                        "kl_before": m["kl"], "kl_after": t["kl"], "kept": t[by] < m[by]}
                repairs.append(step)
                tried.add(i)
                if t[by] < m[by]:
                    fixed[i] = f
                    assign, m, pred = trial, t, predicted(trial, by)
            counts = dict(Counter(assign[l].name for l in layers))
            return {"assign": assign, "measured": m, "repairs": repairs, "json": {
                "score": by, "dev_wer": m["err"].wer, "dev_kl": m["kl"], "dev_ctc": m["ctc"], "predicted": pred,
                "calib_wer": check_wer(assign), "calib_fp32_wer": calib_fp32_wer,
                "predicted_kl": predicted(assign, "kl"), "predicted_ctc": predicted(assign, "ctc"),
                "avg_weight_bits": avg_bits(assign), "formats": counts,
                "assignment": {l: assign[l].name for l in layers}, "repairs": repairs}}

        verified = {by: verify(by) for by in (SCORES if score == "auto" else (score,))}
        chosen, reason = choose_score({by: v["json"] for by, v in verified.items()})
        log.info("mixed precision: allocation by %s (%s)", chosen, reason)
        assign, m, repairs = verified[chosen]["assign"], verified[chosen]["measured"], verified[chosen]["repairs"]
        kl, ctc, err = m["kl"], m["ctc"], m["err"]
        if len(verified) > 1:
            errors.update({f"mixed_{by}": v["measured"]["err"] for by, v in verified.items()})
        errors["mixed"] = err
        lap("allocate + verify")

        pareto = []  # other budgets, allocated by the chosen score
        for b in tqdm(sorted(set(pareto_budgets) - {budget_bits}), desc="Pareto budgets", disable=not progress):
            try:
                other = solve(b, chosen)
            except ValueError:
                continue
            p = measure(other)
            pareto.append({"budget": b, "avg_bits": avg_bits(other), "score": chosen,
                           "predicted": predicted(other, chosen), "predicted_kl": predicted(other),
                           "kl": p["kl"], "ctc": p["ctc"], "wer": p["err"].wer})
        lap("pareto")
        avg = avg_bits(assign)
        pred = predicted(assign)
        pareto.append({"budget": budget_bits, "avg_bits": avg, "score": chosen, "predicted": predicted(assign, chosen),
                       "predicted_kl": pred, "kl": kl, "ctc": ctc, "wer": err.wer})
        pareto.sort(key=lambda p: p["budget"])
        setter.as_quantizers(assign)

    layer_cal = {c.quantizer: spec_entry(*chosen_spec[c.layer]) for c in base.layers}
    block_cfg = {l: block_sizes_cfg(blocks[l], modules[l].weight.dim()) for l in layers if blocks[l] is not None}
    config = mixed_config(s, assign, layer_cal, "mse", block_cfg)
    choices = [LayerFormat(l, kinds.get(l, "other"), n, assign[l].name, assign[l].wbits, assign[l].abits,
                           sensitivity[l][assign[l].name], lbits[i][assign[l].name],
                           list(blocks[l]) if assign[l].blocks else None, sensitivity_ctc[l][assign[l].name])
               for i, (l, n) in enumerate(zip(layers, sizes))]
    dev_errors = {k: v.to_json() for k, v in errors.items()}
    return MixedResult(
        recipe="mixed", settings=asdict(s), budget_bits=float(budget_bits), avg_weight_bits=avg,
        avg_weight_bits_no_scales=avg_bits(assign, grid_bits), block_scale_bits=float(block_scale_bits),
        compression_vs_fp32=32.0 / avg, menu=list(menu), fp8=fp8_note(), float_wer=float_wer,
        sensitivity=sensitivity, choices=choices, predicted_kl=pred, final_kl=kl, final_wer=err.wer,
        repairs=repairs, pareto=pareto, uniform=uniform,
        base={"final_kl": base.final_kl, "final_wer": base.final_wer, "weight_calibrator": base.weight_calibrator,
              "layer_calibrators": {c.quantizer: c.chosen for c in base.layers}, "seconds": base.seconds},
        config=config, evaluations=evaluations + base.evaluations, seconds=clock.seconds, dev_errors=dev_errors,
        score=chosen, score_reason=reason, candidates={by: v["json"] for by, v in verified.items()},
        sensitivity_ctc=sensitivity_ctc, predicted_ctc=predicted(assign, "ctc"), final_ctc=ctc,
        model=qsm, histograms=base.histograms,
    )


def run_mixed_recipe(sm: SpeechModel, calib: Sequence, dev: Sequence, budget_bits: float,
                     settings: Settings | None = None, state_path: str | Path | None = None, resume: bool = False,
                     seed: int = 0, progress: bool = True, block_scale_bits: float = SCALE_BITS,
                     score: str = "auto", variants_per_forward: int = 8) -> tuple[MixedResult, dict]:
    """:func:`run_mixed` plus the report meta: dev WERs with paired-bootstrap intervals vs fp32."""
    from recipes.evaluation.asr import UtteranceErrors, intervals

    start = time.perf_counter()
    result = run_mixed(sm, calib, dev, budget_bits, settings, state_path=state_path, resume=resume,
                       progress=progress, block_scale_bits=block_scale_bits, score=score,
                       variants_per_forward=variants_per_forward)
    elapsed = time.perf_counter() - start
    errors = {k: UtteranceErrors.from_json(v) for k, v in result.dev_errors.items()}
    meta = {"model": sm.source or sm.name, "arch": sm.arch, "recipe": "mixed", "budget_bits": budget_bits,
            "block_scale_bits": block_scale_bits, "mixed_score": score,
            "calib_utterances": sum(len(b.ids) for b in calib), "dev_utterances": sum(len(b.ids) for b in dev),
            "seconds": round(elapsed, 1),
            "dev": {k: {"wer": e.wer, "cer": e.cer, "words": int(e.words.sum()),
                        "word_errors": int(e.word_edits.sum())} for k, e in errors.items()},
            "dev_intervals": intervals(errors, "fp32", [k for k in errors if k not in ("fp32", "mixed")], seed=seed)}
    return result, meta
