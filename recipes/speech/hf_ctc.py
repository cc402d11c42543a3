"""Hugging Face CTC family: every wav2vec2-style CTC class of transformers.

wav2vec2, HuBERT, WavLM, data2vec-audio, wav2vec2-conformer, UniSpeech, UniSpeech-SAT, SEW and
SEW-D (raw 16 kHz waveform in, a CNN front end, Transformer/Conformer layers, a CTC head). Directories
written by any transformers ``save_pretrained`` (model.safetensors, sharded safetensors, or
pytorch_model.bin read with weights_only; vocab.json; preprocessor_config.json or transformers 5's
processor_config.json), in-memory models with their processor, and random-weight models with the
real checkpoint shapes (tests and benchmarks run with no hub). Classes and settings the recipes
cannot run exactly (Wav2Vec2BertForCTC's mel input, a strided adapter after the encoder, ...) are
refused up front with one line (:func:`unsupported_reason`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import string
from pathlib import Path

import torch
from torch import nn

from .contract import BlockLayout, SpeechFamily, SpeechModel, find_module, read_json, remove_weight_norm

log = logging.getLogger(__name__)

# config "architectures" entry -> (transformers model class name, config class name, short arch)
SUPPORTED_ARCHS = {
    "Wav2Vec2ForCTC": ("Wav2Vec2ForCTC", "Wav2Vec2Config", "wav2vec2"),
    "HubertForCTC": ("HubertForCTC", "HubertConfig", "hubert"),
    "WavLMForCTC": ("WavLMForCTC", "WavLMConfig", "wavlm"),
    "Data2VecAudioForCTC": ("Data2VecAudioForCTC", "Data2VecAudioConfig", "data2vec-audio"),
    "Wav2Vec2ConformerForCTC": ("Wav2Vec2ConformerForCTC", "Wav2Vec2ConformerConfig", "wav2vec2-conformer"),
    "UniSpeechForCTC": ("UniSpeechForCTC", "UniSpeechConfig", "unispeech"),
    "UniSpeechSatForCTC": ("UniSpeechSatForCTC", "UniSpeechSatConfig", "unispeech-sat"),
    "SEWForCTC": ("SEWForCTC", "SEWConfig", "sew"),
    "SEWDForCTC": ("SEWDForCTC", "SEWDConfig", "sew-d"),
}
# CTC classes of transformers the recipes refuse, and why (one line each)
REFUSED_ARCHS = {
    "Wav2Vec2BertForCTC": "it takes log-mel input_features (a SeamlessM4T feature extractor), not the raw "
                          "waveform input_values every recipe, the prefix cache and the ONNX export feed",
    "ParakeetForCTC": "it takes log-mel input_features, not the raw waveform input_values the recipes feed",
    "LasrForCTC": "it takes log-mel input_features, not the raw waveform input_values the recipes feed",
}
SHORT_TO_ARCH = {short: name for name, (_, _, short) in SUPPORTED_ARCHS.items()}

# Character vocabulary of the wav2vec2-960h family (ids 0..31): blank first, then specials.
CHAR_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|"] + list(string.ascii_uppercase) + ["'"]


# ----------------------------------------------------------------------------- random models

_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)

# Real shapes of the public checkpoints (wav2vec2-base-960h / wav2vec2-large-960h-lv60-self and
# the HuBERT/WavLM/data2vec-audio equivalents). "tiny" keeps the 7-layer CNN but is tiny.
_SHAPES = {
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32,) * 7, feat_extract_norm="group", do_stable_layer_norm=False,
        conv_bias=False, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    ),
    "base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        conv_dim=(512,) * 7, feat_extract_norm="group", do_stable_layer_norm=False,
        conv_bias=False, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
    ),
    "large": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        conv_dim=(512,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
        conv_bias=True, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
    ),
}


# SEW / SEW-D: a 13-layer CNN (stride-1 layers between the strided ones), squeezed encoder
_SEW_CONV = dict(conv_dim=(64, 128, 128, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512),
                 conv_stride=(5, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1),
                 conv_kernel=(10, 3, 1, 3, 1, 3, 1, 3, 1, 2, 1, 2, 1))


def _arch_params(shape: str, arch: str) -> dict:
    """Shape parameters of one architecture, in its config class's own field names."""
    params = dict(_SHAPES[shape], conv_kernel=_CONV_KERNEL, conv_stride=_CONV_STRIDE)
    tiny = shape == "tiny"
    if arch == "data2vec-audio":
        # data2vec-audio: layer-norm CNN with bias, 5 small positional convs instead of one big one
        params.update(feat_extract_norm="layer", conv_bias=True)
        params.pop("do_stable_layer_norm")
        params.update(num_conv_pos_embedding_layers=5, conv_pos_kernel_size=5 if tiny else 19)
        params.pop("num_conv_pos_embeddings")
    elif arch == "wav2vec2-conformer":
        # the conformer checkpoints (wav2vec2-conformer-rel-pos-large / -rope-large) are large
        # layer-norm CNNs with bias; every layer is pre-LN by construction (no do_stable_layer_norm)
        params.pop("do_stable_layer_norm")
        params.update(position_embeddings_type="relative", conv_depthwise_kernel_size=3 if tiny else 31,
                      max_source_positions=5000)
        if not tiny:
            params.update(feat_extract_norm="layer", conv_bias=True)
    elif arch in ("sew", "sew-d"):
        params.pop("do_stable_layer_norm")
        params.update(squeeze_factor=2)
        if not tiny:
            params.update(_SEW_CONV)
        if arch == "sew-d":
            # DeBERTa-style disentangled attention with shared, bucketed relative position embeddings
            params.update(position_buckets=16 if tiny else 256, max_position_embeddings=64 if tiny else 512,
                          relative_attention=True, pos_att_type=("p2c", "c2p"), norm_rel_ebd="layer_norm",
                          hidden_act="gelu_python")
    elif arch == "wavlm" and tiny:
        params.update(num_buckets=32, max_bucket_distance=80)  # WavLM's relative position buckets
    return params


