"""The speech-model contract: what every recipe needs from a CTC speech model, and nothing more.

A *family* (Hugging Face CTC, a fairseq checkpoint, torchaudio, an exported ONNX file) answers
these questions for the modules it owns; the recipes, the prefix cache, compare, export and the
ONNX runner ask only through it, so a new family is one file (a :class:`SpeechFamily` subclass
returned by the ``sq_speech_model_families`` hook) plus its tests.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

LAYER_KINDS = ("cnn", "pos_conv", "transformer", "head")


@dataclass
class SpeechModel:
    """A CTC model plus the processor facts the recipes need (no processor object)."""

    model: nn.Module
    arch: str  # architecture name, e.g. "Wav2Vec2ForCTC"
    vocab: list[str]  # id -> token
    blank_id: int
    word_delimiter: str = "|"
    sampling_rate: int = 16000
    do_normalize: bool = True  # zero-mean unit-variance waveform per utterance
    return_attention_mask: bool = False
    name: str = ""
    source: str = ""  # "demo", a model path, or "" (built in memory)
    family: str = ""  # name of the SpeechFamily that loaded it
    # the model's own tokenizer (transformers), where it has one: it writes the CTC targets
    tokenizer: object = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer: where it is and which part of the network it belongs to."""

    path: str
    kind: str  # one of LAYER_KINDS
    index: int  # position within its kind, in model order
    module_type: str  # "Conv1d" | "Linear"


def _identity(self, x, *args, **kwargs):
    return x


@dataclass(frozen=True)
class BlockLayout:
    """Where an SFM's blocks are, as module paths, and how a skipped block passes its input on.

    The prefix cache cuts at block boundaries: a CNN front end whose ``convs`` run in a plain loop,
    glue inside ``encoder`` (projection, positional conv), then ``layers`` in a plain loop, then the
    head. ``conv_passthrough`` / ``layer_passthrough`` replace a block's forward when its output is
    served from the cache below it (same signature, returns what the block would pass on).
    """

    front_end: str  # the CNN feature extractor (its output is cached as one block)
    convs: str  # ModuleList of conv blocks inside front_end
    encoder: str  # module between front end and head that holds ``layers``
    layers: str  # ModuleList of Transformer layers
    head: str  # the CTC output projection
    pos_conv: str | None = None  # positional convolution (a layer kind of its own in reports)
    conv_passthrough: Callable = _identity
    layer_passthrough: Callable = _identity


class SpeechFamily:
    """One model family's answers to the contract. Subclass, set ``name``, override what differs.

    Loading: ``claims_path``/``load`` (a file or directory the family can read) and ``wrap`` (an
    in-memory model plus its processor/labels). Running: ``claims_module``, ``logits``,
    ``output_lengths``. Structure: ``blocks`` (prefix cache, layer kinds), ``export_module``,
    ``conv_geometry`` (frames per sample, stored in exported ONNX files).
    """

    name = "base"
    description = ""  # one line for the README / error messages: which inputs it reads

    # -- loading --------------------------------------------------------------------------
    def claims_path(self, path: Path) -> bool:
        return False

    def load(self, path: Path) -> SpeechModel:
        raise NotImplementedError(f"{self.name}: cannot load files")

    def wrap(self, model: nn.Module, processor=None) -> SpeechModel:
        raise NotImplementedError(f"{self.name}: cannot wrap an in-memory model")

    # -- running --------------------------------------------------------------------------
    def claims_module(self, model: nn.Module) -> bool:
        return False

    def logits(self, model: nn.Module, input_values: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, samples] -> CTC logits [batch, frames, vocab]."""
        raise NotImplementedError

    def output_lengths(self, model: nn.Module, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames per utterance for these input lengths (samples)."""
        return conv_output_lengths(lengths, self.conv_geometry(model))

    # -- structure ------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> BlockLayout:
        raise NotImplementedError(f"{self.name}: no block layout (no prefix cache)")

    def conv_geometry(self, model: nn.Module) -> list[tuple[int, int]]:
        """(kernel, stride) of each CNN front-end layer, in order."""
        layout = self.blocks(model)
        convs = dict(model.named_modules())[layout.convs]
        out = []
        for block in convs:
            conv = next(m for m in block.modules() if isinstance(m, nn.Conv1d))
            out.append((int(conv.kernel_size[0]), int(conv.stride[0])))
        return out

    def layer_kind(self, model: nn.Module, path: str, layout: BlockLayout | None = None) -> str:
        layout = layout or self.blocks(model)

        def under(prefix: str | None) -> bool:
            return prefix is not None and (path == prefix or path.startswith(prefix + "."))

        if under(layout.convs):
            return "cnn"
        if under(layout.pos_conv):
            return "pos_conv"
        if under(layout.head):
            return "head"
        return "transformer"

    def export_module(self, model: nn.Module) -> nn.Module:
        """A module mapping ``input_values`` [batch, samples] to logits only (one ONNX output)."""
        return _LogitsOnly(model, self)

    def export_context(self, model: nn.Module):
        """Context manager active while tracing for ONNX (e.g. choose an exportable attention)."""
        return contextlib.nullcontext()


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module, family: SpeechFamily):
        super().__init__()
        self.model, self._family = model, family

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        return self._family.logits(self.model, input_values)


