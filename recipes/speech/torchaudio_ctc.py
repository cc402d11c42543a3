"""torchaudio wav2vec2 / HuBERT / WavLM CTC models (``torchaudio.models.wav2vec2_model``, ``hubert_*``,
``wavlm_*``), ASR pipeline bundles (``--model torchaudio:WAV2VEC2_ASR_BASE_960H``; labels from the
bundle, weights from the torch hub cache) and local checkpoint directories (``--model DIR``).

A local checkpoint is a directory of three files, nothing pickled (:func:`save_torchaudio_model`
writes one):

* ``torchaudio_config.json``: one key naming the builder, ``"wav2vec2_model"`` (wav2vec2, HuBERT)
  or ``"wavlm_model"``, whose value is that function's keyword arguments (``aux_num_out``: the
  number of labels); the processor facts ``"do_normalize"`` (zero-mean unit-variance waveform,
  required) and ``"sampling_rate"`` (default 16000); optionally ``"blank_id"`` (default: the id
  of ``"-"``, else 0) and ``"word_delimiter"`` (default ``"|"``). Not ``config.json``, which
  marks a Hugging Face directory.
* ``labels.json``: the labels, id -> token, as a JSON list of strings (``bundle.get_labels()``).
* ``model.safetensors``: the model's ``state_dict()`` (the positional conv's weight norm either
  as torchaudio stores it, ``parametrizations.weight.original0/1``, or folded into ``weight``).

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

import torch
from torch import nn

from .contract import BlockLayout, SpeechFamily, SpeechModel, find_module, read_json, remove_weight_norm

PREFIX = "torchaudio:"
CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE = "torchaudio_config.json", "labels.json", "model.safetensors"
BUILDERS = ("wav2vec2_model", "wavlm_model")
_FACTS = ("sampling_rate", "do_normalize", "blank_id", "word_delimiter")


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


def _default_blank(labels: list[str]) -> int:
    return labels.index("-") if "-" in labels else 0


# ----------------------------------------------------------------------------- local checkpoints


def builder_kwargs(model: nn.Module) -> tuple[str, dict]:
    """(builder name, keyword arguments) that rebuild this torchaudio ``Wav2Vec2Model``'s modules,
    read off the modules themselves (torchaudio keeps no config)."""
    bare, _ = _unwrap(model)
    convs = list(bare.feature_extractor.conv_layers)
    norms = [type(b.layer_norm).__name__ if b.layer_norm is not None else None for b in convs]
    if norms[0] == "GroupNorm" and not any(norms[1:]):
        mode = "group_norm"
    elif all(n == "LayerNorm" for n in norms):
        mode = "layer_norm"
    else:
        raise ValueError(f"conv blocks normalised as {norms}: neither torchaudio's group_norm nor layer_norm mode")
    projection, transformer = bare.encoder.feature_projection, bare.encoder.transformer
    first = transformer.layers[0]
    attention, ff = first.attention, first.feed_forward
    wavlm = hasattr(attention, "num_buckets")
    kwargs = {
        "extractor_mode": mode,
        "extractor_conv_layer_config": [[b.conv.out_channels, b.conv.kernel_size[0], b.conv.stride[0]] for b in convs],
        "extractor_conv_bias": convs[0].conv.bias is not None,
        "encoder_embed_dim": projection.projection.out_features,
        "encoder_projection_dropout": float(projection.dropout.p),
        "encoder_pos_conv_kernel": int(transformer.pos_conv_embed.kernel_size),
        "encoder_pos_conv_groups": int(transformer.pos_conv_embed.conv.groups),
        "encoder_num_layers": len(transformer.layers),
        "encoder_num_heads": int(attention.num_heads),
    }
    if wavlm:
        kwargs.update(encoder_num_buckets=int(attention.num_buckets), encoder_max_distance=int(attention.max_distance))
    kwargs.update({
        "encoder_attention_dropout": float(attention.dropout),
        "encoder_ff_interm_features": ff.intermediate_dense.out_features,
        "encoder_ff_interm_dropout": float(ff.intermediate_dropout.p),
        "encoder_dropout": float(first.dropout.p),
        "encoder_layer_norm_first": bool(first.layer_norm_first),
        "encoder_layer_drop": float(transformer.layer_drop),
        "aux_num_out": None if bare.aux is None else int(bare.aux.out_features),
    })
    return ("wavlm_model" if wavlm else "wav2vec2_model"), kwargs


def _weight_norm_folded(model: nn.Module, keys) -> nn.Module:
    """Fold the model's weight norm when the state dict keys are the folded form."""
    if set(keys) != set(model.state_dict()) and any(k.endswith("pos_conv_embed.conv.weight") for k in keys):
        remove_weight_norm(model)
    return model


