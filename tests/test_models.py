"""Model adapters: weight-norm folding, layer inventories, real shapes, load/save round trips."""

import json
from collections import Counter

import pytest
import torch
from torch.nn.utils import parametrize

from recipes.speech.models import (
    CHAR_VOCAB,
    layer_inventory,
    load_ctc_model,
    random_model,
    remove_weight_norm,
    resolve_model,
    save_model,
)

ARCHS = ["wav2vec2", "hubert", "wavlm", "data2vec-audio"]
WAV = torch.randn(2, 6000, generator=torch.Generator().manual_seed(0))


def logits(sm, x=WAV):
    with torch.no_grad():
        return sm.model(x).logits


def kinds(inv):
    return Counter(layer.kind for layer in inv)


# ----------------------------------------------------------------------------- weight norm


@pytest.mark.parametrize("arch", ["wav2vec2", "hubert", "wavlm"])
def test_remove_weight_norm_keeps_outputs(arch):
    sm = random_model("tiny", arch)
    conv = sm.model.base_model.encoder.pos_conv_embed.conv
    assert parametrize.is_parametrized(conv, "weight")
    before = logits(sm)
    remove_weight_norm(sm.model)
    assert not parametrize.is_parametrized(conv, "weight")
    assert isinstance(conv.weight, torch.nn.Parameter)
    torch.testing.assert_close(logits(sm), before, rtol=0, atol=1e-6)
    assert remove_weight_norm(sm.model) is sm.model  # idempotent


def test_remove_old_style_weight_norm_hook():
    conv = torch.nn.Conv1d(8, 8, 5, padding=2, groups=2)
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(conv, name="weight", dim=2)
    x = torch.randn(1, 8, 20)
    before = conv(x)
    model = torch.nn.Sequential(conv)
    remove_weight_norm(model)
    assert not hasattr(conv, "weight_g") and isinstance(conv.weight, torch.nn.Parameter)
    torch.testing.assert_close(conv(x), before)


@pytest.mark.parametrize("form", ["parametrization", "hook"])
def test_folded_weight_norm_is_the_float64_formula_for_any_thread_count(form):
    """The folded weight is g * v / |v| (norm over every axis but dim 2) in float64, rounded once:
    bit for bit the same under 1 and 2 threads, so a run's model fingerprint (and --resume) does
    not depend on OMP_NUM_THREADS."""
    from recipes.search.engine import model_fingerprint

    def folded(threads):
        torch.manual_seed(0)
        conv = torch.nn.Conv1d(16, 16, 9, padding=4, groups=4)
        if form == "hook":
            with pytest.warns(FutureWarning):
                torch.nn.utils.weight_norm(conv, name="weight", dim=2)
            g, v = conv.weight_g.detach().clone(), conv.weight_v.detach().clone()
        else:
            torch.nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
            g, v = (conv.parametrizations.weight.original0.detach().clone(),
                    conv.parametrizations.weight.original1.detach().clone())
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            model = remove_weight_norm(torch.nn.Sequential(conv))
        finally:
            torch.set_num_threads(old)
        return model, g, v

    model, g, v = folded(1)
    v64 = v.double()
    want = (g.double() * v64 / v64.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()).float()
    assert torch.equal(model[0].weight.detach(), want)
    assert model_fingerprint(folded(2)[0]) == model_fingerprint(model)


