"""torchaudio wav2vec2 / HuBERT / WavLM CTC models (``torchaudio.models.wav2vec2_model``, ``hubert_*``,
``wavlm_*``) and ASR pipeline bundles (``--model torchaudio:WAV2VEC2_ASR_BASE_960H``; labels from the
bundle, weights from the torch hub cache).

torchaudio is imported only when one of its models is loaded: it does not import with every torch
build (its compiled parts must match torch's version), and nothing else here needs it.
Structure: conv blocks take and return ``(x, length)``, the Transformer layers sit in
``encoder.transformer.layers`` and return ``(x, position_bias)``, the CTC head is ``aux``, and
``forward`` returns ``(logits, lengths)``. A bundle's ``get_model()`` wraps the model in a module
that layer-normalises the waveform; we unwrap it and normalise in the data pipeline instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from .contract import BlockLayout, SpeechFamily, SpeechModel, find_module

PREFIX = "torchaudio:"


def _conv_passthrough(self, x, length):
    return x, length


def _layer_passthrough(self, x, attention_mask=None, position_bias=None, key_padding_mask=None):
    return x, position_bias


def require_torchaudio():
    try:
        import torchaudio
    except Exception as e:  # ImportError, or OSError from a torch/torchaudio version mismatch
        raise ValueError(f"torchaudio models need the torchaudio package built for this torch, which does "
                         f"not import here ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return torchaudio


def _ta_model_class():
    models = sys.modules.get("torchaudio.models")  # none of its models exist before it is imported
    return getattr(models, "Wav2Vec2Model", None) if models is not None else None


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool | None]:
    """The bare Wav2Vec2Model and the bundle wrapper's waveform normalisation (None: no wrapper)."""
    cls = _ta_model_class()
    inner = getattr(model, "model", None)
    if cls is not None and isinstance(inner, cls) and hasattr(model, "normalize_waveform"):
        return inner, bool(model.normalize_waveform)
    return model, None


class TorchaudioCTCFamily(SpeechFamily):
    name = "torchaudio"
    description = "torchaudio:BUNDLE (a torchaudio ASR pipeline bundle, e.g. torchaudio:WAV2VEC2_ASR_BASE_960H)"

    def claims_path(self, path: Path) -> bool:
        return str(path).startswith(PREFIX)

    def load(self, path: Path) -> SpeechModel:
        torchaudio = require_torchaudio()
        name = str(path)[len(PREFIX):]
        bundle = getattr(torchaudio.pipelines, name, None)
        if bundle is None or not hasattr(bundle, "get_labels"):
            asr = sorted(n for n in dir(torchaudio.pipelines) if "ASR" in n)
            raise ValueError(f"{path}: not a torchaudio ASR bundle; available: {', '.join(asr)}")
        try:
            model = bundle.get_model()
        except Exception as e:  # not in the hub cache and no network, corrupt download, ...
            raise ValueError(f"{path}: cannot get the bundle's weights ({str(e).splitlines()[0]}); they come "
                             "from the torch hub cache or are downloaded") from None
        sm = self.wrap(model, bundle)
        sm.name, sm.source = name, str(path)
        return sm

    def wrap(self, model: nn.Module, processor=None) -> SpeechModel:
        """``processor``: the pipeline bundle, or the labels (id -> token, blank "-" or id 0)."""
        if processor is None:
            raise ValueError("a torchaudio model needs its labels: pass the pipeline bundle or bundle.get_labels()")
        labels = list(processor.get_labels() if hasattr(processor, "get_labels") else processor)
        bare, wrapper_normalizes = _unwrap(model)
        if getattr(bare, "aux", None) is None:
            raise ValueError(f"{type(bare).__name__} has no CTC head (aux is None): build it with aux_num_out "
                             "or use an ASR bundle")
        normalize = wrapper_normalizes
        if normalize is None:
            normalize = bool(getattr(processor, "_normalize_waveform", False))
        return SpeechModel(
            model=bare.eval(), arch=f"torchaudio.{type(bare).__name__}", vocab=labels,
            blank_id=labels.index("-") if "-" in labels else 0, word_delimiter="|",
            sampling_rate=int(getattr(processor, "sample_rate", 16000)), do_normalize=normalize,
            return_attention_mask=False, name=type(bare).__name__, family=self.name)

    def claims_module(self, model: nn.Module) -> bool:
        cls = _ta_model_class()
        return cls is not None and isinstance(_unwrap(model)[0], cls)

    def logits(self, model, input_values, attention_mask=None):
        lengths = None if attention_mask is None else attention_mask.sum(-1)
        return model(input_values, lengths)[0]

    def blocks(self, model) -> BlockLayout:
        return BlockLayout(
            front_end=find_module(model, "feature_extractor"), convs=find_module(model, "feature_extractor.conv_layers"),
            encoder=find_module(model, "encoder"), layers=find_module(model, "encoder.transformer.layers"),
            head=find_module(model, "aux"), pos_conv=find_module(model, "encoder.transformer.pos_conv_embed"),
            conv_passthrough=_conv_passthrough, layer_passthrough=_layer_passthrough)


FAMILY = TorchaudioCTCFamily()
