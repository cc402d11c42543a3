"""fairseq wav2vec2/HuBERT CTC checkpoints: written here in fairseq's layout from a random Hugging
Face model (keys renamed by hand after transformers' conversion script's MAPPING), read back
through our loader, and compared logit for logit with the Hugging Face model."""

from __future__ import annotations

import argparse
import os
import re

import pytest
import torch

from recipes.speech import family_of
from recipes.speech.fairseq_ctc import conv_layers_spec, load_fairseq_ctc
from recipes.speech.models import random_config, resolve_model

SYMBOLS = ["|"] + list("ETAONIHSRDLUMWCFGYPBVKXJQZ") + ["'"]  # 28 + 4 specials = 32 outputs


def to_fairseq_key(hf: str, layer_norm_cnn: bool) -> str:
    """HF key (base prefix removed) -> fairseq key, the inverse of the conversion script's MAPPING."""
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(\w+)", hf)
    if m:
        part = "0" if m.group(2) == "conv" else ("2.1" if layer_norm_cnn else "2")
        return f"w2v_encoder.w2v_model.feature_extractor.conv_layers.{m.group(1)}.{part}.{m.group(3)}"
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", hf)
    if m:
        rest = m.group(2)
        for ours, theirs in [("attention.", "self_attn."), ("layer_norm.", "self_attn_layer_norm."),
                             ("feed_forward.intermediate_dense.", "fc1."), ("feed_forward.output_dense.", "fc2."),
                             ("final_layer_norm.", "final_layer_norm.")]:
            if rest.startswith(ours):
                return f"w2v_encoder.w2v_model.encoder.layers.{m.group(1)}.{theirs}{rest[len(ours):]}"
    table = {
        "feature_projection.projection.weight": "post_extract_proj.weight",
        "feature_projection.projection.bias": "post_extract_proj.bias",
        "feature_projection.layer_norm.weight": "layer_norm.weight",
        "feature_projection.layer_norm.bias": "layer_norm.bias",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v",
        "encoder.pos_conv_embed.conv.bias": "encoder.pos_conv.0.bias",
        "encoder.layer_norm.weight": "encoder.layer_norm.weight",
        "encoder.layer_norm.bias": "encoder.layer_norm.bias",
        "masked_spec_embed": "mask_emb",
    }
    return "w2v_encoder.w2v_model." + table[hf]


def hf_model(arch: str, stable: bool):
    import transformers

    config = random_config("tiny", arch)
    if stable:  # wav2vec2-large / HuBERT-large style: layer-norm CNN with bias, pre-LN Transformer
        config.feat_extract_norm, config.do_stable_layer_norm, config.conv_bias = "layer", True, True
    torch.manual_seed(3)
    return getattr(transformers, config.architectures[0])(config).eval()


def fairseq_state(model, stable: bool) -> dict:
    base = model.base_model_prefix + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("lm_head."):
            state["w2v_encoder.proj." + key[len("lm_head."):]] = value.clone()
        else:
            state[to_fairseq_key(key[len(base):], stable)] = value.clone()
    return state


def settings(model, stable: bool) -> dict:
    c = model.config
    layers = " + ".join(f"[({d}, {k}, {s})]" for d, k, s in zip(c.conv_dim, c.conv_kernel, c.conv_stride))
    return {"conv_feature_layers": layers, "encoder_attention_heads": c.num_attention_heads,
            "extractor_mode": "layer_norm" if stable else "default", "layer_norm_first": stable,
            "conv_bias": stable, "activation_fn": "gelu", "encoder_embed_dim": c.hidden_size}


def write_checkpoint(tmp_path, model, arch, stable, style):
    s = settings(model, stable)
    name = "hubert_ctc" if arch == "hubert" else "wav2vec_ctc"
    if style == "args":  # fairseq before hydra: argparse.Namespace, pre-training args nested
        ckpt = {"args": argparse.Namespace(arch=name, normalize=stable, w2v_args=argparse.Namespace(**s))}
    else:
        cfg = {"model": {"_name": name, "w2v_args": {"model": {"_name": arch, **s}, "task": {"normalize": stable}}},
               "task": {"_name": "audio_finetuning", "normalize": stable}}
        if style == "dictconfig":  # hydra-era checkpoints keep the omegaconf object itself
            omegaconf = pytest.importorskip("omegaconf")
            cfg = omegaconf.OmegaConf.create(cfg)
        ckpt = {"args": None, "cfg": cfg}
    ckpt["model"] = fairseq_state(model, stable)
    path = tmp_path / "checkpoint_best.pt"
    torch.save(ckpt, path)
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{sym} {1000 - i}\n" for i, sym in enumerate(SYMBOLS)))
    return path