def _check_state(state: dict, model: nn.Module, weights: Path, config: Path) -> None:
    """One line naming the file when the weights do not fit the modules the config builds."""
    target = model.state_dict()
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                 for what, keys in (("missing keys", missing), ("unexpected keys", unexpected)) if keys]
        raise ValueError(f"{weights}: does not match the model {config.name} describes: {'; '.join(parts)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise ValueError(f"{weights}: {key} has shape {list(tensor.shape)}, the model {config.name} "
                             f"describes has {list(target[key].shape)}")


def save_torchaudio_model(sm: SpeechModel, directory: str | Path) -> Path:
    """Write a local torchaudio checkpoint (``torchaudio_config.json``, ``labels.json``,
    ``model.safetensors``; see the module docstring) that ``--model DIR`` loads.

    Each file is written to a temp file in the directory and renamed, the config last, so a
    killed write never leaves a directory that loads with stale or truncated parts.
    """
    from safetensors.torch import save_file

    from recipes.runtime.atomic import atomic_output, write_json_atomic

    bare, _ = _unwrap(sm.model)
    cls = _ta_model_class()
    if cls is None or not isinstance(bare, cls):
        raise ValueError(f"save_torchaudio_model: {type(bare).__name__} is not a torchaudio Wav2Vec2Model")
    if any(type(m).__module__.startswith("modelopt") for m in bare.modules()):
        raise ValueError("save_torchaudio_model: the model holds ModelOpt quantizers; save the float model "
                         "(the quantized one is what 'stablequant quantize' writes to OUT/model.pth)")
    builder, kwargs = builder_kwargs(bare)
    if kwargs["aux_num_out"] != len(sm.vocab):
        raise ValueError(f"save_torchaudio_model: the CTC head has {kwargs['aux_num_out']} outputs but the "
                         f"model has {len(sm.vocab)} labels")
    torchaudio = require_torchaudio()
    state = {k: v.detach().to("cpu").contiguous() for k, v in bare.state_dict().items()}
    with torch.device("meta"):  # the config must rebuild exactly these modules (no memory used)
        rebuilt = _weight_norm_folded(getattr(torchaudio.models, builder)(**kwargs), state)
    directory = Path(directory)
    _check_state(state, rebuilt, directory / WEIGHTS_FILE, directory / CONFIG_FILE)
    if (directory / "config.json").exists():
        raise ValueError(f"{directory} holds config.json, which marks a Hugging Face model directory: "
                         "write the torchaudio checkpoint into another directory")
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_output(directory / WEIGHTS_FILE) as tmp:
        mode = tmp.stat().st_mode
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.chmod(mode)  # safetensors recreates the file private (0600); keep the usual umask mode
    write_json_atomic(directory / LABELS_FILE, list(sm.vocab))
    config = {builder: kwargs, "sampling_rate": int(sm.sampling_rate), "do_normalize": bool(sm.do_normalize),
              "blank_id": int(sm.blank_id), "word_delimiter": sm.word_delimiter}
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


def _read_checkpoint_json(path: Path, what: str):
    if not path.is_file():
        raise ValueError(f"{path}: missing (a torchaudio checkpoint directory holds {CONFIG_FILE}, "
                         f"{LABELS_FILE} and {WEIGHTS_FILE}; {what})")
    return read_json(path)