def random_config(shape: str = "tiny", arch: str = "wav2vec2", vocab_size: int = 32, **overrides):
    """HF config with real architecture shapes (no download): the basis of random_model.

    ``overrides`` set config fields after the shape, e.g. ``feat_extract_norm="layer",
    do_stable_layer_norm=True, conv_bias=True`` (the large checkpoints) or
    ``position_embeddings_type="rotary"`` (wav2vec2-conformer); a field the config class does not
    have is refused, so a misspelt switch cannot silently do nothing.
    """
    import transformers

    if shape not in _SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(_SHAPES)}")
    if arch not in SHORT_TO_ARCH:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(SHORT_TO_ARCH)}")
    arch_name = SHORT_TO_ARCH[arch]
    _, config_cls_name, _ = SUPPORTED_ARCHS[arch_name]
    config_cls = getattr(transformers, config_cls_name)
    defaults = config_cls()
    unknown = sorted(k for k in overrides if not hasattr(defaults, k))
    if unknown:
        raise ValueError(f"{config_cls_name} has no field(s) {', '.join(unknown)}")
    params = {**_arch_params(shape, arch), **overrides}
    return config_cls(
        vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, ctc_loss_reduction="mean",
        architectures=[arch_name], **params,
    )


def unsupported_reason(config, arch: str | None = None) -> str | None:
    """Why the recipes cannot run this CTC class / configuration exactly (one line), or None.

    Checked before any weight is read, so a refused model fails at once with the class named.
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if arch is None:
        archs = get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHS or a in REFUSED_ARCHS), None)
        arch = arch or (archs[0] if archs else None)
    if arch in REFUSED_ARCHS:
        return f"{arch} is not supported: {REFUSED_ARCHS[arch]}"
    if arch not in SUPPORTED_ARCHS:
        return None  # not ours to judge here: the caller names the supported classes
    if get("add_adapter", False):
        return (f"{arch} with add_adapter=true is not supported: its strided adapter after the encoder "
                "changes the frame rate that the frame counts and the ONNX export take from the CNN alone")
    if arch == "Wav2Vec2ConformerForCTC":
        kind = get("position_embeddings_type", "relative")
        if kind not in ("relative", "rotary", None):
            return (f"{arch} with position_embeddings_type={kind!r} is not supported: transformers' "
                    "Wav2Vec2Conformer implements 'relative', 'rotary' and None only (any other value, e.g. "
                    "Wav2Vec2Bert's 'relative_key', would run with no position information at all)")
    return None


def check_supported(config, arch: str | None = None) -> None:
    reason = unsupported_reason(config, arch)
    if reason is not None:
        raise ValueError(reason)


def _char_vocab(vocab_size: int) -> list[str]:
    if vocab_size < 5:
        raise ValueError("vocab_size must be >= 5 (blank, specials and the word delimiter)")
    vocab = CHAR_VOCAB[:vocab_size]
    vocab += [f"<extra_{i}>" for i in range(vocab_size - len(vocab))]
    return vocab


def random_model(shape: str = "tiny", arch: str = "wav2vec2", vocab_size: int = 32,
                 seed: int = 0, device: str | torch.device | None = None, **overrides) -> SpeechModel:
    """Random-weight CTC model with real shapes: lets tests and benchmarks run with no hub.

    device="meta" builds the module tree without allocating weights (shape/inventory checks);
    ``overrides`` set config switches (see :func:`random_config`); a configuration the recipes
    refuse (:func:`unsupported_reason`) is refused here too.
    """
    import transformers

    config = random_config(shape, arch, vocab_size, **overrides)
    check_supported(config)
    torch.manual_seed(seed)
    model_cls = getattr(transformers, SUPPORTED_ARCHS[config.architectures[0]][0])
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = prepare_model(model_cls(config).eval())
    return SpeechModel(
        model=model, arch=config.architectures[0], vocab=_char_vocab(vocab_size), blank_id=0,
        word_delimiter="|", sampling_rate=16000, do_normalize=True,
        return_attention_mask=config.feat_extract_norm == "layer",
        name=f"random-{arch}-{shape}", family="huggingface",
    )


# ----------------------------------------------------------------------------- family fixes


class _UnusedWeights(nn.Module):
    """Weights a checkpoint holds for a module its forward never calls: kept under the same names so
    the state dict round-trips, but no longer a Conv1d, so no quantizer waits for a tensor that
    never comes (a calibrator with no data cannot choose a range)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module is never called by its model's forward")