@pytest.mark.parametrize("arch,stable,style", [
    ("wav2vec2", False, "args"), ("wav2vec2", True, "dictconfig"), ("hubert", False, "cfg"), ("hubert", True, "args"),
])
def test_fairseq_checkpoint_gives_the_hf_models_logits(tmp_path, arch, stable, style):
    reference = hf_model(arch, stable)
    path = write_checkpoint(tmp_path, reference, arch, stable, style)
    sm = resolve_model(path)  # through the family registry, as the CLI does
    assert sm.family == "fairseq" and sm.arch == reference.config.architectures[0]
    assert sm.vocab[:5] == ["<s>", "<pad>", "</s>", "<unk>", "|"] and sm.vocab[-1] == "'" and sm.blank_id == 0
    assert sm.do_normalize is stable
    assert family_of(sm).name == "huggingface"  # runs as the HF module it was mapped onto
    x = torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(sm.model(x).logits, reference(x).logits)


class _System:
    def __reduce__(self):
        return (os.system, ("touch ran_by_unpickling",))


def test_checkpoint_with_a_disallowed_global_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reference = hf_model("wav2vec2", False)
    path = write_checkpoint(tmp_path, reference, "wav2vec2", False, "cfg")
    ckpt = torch.load(path, weights_only=False)
    ckpt["extra"] = _System()
    torch.save(ckpt, path)
    with pytest.raises(ValueError) as err:
        load_fairseq_ctc(path)
    message = str(err.value)
    assert str(path) in message and ("os.system" in message or "posix.system" in message), message
    assert not (tmp_path / "ran_by_unpickling").exists()


def test_bad_fairseq_inputs_are_named(tmp_path):
    reference = hf_model("wav2vec2", False)
    path = write_checkpoint(tmp_path, reference, "wav2vec2", False, "cfg")
    (tmp_path / "dict.ltr.txt").write_bytes(b"| 5\n\xff\xfe 3\n")
    with pytest.raises(ValueError, match=r"dict.ltr.txt:2: not UTF-8"):
        load_fairseq_ctc(path)
    (tmp_path / "dict.ltr.txt").unlink()
    with pytest.raises(FileNotFoundError, match="dict.ltr.txt missing"):
        load_fairseq_ctc(path)
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{sym} 1\n" for sym in SYMBOLS))
    ckpt = torch.load(path, weights_only=False)
    del ckpt["model"]["w2v_encoder.proj.weight"]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="no CTC head"):
        load_fairseq_ctc(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_fairseq_ctc(path)
    path.write_bytes(bytes(range(256)) * 4)  # not even a zip: an old-style pickle of garbage
    with pytest.raises(ValueError, match=r"checkpoint_best.pt: not a readable PyTorch checkpoint"):
        load_fairseq_ctc(path)


def test_conv_layers_spec_is_parsed_not_evaluated(tmp_path):
    assert conv_layers_spec("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2", tmp_path) == \
        [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    with pytest.raises(ValueError, match="conv_feature_layers"):
        conv_layers_spec("__import__('os').system('true')", tmp_path)


def test_cli_evaluates_a_fairseq_checkpoint_like_its_hf_twin(tmp_path, capsys):
    import json

    import numpy as np
    import soundfile as sf

    from recipes.cli import main
    from recipes.speech.models import random_model, save_model

    hf = random_model("tiny", seed=3)
    save_model(hf, tmp_path / "hf")
    ckpt = write_checkpoint(tmp_path, hf.model, "wav2vec2", False, "cfg")
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{sym} 1\n" for sym in hf.vocab[4:]))  # HF's letter order
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        sf.write(tmp_path / f"u{i}.flac", (0.1 * rng.standard_normal(4000 + 500 * i)).astype("float32"), 16000)
        rows.append(f"u{i}.flac\tA B")
    (tmp_path / "set.tsv").write_text("\n".join(rows) + "\n")
    results = []
    for model in (tmp_path / "hf", ckpt):
        assert main(["eval", "--model", str(model), "--data", str(tmp_path / "set.tsv"), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    # same greedy paths; fairseq's vocabulary names id 1 "<pad>" where HF says "<s>"
    assert [h.replace("<s>", "<pad>") for h in results[0]["hyps"]] == results[1]["hyps"]
    assert results[0]["wer"] == results[1]["wer"] and results[0]["ids"] == results[1]["ids"]
    bad = tmp_path / "evil" / "checkpoint.pt"
    bad.parent.mkdir()
    (bad.parent / "dict.ltr.txt").write_text("| 1\n")
    torch.save({"model": {}, "x": _System()}, bad)
    assert main(["eval", "--model", str(bad), "--data", str(tmp_path / "set.tsv")]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and "system" in err and len(err.strip().splitlines()) == 1