def load_torchaudio_dir(directory: str | Path) -> SpeechModel:
    """Read a local torchaudio checkpoint directory (see the module docstring)."""
    directory = Path(directory)
    config_path, labels_path, weights = (directory / f for f in (CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE))
    config = _read_checkpoint_json(config_path, "the builder's keyword arguments")
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    builders = [b for b in BUILDERS if b in config]
    unknown = sorted(set(config) - set(BUILDERS) - set(_FACTS))
    if unknown or len(builders) != 1 or not isinstance(config[builders[0]], dict):
        raise ValueError(f"{config_path}: expected one of {' or '.join(map(repr, BUILDERS))} (an object of its "
                         f"keyword arguments) and {', '.join(map(repr, _FACTS))}"
                         + (f"; unknown keys: {', '.join(unknown)}" if unknown else ""))
    builder, kwargs = builders[0], config[builders[0]]
    if not isinstance(config.get("do_normalize"), bool):
        raise ValueError(f"{config_path}: \"do_normalize\" must be true or false (does the model expect "
                         "zero-mean unit-variance waveforms?)")
    sampling_rate = config.get("sampling_rate", 16000)
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate <= 0:
        raise ValueError(f"{config_path}: \"sampling_rate\" must be a positive integer, got {sampling_rate!r}")
    labels = _read_checkpoint_json(labels_path, "the labels, id -> token")
    if not isinstance(labels, list) or not labels or not all(isinstance(t, str) and t for t in labels):
        raise ValueError(f"{labels_path}: expected a non-empty JSON list of token strings (id -> token)")
    if len(set(labels)) != len(labels):
        dup = sorted({t for t in labels if labels.count(t) > 1})
        raise ValueError(f"{labels_path}: token(s) listed twice: {', '.join(map(repr, dup))}")
    blank_id = config.get("blank_id", _default_blank(labels))
    if isinstance(blank_id, bool) or not isinstance(blank_id, int) or not 0 <= blank_id < len(labels):
        raise ValueError(f"{config_path}: \"blank_id\" must be a label id in 0..{len(labels) - 1}, got {blank_id!r}")
    delimiter = config.get("word_delimiter", "|")
    if not isinstance(delimiter, str) or not delimiter:
        raise ValueError(f"{config_path}: \"word_delimiter\" must be a token string, got {delimiter!r}")
    if kwargs.get("aux_num_out") is None:
        raise ValueError(f"{config_path}: {builder}.aux_num_out is missing or null: a CTC model needs its head "
                         f"(aux_num_out = the {len(labels)} labels of {LABELS_FILE})")
    if kwargs["aux_num_out"] != len(labels):
        raise ValueError(f"{labels_path}: {len(labels)} labels, but {CONFIG_FILE} gives the CTC head "
                         f"aux_num_out={kwargs['aux_num_out']} outputs")
    if not weights.is_file():
        raise ValueError(f"{weights}: missing (a torchaudio checkpoint directory holds {CONFIG_FILE}, "
                         f"{LABELS_FILE} and {WEIGHTS_FILE}; the state_dict)")

    torchaudio = require_torchaudio()
    try:
        model = getattr(torchaudio.models, builder)(**kwargs)
    except Exception as e:  # unknown/missing keyword, bad value (TypeError, ValueError, RuntimeError ...)
        raise ValueError(f"{config_path}: torchaudio.models.{builder}(...) rejects these arguments "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    model = _weight_norm_folded(model, state)
    _check_state(state, model, weights, config_path)
    model.load_state_dict(state, strict=True)
    return SpeechModel(
        model=model.float().eval(), arch=f"torchaudio.{type(model).__name__}", vocab=labels, blank_id=blank_id,
        word_delimiter=delimiter, sampling_rate=sampling_rate, do_normalize=config["do_normalize"],
        return_attention_mask=False, name=directory.name, source=str(directory), family="torchaudio")


class TorchaudioCTCFamily(SpeechFamily):
    name = "torchaudio"
    description = (f"torchaudio:BUNDLE (a torchaudio ASR pipeline bundle, e.g. torchaudio:WAV2VEC2_ASR_BASE_960H) "
                   f"or a directory with {CONFIG_FILE}, {LABELS_FILE} and {WEIGHTS_FILE}")

    def claims_path(self, path: Path) -> bool:
        if str(path).startswith(PREFIX):
            return True
        # a directory with either JSON file (so a missing one is named); config.json is Hugging Face's
        return (path.is_dir() and not (path / "config.json").is_file()
                and any((path / f).is_file() for f in (CONFIG_FILE, LABELS_FILE)))

    def load(self, path: Path) -> SpeechModel:
        if not str(path).startswith(PREFIX):
            return load_torchaudio_dir(path)
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
            blank_id=_default_blank(labels), word_delimiter="|",
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
            front_end=find_module(model, "feature_extractor"),
            convs=find_module(model, "feature_extractor.conv_layers"),
            encoder=find_module(model, "encoder"), layers=find_module(model, "encoder.transformer.layers"),
            head=find_module(model, "aux"), pos_conv=find_module(model, "encoder.transformer.pos_conv_embed"),
            conv_passthrough=_conv_passthrough, layer_passthrough=_layer_passthrough)


FAMILY = TorchaudioCTCFamily()
