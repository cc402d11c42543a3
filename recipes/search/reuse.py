"""Run an SFM from a cut point, serving the float prefix from cached block outputs.

Stage 1 quantizes one layer at a time with everything before it in float, so the float output of
the block just before that layer is the same for every layer after it. Caching it per dev batch
and stubbing the prefix out turns L full forwards into L suffix forwards.

Every SFM family (wav2vec2, HuBERT, WavLM, data2vec-audio in transformers or torchaudio) shares
one structure, which its family describes as a ``recipes.speech.BlockLayout``: a feature extractor
whose conv blocks run in a plain loop, then glue (feature projection, positional conv), then the
encoder's Transformer layers in a plain loop, then the head. Cut points are:

* conv layer i > 0: the output of conv layer i-1 (earlier conv layers become identities);
* anything after the feature extractor: the feature extractor's output, plus, for encoder
  layer i > 0 and for modules after the encoder layers, the output of encoder layer i-1.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from recipes.speech.contract import BlockLayout


class _StopForward(Exception):
    """Raised by a capture hook once the wanted block output is stored."""


class _NotBatchFirst(ValueError):
    """A module of run_variants got an input whose rows are not the k copies of the batch."""


@dataclass(frozen=True)
class CutPoint:
    """Blocks served from cache: ``feature_extractor`` flag, last cached conv / encoder layer."""

    conv: int | None = None  # cached conv layer index (earlier ones become identities)
    features: bool = False  # whole feature extractor served from cache
    layer: int | None = None  # cached encoder layer index (earlier ones become identities)


class PrefixRunner:
    """Forward ``batches`` through ``model`` starting from the cut point of a module path."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, object], torch.Tensor], batches: Sequence,
                 layout: BlockLayout | None = None):
        from recipes.speech import family_of

        self.model, self.forward, self.batches = model, forward, batches
        self.layout = layout = layout or family_of(model).blocks(model)
        modules = dict(model.named_modules())
        self.fe_name, self.fe = layout.front_end, modules[layout.front_end]
        self.convs = list(modules[layout.convs])
        self.enc_name = layout.encoder
        self.layers = list(modules[layout.layers])
        self.conv_prefix = layout.convs + "."
        self.layer_prefix = layout.layers + "."
        self._cache: dict[tuple[str, int], list] = {}  # (kind, index) -> per-batch outputs

    # -- where a module's prefix can be cut ------------------------------------------------
    def cut_for(self, module_path: str) -> CutPoint:
        """The deepest cut that leaves ``module_path`` (and everything after it) computed."""
        if module_path.startswith(self.conv_prefix):
            i = int(module_path[len(self.conv_prefix):].split(".")[0])
            return CutPoint(conv=i - 1 if i > 0 else None)
        if module_path.startswith(self.fe_name + "."):
            return CutPoint()  # some other feature-extractor module: no safe cut
        if module_path.startswith(self.layer_prefix):
            i = int(module_path[len(self.layer_prefix):].split(".")[0])
            return CutPoint(features=True, layer=i - 1 if i > 0 else None)
        if module_path.startswith(self.enc_name + "."):  # pos_conv, encoder layer norm
            return CutPoint(features=True)
        # feature projection runs before the encoder, the head after it: tell them apart by order
        names = [n for n, _ in self.model.named_modules()]
        after_encoder = names.index(module_path) > names.index(self.enc_name) if module_path in names else False
        return CutPoint(features=True, layer=len(self.layers) - 1 if after_encoder else None)

    # -- caches ----------------------------------------------------------------------------
    def _block(self, kind: str, index: int) -> nn.Module:
        return {"conv": lambda: self.convs[index], "fe": lambda: self.fe, "layer": lambda: self.layers[index]}[kind]()

    def _outputs(self, kind: str, index: int, cut: CutPoint) -> list:
        """Float outputs of one block for every batch, computed from the cut below it."""
        key = (kind, index)
        if key not in self._cache:
            store: list = []

            def capture(_m, _inp, out):
                store.append(out)
                raise _StopForward

            handle = self._block(kind, index).register_forward_hook(capture)
            try:
                for b, batch in enumerate(self.batches):
                    try:
                        self._run_stubbed(cut, b, batch)
                    except _StopForward:
                        pass
            finally:
                handle.remove()
            self._cache[key] = store
            # layers are visited in model order: caches below this one are never needed again
            stale = "conv" if kind == "fe" else kind
            for old in [k for k in self._cache if k[0] == stale and (kind == "fe" or k[1] < index)]:
                del self._cache[old]
        return self._cache[key]

    def _stubs(self, cut: CutPoint, b: int, k: int = 1) -> list[tuple[nn.Module, Callable]]:
        stubs = []
        if cut.features:
            out = self._outputs("fe", 0, CutPoint(conv=len(self.convs) - 2 if len(self.convs) > 1 else None))
            stubs.append((self.fe, _constant(out, b, k)))
        elif cut.conv is not None:
            out = self._outputs("conv", cut.conv, CutPoint(conv=cut.conv - 1 if cut.conv > 0 else None))
            stubs += [(m, self.layout.conv_passthrough) for m in self.convs[: cut.conv]]
            stubs.append((self.convs[cut.conv], _constant(out, b, k)))
        if cut.layer is not None:
            below = CutPoint(features=True, layer=cut.layer - 1 if cut.layer > 0 else None)
            out = self._outputs("layer", cut.layer, below)
            stubs += [(m, self.layout.layer_passthrough) for m in self.layers[: cut.layer]]
            stubs.append((self.layers[cut.layer], _constant(out, b, k)))
        return stubs

    def _run_stubbed(self, cut: CutPoint, b: int, batch, repeat: int = 1) -> torch.Tensor:
        stubs = self._stubs(cut, b, repeat)
        saved = [(m, m.__dict__.get("forward")) for m, _ in stubs]
        for module, fn in stubs:
            module.forward = types.MethodType(fn, module)
        try:
            return self.forward(self.model, batch)
        finally:
            for module, previous in saved:
                if previous is None:
                    del module.forward  # back to the class's forward
                else:
                    module.forward = previous

    def run(self, module_path: str | None) -> list[torch.Tensor]:
        """Outputs for every batch with the prefix before ``module_path`` served from cache."""
        cut = self.cut_for(module_path) if module_path is not None else CutPoint()
        return [self._run_stubbed(cut, b, batch) for b, batch in enumerate(self.batches)]

    def run_variants(self, module_path: str, variants: Sequence[Callable[[], None]]) -> list[list[torch.Tensor]]:
        """Outputs of every batch for each variant of ``module_path`` (``variants[i]()`` puts the
        module in its i-th form): ``[variant][batch]``, from one suffix forward per batch.

        Why: a search scores many forms of one layer, and on small batches (the equal-length
        batches of a dev set are often one utterance) a forward is mostly per-op overhead; k
        variants in one forward of k copies of the batch cost about half of k forwards on the CPU.
        The batch goes in k times over; the module computes copy i in form i. Exact only for
        models that treat utterances independently, as SFMs do at inference (the rows of a batch
        never mix). A module that is also fed something other than the batch rows (SEW-D's
        query/key projections also project the shared relative position embeddings, one row for
        the whole batch) cannot compute k forms side by side: its variants run one per forward.
        """
        k = len(variants)
        if k == 1:
            variants[0]()
            return [self.run(module_path)]
        module = dict(self.model.named_modules())[module_path]
        cut = self.cut_for(module_path)
        outputs: list[list[torch.Tensor]] = [[] for _ in variants]
        own = module.__dict__.get("forward")
        plain = own or types.MethodType(type(module).forward, module)
        for b, batch in enumerate(self.batches):
            rows = len(batch.ids)

            def forward(mod, x, *args, _rows=rows, **kwargs):
                if x.shape[0] != k * _rows:
                    raise _NotBatchFirst(f"{module_path}: input of {x.shape[0]} rows for {k} variants of a batch of "
                                     f"{_rows} utterances (is its input batch-first?)")
                parts = []
                for chunk, variant in zip(x.chunk(k), variants):
                    variant()
                    parts.append(plain(chunk, *args, **kwargs))
                return torch.cat(parts)

            module.forward = types.MethodType(forward, module)
            try:
                logits = self._run_stubbed(cut, b, batch.repeat(k), repeat=k)
            except _NotBatchFirst:
                logits = None
            finally:
                if own is None:
                    del module.forward
                else:
                    module.forward = own
            if logits is None:
                return self._variants_one_by_one(module_path, variants)
            for out, part in zip(outputs, logits.chunk(k)):
                out.append(part)
        return outputs

    def _variants_one_by_one(self, module_path: str,
                             variants: Sequence[Callable[[], None]]) -> list[list[torch.Tensor]]:
        outputs = []
        for variant in variants:
            variant()
            outputs.append(self.run(module_path))
        return outputs

    def clear(self) -> None:
        self._cache.clear()


def _repeat(value, k: int):
    """A cached block output for a batch repeated ``k`` times (tensors along dim 0)."""
    if value is None or k == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value.repeat(k, *([1] * (value.dim() - 1)))
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(v, k) for v in value)
    raise TypeError(f"cannot repeat a cached block output of type {type(value).__name__}")


def _constant(outputs: list, b: int, k: int = 1):
    def forward(self, *args, **kwargs):
        return _repeat(outputs[b], k)

    return forward