def _retire_unused_pos_conv(model: nn.Module) -> None:
    """Wav2Vec2Conformer builds ``encoder.pos_conv_embed`` but its forward never calls it (the
    positions come from the relative or rotary embedding): replace it by its bare weights."""
    import inspect

    for encoder in list(model.modules()):
        pos = getattr(encoder, "pos_conv_embed", None)
        if type(encoder).__name__ != "Wav2Vec2ConformerEncoder" or not isinstance(pos, nn.Module) \
                or isinstance(pos, _UnusedWeights):
            continue
        if "pos_conv_embed(" in inspect.getsource(type(encoder).forward):
            continue  # a transformers version that uses it: keep it
        remove_weight_norm(pos)
        holder = _UnusedWeights()
        for child_name, child in pos.named_children():
            if not any(True for _ in child.parameters()):
                continue
            weights = _UnusedWeights()
            for pname, param in child.named_parameters(recurse=False):
                weights.register_parameter(pname, param)
            holder.add_module(child_name, weights)
        encoder.pos_conv_embed = holder


def _wavlm_attention_through_modules(self, hidden_states, attention_mask, gated_position_bias,
                                     output_attentions):
    """WavLMAttention.torch_multi_head_self_attention with q/k/v/out_proj called as modules.

    transformers' version hands the projection weights to F.multi_head_attention_forward, so the
    Linear modules never run: their quantizers would see no tensor and the weights would stay
    float. Same computation (projections, the gated relative position bias plus the padding mask
    added to the scores, SDPA, output projection) through the modules.
    """
    if output_attentions:  # averaged attention weights: transformers' own path
        return type(self).torch_multi_head_self_attention(self, hidden_states, attention_mask,
                                                          gated_position_bias, output_attentions)
    bsz, tgt_len, embed_dim = hidden_states.shape
    heads = self.num_heads

    def split(x):
        return x.view(bsz, tgt_len, heads, embed_dim // heads).transpose(1, 2)

    query, key, value = (split(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
    bias = gated_position_bias.view(bsz, heads, tgt_len, tgt_len)
    if attention_mask is not None:
        bias = bias.masked_fill(attention_mask.ne(1)[:, None, None, :], float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=bias, dropout_p=float(self.dropout) if self.training else 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)), None


def _route_wavlm_projections(model: nn.Module) -> None:
    import types

    for module in model.modules():
        if type(module).__name__ == "WavLMAttention" and "torch_multi_head_self_attention" not in module.__dict__:
            module.torch_multi_head_self_attention = types.MethodType(_wavlm_attention_through_modules, module)


def prepare_model(model: nn.Module) -> nn.Module:
    """What every recipe needs of an HF CTC model beyond transformers' own: each quantizable module
    runs as a module (WavLM's attention projections) and no module is dead weight (the conformer's
    unused positional conv). Logits unchanged up to float rounding; in place, returns ``model``."""
    _retire_unused_pos_conv(model)
    _route_wavlm_projections(model)
    return model


# ----------------------------------------------------------------------------- load / save


def save_model(sm: SpeechModel, directory: str | Path) -> Path:
    """Write an HF directory (safetensors + vocab.json + preprocessor_config.json)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        sm.model.save_pretrained(directory, safe_serialization=True)
    vocab = {tok: i for i, tok in enumerate(sm.vocab)}
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=1, ensure_ascii=False))
    blank = sm.vocab[sm.blank_id]
    tokenizer_config = {
        "pad_token": blank, "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "word_delimiter_token": sm.word_delimiter, "do_lower_case": False,
        "tokenizer_class": "Wav2Vec2CTCTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    preprocessor = {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
        "padding_side": "right", "padding_value": 0.0, "sampling_rate": sm.sampling_rate,
        "do_normalize": sm.do_normalize, "return_attention_mask": sm.return_attention_mask,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1))
    return directory


def _load_vocab(directory: Path) -> tuple[list[str], int, str]:
    vocab_path = directory / "vocab.json"
    if not vocab_path.is_file():
        raise FileNotFoundError(f"{directory}: no vocabulary (vocab.json missing); "
                                "a CTC model needs its character vocabulary to decode")
    raw = read_json(vocab_path)
    if raw and all(isinstance(v, dict) for v in raw.values()):  # multilingual {lang: {tok: id}}
        raise ValueError(f"{vocab_path}: per-language vocabularies are not supported")
    if not raw:
        raise ValueError(f"{vocab_path}: empty vocabulary")
    size = max(raw.values()) + 1
    vocab = [f"<unused_{i}>" for i in range(size)]
    for tok, i in raw.items():
        vocab[i] = tok
    tok_cfg_path = directory / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    pad = tok_cfg.get("pad_token", "<pad>")
    pad = pad.get("content", "<pad>") if isinstance(pad, dict) else pad
    delimiter = tok_cfg.get("word_delimiter_token", "|")
    if pad not in raw:
        raise ValueError(f"{vocab_path}: pad/blank token {pad!r} not in the vocabulary")
    return vocab, raw[pad], delimiter


@contextlib.contextmanager
def _quiet_transformers():
    """No per-tensor "Loading weights" bar: the demo model is loaded on every CLI call."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [directory / s for s in shards]
    return [directory / "model.safetensors"]


def _has_folded_weight_norm(directory: Path) -> bool:
    """True if the checkpoint was saved after remove_weight_norm (plain pos_conv weight)."""
    from safetensors import safe_open

    for shard in _safetensors_files(directory):
        try:
            with safe_open(str(shard), framework="pt") as f:
                if any(k.endswith("pos_conv_embed.conv.weight") for k in f.keys()):
                    return True
        except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
            raise ValueError(f"{shard}: not a readable safetensors file ({e})") from None
    return False


def _load_folded(model_cls, directory: Path) -> tuple[nn.Module, list[str]]:
    """Build from config, fold weight norm, then load the plain weights (strict keys)."""
    from safetensors.torch import load_file

    config = model_cls.config_class.from_pretrained(directory, local_files_only=True)
    model = remove_weight_norm(model_cls(config)).float()
    state = {}
    for shard in _safetensors_files(directory):
        state.update(load_file(str(shard)))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        log.warning("%s: ignoring %d unexpected weights, e.g. %s", directory,
                    len(result.unexpected_keys), sorted(result.unexpected_keys)[:3])
    return model, list(result.missing_keys)


def _preprocessor_config(directory: Path) -> dict:
    """preprocessor_config.json, or the feature extractor nested in processor_config.json (as
    transformers 5's ``Processor.save_pretrained`` writes it)."""
    pre_path = directory / "preprocessor_config.json"
    if pre_path.is_file():
        return read_json(pre_path)
    proc_path = directory / "processor_config.json"
    if proc_path.is_file():
        nested = read_json(proc_path).get("feature_extractor")
        if isinstance(nested, dict):
            return nested
    raise FileNotFoundError(f"{directory}: no feature extractor settings (preprocessor_config.json, or "
                            "processor_config.json with a 'feature_extractor' entry)")


def load_ctc_model(path: str | Path) -> SpeechModel:
    """Load an HF CTC speech model from a local directory (safetensors, or .bin tensors only)."""
    import transformers

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: config.json missing")
    config = read_json(config_path)
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHS), None)
    refused = unsupported_reason(config, arch)
    if refused is not None:
        raise ValueError(f"{directory}: {refused}")
    if arch is None:
        raise ValueError(f"{directory}: architecture {archs or '(none given)'} is not a supported "
                         f"CTC model; supported: {', '.join(SUPPORTED_ARCHS)}")
    has_safetensors = (directory / "model.safetensors").is_file() or \
        (directory / "model.safetensors.index.json").is_file()
    has_bin = any(directory.glob("pytorch_model*.bin"))
    if not (has_safetensors or has_bin):
        raise FileNotFoundError(f"{directory}: no weights (model.safetensors or pytorch_model.bin)")
    # our readers first: a missing or broken file gets an error naming it; then the values come
    # from transformers' own AutoTokenizer / AutoFeatureExtractor, as a plain transformers script sees them
    _preprocessor_config(directory)
    _load_vocab(directory)
    fields = _processor_fields(*_transformers_processor(directory))

    model_cls = getattr(transformers, SUPPORTED_ARCHS[arch][0])
    if has_safetensors and _has_folded_weight_norm(directory):
        model, missing = _load_folded(model_cls, directory)
    else:
        # pytorch_model.bin goes through transformers' torch.load(weights_only=True): tensors
        # only, no pickled code runs
        with _quiet_transformers():
            try:
                model, info = model_cls.from_pretrained(
                    directory, local_files_only=True, use_safetensors=has_safetensors, dtype=torch.float32,
                    output_loading_info=True,
                )
            except Exception as e:  # unpickling refused, truncated file, shape mismatch, ...
                raise ValueError(f"{directory}: cannot load the weights ({str(e).splitlines()[0]})") from None
        missing = info.get("missing_keys", [])
    missing = [k for k in missing if "masked_spec_embed" not in k]
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks weights for {len(missing)} parameters, "
                         f"e.g. {sorted(missing)[:5]}")
    if model.config.vocab_size != len(fields["vocab"]):
        log.warning("%s: lm_head has %d outputs but the tokenizer has %d tokens",
                    directory, model.config.vocab_size, len(fields["vocab"]))
    return SpeechModel(model=prepare_model(model.eval()), arch=arch, **fields, name=directory.name,
                       source=str(directory), family="huggingface")


