"""fairseq wav2vec2 / HuBERT CTC checkpoints (``.pt``, the StableQuant reference repository's format).

The checkpoint is unpickled with torch's weights-only unpickler plus an explicit allow-list: the
containers fairseq stores its settings in (``argparse.Namespace``; omegaconf ``DictConfig`` /
``ListConfig`` and their nodes, read into inert stand-ins, so omegaconf need not be installed and
none of its code runs). Any other global is refused with its name. The weights are renamed onto
the Hugging Face module (as transformers' ``convert_wav2vec2_original_pytorch_checkpoint_to_pytorch``
maps them), so everything downstream runs the Hugging Face family's code. The vocabulary is
fairseq's target dictionary ``dict.ltr.txt`` beside the checkpoint: ``<s>``, ``<pad>``, ``</s>``,
``<unk>``, then the file's symbols in order; ``<s>`` (id 0) is fairseq's CTC blank, ``|`` the
word boundary.
"""

from __future__ import annotations

import argparse
import ast
import logging
import pickle
import re
from collections import defaultdict
from pathlib import Path

import torch

from .contract import SpeechFamily, SpeechModel, remove_weight_norm

log = logging.getLogger(__name__)

FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
ENCODER_PREFIX = "w2v_encoder.w2v_model."
HEAD_PREFIX = "w2v_encoder.proj."

# fairseq's defaults for the settings the module shapes do not reveal (fairseq/models/wav2vec/wav2vec2.py)
DEFAULTS = {
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "encoder_attention_heads": 12, "extractor_mode": "default", "layer_norm_first": False,
    "conv_bias": False, "activation_fn": "gelu", "normalize": False,
}


# ----------------------------------------------------------------------------- safe unpickling


class _Inert:
    """Stand-in for an allow-listed omegaconf class: keeps the pickled state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _DictConfig(_Inert):
    pass


class _ListConfig(_Inert):
    pass


class _Node(_Inert):
    pass


class _Metadata(_Inert):
    pass


class _Any:
    """typing.Any as omegaconf pickles it (a type annotation, never called)."""


def _allowed_globals() -> list:
    nodes = ["AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode"]
    return [
        argparse.Namespace, dict, list, tuple, set, int, float, str, bool, defaultdict,
        (_DictConfig, "omegaconf.dictconfig.DictConfig"), (_ListConfig, "omegaconf.listconfig.ListConfig"),
        (_Metadata, "omegaconf.base.ContainerMetadata"), (_Metadata, "omegaconf.base.Metadata"),
        (_Any, "typing.Any"),
        *[(type(name, (_Node,), {}), f"omegaconf.nodes.{name}") for name in nodes],
    ]


def read_checkpoint(path: Path) -> dict:
    """The checkpoint as plain Python (dicts, lists, scalars, tensors); refuses anything else."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # not a disallowed class: a corrupt or foreign pickle
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise ValueError(f"{path}: not a readable PyTorch checkpoint "
                             f"({detail.group(1).strip() if detail else str(e).splitlines()[0]})") from None
        raise ValueError(f"{path}: refused to unpickle {found.group(1)}: a fairseq checkpoint may hold only "
                         "tensors, containers, argparse.Namespace and omegaconf configs (this one would run "
                         "code or needs a class we do not allow)") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a fairseq checkpoint (a dict with 'model'), got {type(raw).__name__}")
    return plain(raw)