# ----------------------------------------------------------------------------- inventories


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_inventory_all_archs(arch):
    sm = random_model("tiny", arch)
    inv = layer_inventory(sm)
    layers = sm.model.config.num_hidden_layers
    per_layer = 7 if arch == "wavlm" else 6  # WavLM adds gru_rel_pos_linear per layer
    pos_convs = 5 if arch == "data2vec-audio" else 1
    assert kinds(inv) == {"cnn": 7, "pos_conv": pos_convs, "transformer": per_layer * layers + 1,
                          "head": 1}
    # the independent oracle: every Conv1d/Linear of the module tree appears exactly once
    expected = [n for n, m in sm.model.named_modules()
                if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))]
    assert [layer.path for layer in inv] == expected
    for kind in ("cnn", "pos_conv", "transformer", "head"):
        assert [x.index for x in inv if x.kind == kind] == list(range(kinds(inv)[kind]))
    assert all(".feature_extractor.conv_layers." in x.path for x in inv if x.kind == "cnn")
    assert all(x.module_type == "Conv1d" for x in inv if x.kind in ("cnn", "pos_conv"))
    assert [x.path for x in inv if x.kind == "head"] == ["lm_head"]
    assert any(x.path.endswith("feature_projection.projection") and x.kind == "transformer"
               for x in inv)


def _check_real_shape(sm, hidden, layers, heads, ffn, norm, stable, params_m):
    cfg = sm.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.intermediate_size) == (hidden, layers, heads, ffn)
    assert list(cfg.conv_dim) == [512] * 7 and cfg.feat_extract_norm == norm
    assert cfg.do_stable_layer_norm is stable
    assert kinds(layer_inventory(sm)) == {"cnn": 7, "pos_conv": 1, "transformer": 6 * layers + 1,
                                          "head": 1}
    enc = sm.model.base_model.encoder
    assert enc.layers[0].feed_forward.intermediate_dense.weight.shape == (ffn, hidden)
    assert enc.pos_conv_embed.conv.kernel_size == (128,) and enc.pos_conv_embed.conv.groups == 16
    # published sizes: wav2vec2-base-960h 94.4M, wav2vec2-large-960h-lv60-self 315.5M
    assert round(sum(p.numel() for p in sm.model.parameters()) / 1e6, 1) == params_m


@pytest.mark.parametrize("arch", ["wav2vec2", "hubert"])
def test_base_shapes(arch):
    sm = random_model("base", arch)  # < 1 s on CPU
    _check_real_shape(sm, 768, 12, 12, 3072, "group", False, 94.4)
    assert not sm.return_attention_mask
    out = logits(sm, WAV[:1, :4000])
    assert out.shape == (1, 12, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["wav2vec2", "hubert"])
def test_large_shapes_on_meta(arch):
    sm = random_model("large", arch, device="meta")  # no memory for 315M weights
    _check_real_shape(sm, 1024, 24, 16, 4096, "layer", True, 315.5)
    assert sm.return_attention_mask


def test_random_model_vocab_and_seed():
    sm = random_model("tiny")
    assert sm.vocab == CHAR_VOCAB and len(sm.vocab) == 32
    assert sm.vocab[sm.blank_id] == "<pad>" and sm.vocab[4] == sm.word_delimiter == "|"
    assert sm.vocab[5:31] == [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    torch.testing.assert_close(logits(random_model("tiny")), logits(sm))
    assert not torch.allclose(logits(random_model("tiny", seed=1)), logits(sm))


# ----------------------------------------------------------------------------- load / save


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch):
    sm = random_model("tiny", arch, seed=3)
    save_model(sm, tmp_path / "m")
    loaded = load_ctc_model(tmp_path / "m")
    assert loaded.arch == sm.arch and loaded.vocab == sm.vocab and loaded.blank_id == 0
    assert loaded.word_delimiter == "|" and loaded.sampling_rate == 16000
    assert (loaded.do_normalize, loaded.return_attention_mask) == (sm.do_normalize,
                                                                   sm.return_attention_mask)
    assert not loaded.model.training and loaded.name == "m"
    torch.testing.assert_close(logits(loaded), logits(sm))


def test_round_trip_after_weight_norm_folded(tmp_path):
    sm = random_model("tiny", "wav2vec2")
    remove_weight_norm(sm.model)
    save_model(sm, tmp_path / "m")
    loaded = load_ctc_model(tmp_path / "m")
    assert not parametrize.is_parametrized(loaded.model.wav2vec2.encoder.pos_conv_embed.conv)
    torch.testing.assert_close(logits(loaded), logits(sm))