def _transformers_processor(directory: Path):
    """(tokenizer, feature extractor) read by transformers itself (either directory layout)."""
    from transformers import AutoFeatureExtractor, AutoTokenizer

    with _quiet_transformers():
        try:
            return (AutoTokenizer.from_pretrained(directory, local_files_only=True),
                    AutoFeatureExtractor.from_pretrained(directory, local_files_only=True))
        except Exception as e:  # an unknown tokenizer class, a bad config value, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{directory}: transformers cannot load its tokenizer / feature extractor "
                             f"({first[:200]})") from None


def _processor_fields(tokenizer, fe) -> dict:
    """The SpeechModel fields a CTC tokenizer and feature extractor define."""
    ids = tokenizer.get_vocab()
    vocab = [f"<unused_{i}>" for i in range(max(ids.values()) + 1)]
    for token, i in ids.items():
        vocab[i] = token
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__}: no pad token (the CTC blank)")
    return dict(vocab=vocab, blank_id=int(tokenizer.pad_token_id), tokenizer=tokenizer,
                word_delimiter=getattr(tokenizer, "word_delimiter_token", "|") or "|",
                sampling_rate=int(getattr(fe, "sampling_rate", 16000)),
                do_normalize=bool(getattr(fe, "do_normalize", True)),
                return_attention_mask=bool(getattr(fe, "return_attention_mask", False)))