def plain(obj):
    """Stand-ins, Namespaces and containers -> dicts, lists and scalars (tensors kept)."""
    if isinstance(obj, _DictConfig):
        content = obj.__dict__.get("_state", {}).get("_content")
        return {k: plain(v) for k, v in content.items()} if isinstance(content, dict) else content
    if isinstance(obj, _ListConfig):
        content = obj.__dict__.get("_state", {}).get("_content")
        return [plain(v) for v in content] if isinstance(content, list) else content
    if isinstance(obj, _Node):
        return plain(obj.__dict__.get("_state", {}).get("_val"))
    if isinstance(obj, argparse.Namespace):
        return {k: plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- settings


def conv_layers_spec(text: str, path: Path) -> list[tuple[int, int, int]]:
    """fairseq's ``conv_feature_layers`` string, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4", read
    without eval: only list/tuple literals of ints, ``+`` and ``*``."""

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(ast.dump(node))

    try:
        layers = value(ast.parse(str(text), mode="eval").body)
        layers = [tuple(int(v) for v in layer) for layer in layers]
        if not layers or any(len(layer) != 3 for layer in layers):
            raise ValueError("expected (dim, kernel, stride) triples")
    except (SyntaxError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: conv_feature_layers {text!r} is not a list of (dim, kernel, stride) ({e})") from None
    return layers


def model_settings(ckpt: dict) -> tuple[dict, str]:
    """The pre-training model settings (where the architecture is) merged over fairseq's defaults,
    and the model name ("wav2vec_ctc", "hubert_ctc", ...)."""
    cfg, args = ckpt.get("cfg"), ckpt.get("args")
    settings = dict(DEFAULTS)
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        model = cfg["model"]
        w2v = model.get("w2v_args") or {}
        settings.update((w2v.get("model") or {}) if isinstance(w2v, dict) else {})
        task = (w2v.get("task") or {}) if isinstance(w2v, dict) else {}
        settings["normalize"] = task.get("normalize", (cfg.get("task") or {}).get("normalize", settings["normalize"]))
        name = str(model.get("_name", ""))
    elif isinstance(args, dict):
        w2v = args.get("w2v_args") or {}
        settings.update(args if not isinstance(w2v, dict) or not w2v else w2v)
        settings["normalize"] = args.get("normalize", settings.get("normalize", False))
        name = str(args.get("arch", ""))
    else:
        name = ""
    return settings, name


def read_dictionary(path: Path) -> list[str]:
    """fairseq Dictionary order: the four specials, then each line's symbol ("SYMBOL COUNT [flags]")."""
    symbols = list(FAIRSEQ_SPECIALS)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the fairseq dictionary ({e.strerror})") from None
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{number}: not UTF-8 text") from None
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{number}: expected 'SYMBOL COUNT', got {line!r}")
        symbols.append(parts[0])
    if len(symbols) == len(FAIRSEQ_SPECIALS):
        raise ValueError(f"{path}: empty dictionary")
    return symbols


# ----------------------------------------------------------------------------- weights


_LAYER_RENAMES = [
    ("self_attn_layer_norm.", "layer_norm."), ("self_attn.", "attention."),
    ("fc1.", "feed_forward.intermediate_dense."), ("fc2.", "feed_forward.output_dense."),
    ("final_layer_norm.", "final_layer_norm."),
]


def hf_key(key: str) -> str | None:
    """fairseq encoder key (prefix stripped) -> HF key below the base model; None if unused."""
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.(0|2|2\.1)\.(weight|bias)", key)
    if m:
        part = "conv" if m.group(2) == "0" else "layer_norm"
        return f"feature_extractor.conv_layers.{m.group(1)}.{part}.{m.group(3)}"
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
    if m:
        rest = m.group(2)
        for old, new in _LAYER_RENAMES:
            if rest.startswith(old):
                return f"encoder.layers.{m.group(1)}.{new}{rest[len(old):]}"
        return None
    simple = {"post_extract_proj.weight": "feature_projection.projection.weight",
              "post_extract_proj.bias": "feature_projection.projection.bias",
              "layer_norm.weight": "feature_projection.layer_norm.weight",
              "layer_norm.bias": "feature_projection.layer_norm.bias",
              "encoder.layer_norm.weight": "encoder.layer_norm.weight",
              "encoder.layer_norm.bias": "encoder.layer_norm.bias",
              "encoder.pos_conv.0.bias": "encoder.pos_conv_embed.conv.bias",
              "mask_emb": "masked_spec_embed"}
    return simple.get(key)


def _checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """The checkpoint and the ``dict.ltr.txt`` beside it: both must exist before anything is read
    (without the dictionary the CTC head's outputs have no meaning)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fairseq checkpoint not found: {path}")
    dict_path = path.parent / "dict.ltr.txt"
    if not dict_path.is_file():
        raise FileNotFoundError(f"{path}: dict.ltr.txt missing beside the checkpoint (fairseq's target "
                                "dictionary: the vocabulary)")
    return path, dict_path


def _ctc_state_dict(ckpt: dict, path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's ``model`` weights, refused unless they are tensors with a CTC head
    (a pre-trained checkpoint has an encoder but cannot transcribe)."""
    state = ckpt.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no 'model' state dict of tensors (not a fairseq checkpoint)")
    if HEAD_PREFIX + "weight" not in state:
        raise ValueError(f"{path}: no CTC head ({HEAD_PREFIX}weight): a pre-trained, not a CTC fine-tuned, "
                         "checkpoint cannot transcribe")
    return state


def _encoder_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's weights with their prefix stripped, the positional conv's weight norm always
    under fairseq's classic ``weight_g`` / ``weight_v`` names."""
    enc = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    # newer fairseq/torch store the positional conv's weight norm as a parametrization
    for new, old in (("weight_g", "parametrizations.weight.original0"),
                     ("weight_v", "parametrizations.weight.original1")):
        if f"encoder.pos_conv.0.{old}" in enc:
            enc[f"encoder.pos_conv.0.{new}"] = enc.pop(f"encoder.pos_conv.0.{old}")
    return enc


def _encoder_geometry(enc: dict[str, torch.Tensor], settings: dict,
                      path: Path) -> tuple[int, int, torch.Tensor, int, list[tuple[int, int, int]]]:
    """(hidden size, FFN size, positional conv ``weight_v``, layer count, conv layers): the sizes
    the weights reveal, with the settings' conv stack checked against the projection it feeds."""
    try:
        hidden, conv_out = enc["post_extract_proj.weight"].shape
        ffn = enc["encoder.layers.0.fc1.weight"].shape[0]
        pos_v = enc["encoder.pos_conv.0.weight_v"]
    except KeyError as e:
        raise ValueError(f"{path}: missing weight {ENCODER_PREFIX}{e.args[0]} "
                         "(not a wav2vec2/HuBERT encoder)") from None
    n_layers = 1 + max(int(k.split(".")[2]) for k in enc if k.startswith("encoder.layers."))
    conv = conv_layers_spec(settings["conv_feature_layers"], path)
    if conv[-1][0] != conv_out:
        raise ValueError(f"{path}: conv_feature_layers ends in {conv[-1][0]} channels but post_extract_proj "
                         f"takes {conv_out}")
    return hidden, ffn, pos_v, n_layers, conv


def _fit_vocab(vocab: list[str], vocab_size: int, path: Path, dict_path: Path) -> list[str]:
    """The dictionary made as long as the CTC head: fewer outputs than tokens is an error, extra
    outputs (fairseq pads its dictionary) decode as ``<unused_N>``."""
    if vocab_size < len(vocab):
        raise ValueError(f"{path}: the CTC head has {vocab_size} outputs but {dict_path} gives {len(vocab)} tokens")
    if vocab_size > len(vocab):
        log.warning("%s: CTC head has %d outputs, %s %d tokens; the extra ids decode as <unused_N>",
                    path, vocab_size, dict_path, len(vocab))
        vocab += [f"<unused_{i}>" for i in range(vocab_size - len(vocab))]
    return vocab


def _hf_config(settings: dict, model_name: str, enc: dict[str, torch.Tensor], vocab_size: int,
               geometry: tuple) -> tuple[str, dict]:
    """(architecture, config keyword arguments) of the Hugging Face module that holds these
    weights: HuBERT or wav2vec2, sizes from the weights, the rest from the settings."""
    hidden, ffn, pos_v, n_layers, conv = geometry
    hubert = "hubert" in model_name.lower()
    arch = "HubertForCTC" if hubert else "Wav2Vec2ForCTC"
    params = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers, intermediate_size=ffn,
        num_attention_heads=int(settings["encoder_attention_heads"]),
        conv_dim=[c[0] for c in conv], conv_kernel=[c[1] for c in conv], conv_stride=[c[2] for c in conv],
        conv_bias="feature_extractor.conv_layers.0.0.bias" in enc,
        feat_extract_norm="layer" if settings["extractor_mode"] == "layer_norm" else "group",
        do_stable_layer_norm=bool(settings["layer_norm_first"]),
        num_conv_pos_embeddings=pos_v.shape[2], num_conv_pos_embedding_groups=hidden // pos_v.shape[1],
        hidden_act=str(settings["activation_fn"]), pad_token_id=0, architectures=[arch],
    )
    if hubert:
        params["feat_proj_layer_norm"] = True
    return arch, params


def _hf_state_dict(enc: dict[str, torch.Tensor], state: dict[str, torch.Tensor], base: str,
                   path: Path) -> dict[str, torch.Tensor]:
    """The encoder and head weights under Hugging Face names (``base``: the model's base prefix),
    with a warning naming the checkpoint's weights the CTC model does not use."""
    mapped, unused = {}, []
    for key, value in enc.items():
        new = hf_key(key)
        if new is None:
            if not key.startswith("encoder.pos_conv.0.weight_"):
                unused.append(ENCODER_PREFIX + key)
            continue
        mapped[f"{base}.{new}"] = value
    # fairseq keeps weight norm (dim 2) as g and v: fold them as torch itself computes the weight
    mapped[f"{base}.encoder.pos_conv_embed.conv.weight"] = torch._weight_norm(
        enc["encoder.pos_conv.0.weight_v"], enc["encoder.pos_conv.0.weight_g"], 2)
    mapped["lm_head.weight"] = state[HEAD_PREFIX + "weight"]
    mapped["lm_head.bias"] = state[HEAD_PREFIX + "bias"]
    unused += [k for k in state if not k.startswith(ENCODER_PREFIX) and not k.startswith(HEAD_PREFIX)]
    if unused:
        log.warning("%s: ignoring %d weights the CTC model does not use, e.g. %s", path, len(unused), unused[:3])
    return mapped


def _load_weights(model: torch.nn.Module, mapped: dict[str, torch.Tensor], path: Path) -> None:
    """load_state_dict with errors that name the checkpoint: weights that do not fit the
    architecture, or parameters it has no weight for (``masked_spec_embed`` aside: training only)."""
    try:
        result = model.load_state_dict(mapped, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"{path}: weights do not fit the architecture its settings describe "
                         f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    missing = [k for k in result.missing_keys if "masked_spec_embed" not in k]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks weights for {len(missing)} parameters, e.g. {missing[:5]}")


def load_fairseq_ctc(path: str | Path) -> SpeechModel:
    """A fairseq wav2vec2/HuBERT CTC checkpoint as a Hugging Face module with fairseq's vocabulary."""
    import transformers

    path, dict_path = _checkpoint_files(path)
    ckpt = read_checkpoint(path)
    state = _ctc_state_dict(ckpt, path)
    settings, model_name = model_settings(ckpt)
    vocab = read_dictionary(dict_path)

    enc = _encoder_weights(state)
    geometry = _encoder_geometry(enc, settings, path)
    vocab_size = state[HEAD_PREFIX + "weight"].shape[0]
    vocab = _fit_vocab(vocab, vocab_size, path, dict_path)
    arch, params = _hf_config(settings, model_name, enc, vocab_size, geometry)
    config_cls = transformers.HubertConfig if arch == "HubertForCTC" else transformers.Wav2Vec2Config
    model_cls = getattr(transformers, arch)
    model = remove_weight_norm(model_cls(config_cls(**params))).float().eval()
    _load_weights(model, _hf_state_dict(enc, state, model.base_model_prefix, path), path)
    return SpeechModel(
        model=model, arch=arch, vocab=vocab, blank_id=0, word_delimiter="|", sampling_rate=16000,
        do_normalize=bool(settings["normalize"]), return_attention_mask=settings["extractor_mode"] == "layer_norm",
        name=path.stem, source=str(path), family="fairseq")


class FairseqCTCFamily(SpeechFamily):
    """Loads only: the result is a Hugging Face module, run by the Hugging Face family."""

    name = "fairseq"
    description = "a fairseq wav2vec2/HuBERT CTC checkpoint (.pt) with dict.ltr.txt beside it"

    def claims_path(self, path: Path) -> bool:
        return path.suffix == ".pt" and path.is_file()

    def load(self, path: Path) -> SpeechModel:
        return load_fairseq_ctc(path)


FAMILY = FairseqCTCFamily()