def conv_output_lengths(lengths: torch.Tensor, geometry: list[tuple[int, int]]) -> torch.Tensor:
    """Frames after a stack of unpadded 1-D convs: floor((n - k) / s) + 1 per layer, at least 0."""
    lengths = torch.as_tensor(lengths)
    for kernel, stride in geometry:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def remove_weight_norm(model: nn.Module) -> nn.Module:
    """Fold weight norm into plain weights (the positional conv) so ModelOpt can wrap the conv.

    Handles both the parametrization form (torch >= 2.1) and the old weight_g/weight_v hook form.
    The folded weight is g * v / |v| computed in float64 and rounded once, so it does not depend on
    the thread count (torch's float32 norm does, by an ulp: a state file written with one
    OMP_NUM_THREADS refused to resume under another, its model fingerprint changed). Returns the
    same model (in place).
    """
    from torch.nn.utils import parametrize

    for module in model.modules():
        if not isinstance(module, (nn.Conv1d, nn.Linear)):
            continue
        if parametrize.is_parametrized(module, "weight"):
            plist = module.parametrizations["weight"]
            dim = getattr(plist[0], "dim", None) if len(plist) == 1 else None
            g, v = (getattr(plist, "original0", None), getattr(plist, "original1", None))
            exact = _weight_norm64(g, v, dim) if dim is not None and g is not None and v is not None else None
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        elif hasattr(module, "weight_g") and hasattr(module, "weight_v"):
            hook = next((h for h in module._forward_pre_hooks.values() if hasattr(h, "dim")), None)
            exact = _weight_norm64(module.weight_g, module.weight_v, hook.dim) if hook is not None else None
            torch.nn.utils.remove_weight_norm(module)
        else:
            continue
        if exact is not None:
            with torch.no_grad():
                module.weight.copy_(exact)
    return model


def _weight_norm64(g: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """g * v / |v| (norm over every axis but ``dim``; ``dim=-1`` or None: the whole tensor) in float64."""
    with torch.no_grad():
        v64 = v.detach().double()
        if dim is None or dim == -1:
            norm = v64.norm()
        else:
            dim = dim % v64.dim()
            norm = v64.norm(dim=[d for d in range(v64.dim()) if d != dim], keepdim=True)
        return (g.detach().double() * v64 / norm).to(v.dtype)


def find_module(model: nn.Module, suffix: str) -> str:
    """The one module path equal to or ending in ``.suffix`` (error if none or several)."""
    hits = [n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)]
    if len(hits) != 1:
        raise ValueError(f"{type(model).__name__} has {len(hits)} modules named '*{suffix}'; expected exactly one")
    return hits[0]


def read_json(path: Path):
    """A checkpoint's JSON file; undecodable text or JSON is one line naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