def test_preprocessor_config_read(tmp_path):
    save_model(random_model("tiny"), tmp_path)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    pre.update(do_normalize=False, return_attention_mask=True)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    sm = load_ctc_model(tmp_path)
    assert sm.do_normalize is False and sm.return_attention_mask is True


@pytest.fixture
def saved(tmp_path):
    save_model(random_model("tiny"), tmp_path / "m")
    return tmp_path / "m"


def test_non_ctc_architecture_refused(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["architectures"] = ["Wav2Vec2ForPreTraining"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Wav2Vec2ForPreTraining") as err:
        load_ctc_model(saved)
    for name in ("Wav2Vec2ForCTC", "HubertForCTC", "WavLMForCTC", "Data2VecAudioForCTC"):
        assert name in str(err.value)


def test_missing_vocab_refused(saved):
    (saved / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab"):
        load_ctc_model(saved)


def test_pytorch_model_bin_loads_tensors_only(saved, tmp_path):
    from safetensors.torch import load_file

    reference = load_ctc_model(saved)
    torch.save(load_file(str(saved / "model.safetensors")), saved / "pytorch_model.bin")
    (saved / "model.safetensors").unlink()
    torch.testing.assert_close(logits(load_ctc_model(saved)), logits(reference))
    # a .bin that would run code when unpickled is refused (weights_only), nothing runs
    marker = tmp_path / "ran"
    torch.save({"x": _Evil(str(marker))}, saved / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot load the weights"):
        load_ctc_model(saved)
    assert not marker.exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_truncated_safetensors_is_a_clear_error(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_ctc_model(saved)


def test_processor_config_with_nested_feature_extractor(saved):
    """transformers 5 writes the feature extractor inside processor_config.json only."""
    pre = json.loads((saved / "preprocessor_config.json").read_text())
    (saved / "preprocessor_config.json").unlink()
    (saved / "processor_config.json").write_text(json.dumps({"feature_extractor": {**pre, "do_normalize": False}}))
    assert load_ctc_model(saved).do_normalize is False


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json"])
def test_missing_files_named(saved, name):
    (saved / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        load_ctc_model(saved)


def test_missing_dir_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_ctc_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="unknown model 'nope'"):
        resolve_model("nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))  # a directory, but not a model


def test_resolve_model_directory(saved):
    assert resolve_model(str(saved)).arch == "Wav2Vec2ForCTC"


def test_save_pretrained_directory_transcribes_like_a_plain_transformers_script(tmp_path):
    """A directory written by the installed transformers' own save_pretrained (model + processor,
    whatever layout this version writes) gives the transcripts a plain script gets: greedy CTC,
    one utterance at a time, through Wav2Vec2Processor."""
    import soundfile as sf
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    from recipes.data.readers import make_batches, open_dataset
    from recipes.demo import DEMO_MODEL_DIR, demo_data
    from recipes.evaluation.asr import transcribe

    model = Wav2Vec2ForCTC.from_pretrained(DEMO_MODEL_DIR).eval()
    processor = Wav2Vec2Processor.from_pretrained(DEMO_MODEL_DIR)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tsv = demo_data("test")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[:6]]
    plain = []
    for rel, _ in rows:
        wav, sr = sf.read(tsv.parent / rel, dtype="float32")
        inputs = processor(wav, sampling_rate=sr, return_tensors="pt")
        with torch.no_grad():
            ids = model(inputs.input_values).logits.argmax(-1)[0]
        plain.append(processor.decode(ids))
    sm = load_ctc_model(out)
    subset = list(open_dataset(tsv))[:6]
    assert [str(u.path) for u in subset] == [str(tsv.parent / rel) for rel, _ in rows]
    batches = make_batches(subset, sm)
    ours = dict(zip([i for b in batches for i in b.ids], transcribe(sm, batches, progress=False)))
    assert [ours[u.id] for u in subset] == plain and any(plain)