# ----------------------------------------------------------------------------- the family


def _hf_layer_passthrough(self, hidden_states, *args, **kwargs):
    # encoder layers return tuples whose first item is the hidden state; WavLM also threads
    # position_bias through, which the cached layer below the cut provides
    if "position_bias" in kwargs:
        return (hidden_states, kwargs["position_bias"])
    return (hidden_states,)


def _tensor_layer_passthrough(self, hidden_states, *args, **kwargs):
    # SEW-D's DeBERTa-style layers return the hidden state itself (not a tuple); the relative
    # positions and the shared relative embeddings are computed once above the layers
    return hidden_states


def _layer_list(model) -> tuple[str, str, bool]:
    """(encoder path, layers path, layers return a plain tensor) of a wav2vec2-style model.

    wav2vec2 / HuBERT / WavLM / data2vec-audio / conformer / UniSpeech(-SAT) / SEW: ``encoder.layers``
    (tuple outputs); SEW-D: ``encoder.encoder.layer``, DeBERTa style, inside the SEW encoder that
    pools before and upsamples after them (tensor outputs).
    """
    names = [n for n, _ in model.named_modules()]
    deberta = [n for n in names if n == "encoder.encoder.layer" or n.endswith(".encoder.encoder.layer")]
    if len(deberta) == 1:
        return deberta[0].rsplit(".", 2)[0], deberta[0], True
    layers = find_module(model, "encoder.layers")
    return layers.rsplit(".", 1)[0], layers, False


class HFCTCFamily(SpeechFamily):
    name = "huggingface"
    description = ("a Hugging Face CTC directory (config.json + model.safetensors / sharded safetensors / "
                   "pytorch_model.bin, vocab.json, preprocessor_config.json or processor_config.json)")

    def claims_path(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file()

    def load(self, path: Path) -> SpeechModel:
        return load_ctc_model(path)

    def wrap(self, model: nn.Module, processor=None) -> SpeechModel:
        """An in-memory HF CTC model and its processor (or tokenizer) for the vocabulary."""
        if processor is None:
            raise ValueError("an in-memory model needs its processor (or tokenizer) for the vocabulary")
        config = getattr(model, "config", None)
        check_supported(config if config is not None else {}, type(model).__name__)
        fields = _processor_fields(getattr(processor, "tokenizer", processor),
                                   getattr(processor, "feature_extractor", None))
        return SpeechModel(model=prepare_model(remove_weight_norm(model).eval()), arch=type(model).__name__, **fields,
                           name=type(model).__name__, family=self.name)

    def claims_module(self, model: nn.Module) -> bool:
        # duck-typed: any module with the HF CTC interface (``.logits`` output and the frame-count
        # method), as transformers' own CTC classes and look-alikes have
        return callable(model) and hasattr(model, "_get_feat_extract_output_lengths")

    def logits(self, model, input_values, attention_mask=None):
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return model(input_values, **kwargs).logits

    def output_lengths(self, model, lengths):
        return model._get_feat_extract_output_lengths(torch.as_tensor(lengths))

    def blocks(self, model) -> BlockLayout:
        encoder, layers, tensor_out = _layer_list(model)
        pos = [n for n, m in model.named_modules() if n.endswith("pos_conv_embed")
               and any(isinstance(c, nn.Conv1d) for c in m.modules())]
        return BlockLayout(
            front_end=find_module(model, "feature_extractor"),
            convs=find_module(model, "feature_extractor.conv_layers"),
            encoder=encoder, layers=layers,
            head=find_module(model, "lm_head"), pos_conv=pos[0] if len(pos) == 1 else None,
            layer_passthrough=_tensor_layer_passthrough if tensor_out else _hf_layer_passthrough)

    def conv_geometry(self, model):
        config = model.config
        return [(int(k), int(s)) for k, s in zip(config.conv_kernel, config.conv_stride)]

    @contextlib.contextmanager
    def export_context(self, model):
        """Trace HF's eager attention with no mask: the export has no mask input, yet SDPA exports
        an all-zero mask Add and an IsNaN/Where pair per layer, and eager (transformers 5) an
        all-zero [T, T] mask Add per layer (~1 ms each at 10 s on one core)."""
        config = getattr(model, "config", None)
        previous = getattr(config, "_attn_implementation", None)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_no_mask_when_unmasked(model))
            stack.enter_context(_no_cached_rotary(model))
            if previous not in (None, "eager") and hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("eager")
                stack.callback(model.set_attn_implementation, previous)
            yield


@contextlib.contextmanager
def _no_cached_rotary(model):
    """Forget the conformer's rotary table (cached per sequence length) around tracing: one cached
    at the trace length would be baked into the graph as a constant, and the ONNX file would run
    at that length only."""
    holders = [m for m in model.modules() if hasattr(m, "cached_rotary_positional_embedding")]

    def forget():
        for m in holders:
            m.cached_sequence_length, m.cached_rotary_positional_embedding = None, None

    forget()
    try:
        yield
    finally:
        forget()


@contextlib.contextmanager
def _no_mask_when_unmasked(model):
    """Make `create_bidirectional_mask(attention_mask=None)` return None in the model's modules.

    Workaround: transformers 5 materialises the all-valid mask whenever it is traced
    (masking_utils skips it only outside tracing). Remove when it skips it while tracing too.
    Eager attention adds no mask when given None, so the logits are unchanged.
    """
    import sys

    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    patched = [(mod, mod.create_bidirectional_mask) for mod in modules
               if mod is not None and callable(getattr(mod, "create_bidirectional_mask", None))]

    def wrap(original):
        def create_bidirectional_mask(*args, **kwargs):
            mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
            return None if mask is None else original(*args, **kwargs)
        return create_bidirectional_mask

    for mod, original in patched:
        mod.create_bidirectional_mask = wrap(original)
    try:
        yield
    finally:
        for mod, original in patched:
            mod.create_bidirectional_mask = original


FAMILY = HFCTCFamily()
