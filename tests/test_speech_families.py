"""The speech-model contract: a new family is one plugin class, and the recipes' machinery (loading,
layer kinds, frame counts, the prefix cache, quantization, ONNX export) works on it unchanged.
Also the torchaudio family, where torchaudio imports (``./sq.sh`` installs torchaudio 2.11.0's
Python parts beside the CPU torch; see the workaround there): in-memory models, bundles, and local
checkpoint directories through the whole CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from oracles import assert_near_transcripts, assert_prefix_cache_exact
from torch import nn

import sq_plugin  # noqa: F401  (registers the "stablequant" algorithm)
from recipes.data.readers import make_batches, open_dataset
from recipes.evaluation.asr import forward_logits, transcribe
from recipes.search.qconfig import quantize_copy, stablequant_config
from recipes.search.reuse import PrefixRunner
from recipes.speech import (
    BlockLayout,
    SpeechFamily,
    SpeechModel,
    family_of,
    hookimpl,
    layer_inventory,
    output_lengths,
    register_family_plugin,
    remove_weight_norm,
    unregister_family_plugin,
    wrap_speech_model,
)
from recipes.speech.models import CHAR_VOCAB, random_model, resolve_model

# ----------------------------------------------------------------------------- a toy family


class _Frontend(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv1d(1, 8, 5, stride=3), nn.Conv1d(8, 8, 3, stride=2)])

    def forward(self, x):
        x = x.unsqueeze(1)
        for block in self.blocks:
            x = torch.nn.functional.gelu(block(x))
        return x.transpose(1, 2)


class _Layer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _Body(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.proj = nn.Linear(8, dim)
        self.pos = nn.Conv1d(dim, dim, 3, padding=1, groups=4)
        self.blocks = nn.ModuleList([_Layer(dim) for _ in range(2)])

    def forward(self, x):
        x = self.proj(x)
        x = x + self.pos(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return x


class ToyCTC(nn.Module):
    """Names unlike any real family's: frontend.blocks, body.blocks, out."""

    def __init__(self):
        super().__init__()
        self.frontend, self.body, self.out = _Frontend(), _Body(), nn.Linear(16, 6)

    def forward(self, x):
        return self.out(self.body(self.frontend(x)))


class ToyFamily(SpeechFamily):
    name = "toy"
    description = "a .toy state dict"

    def claims_path(self, path):
        return path.suffix == ".toy"

    def load(self, path):
        model = ToyCTC()
        model.load_state_dict(torch.load(path, weights_only=True))
        return SpeechModel(model.eval(), "ToyCTC", ["_", "|", "A", "B", "C", "D"], blank_id=0, do_normalize=False,
                           source=str(path))

    def claims_module(self, model):
        return isinstance(model, ToyCTC)

    def logits(self, model, input_values, attention_mask=None):
        return model(input_values)

    def blocks(self, model):
        return BlockLayout(front_end="frontend", convs="frontend.blocks", encoder="body", layers="body.blocks",
                           head="out", pos_conv="body.pos")


class ToyPlugin:
    @hookimpl
    def sq_speech_model_families(self):
        return [ToyFamily()]


@pytest.fixture
def toy(tmp_path):
    plugin = ToyPlugin()
    register_family_plugin(plugin, name="toy-test")
    torch.manual_seed(0)
    path = tmp_path / "model.toy"
    torch.save(ToyCTC().state_dict(), path)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        x = (0.3 * rng.standard_normal(300 + 7 * (i % 3))).astype("float32")
        sf.write(tmp_path / f"u{i}.wav", x, 16000)
        rows.append(f"u{i}.wav\tA B")
    (tmp_path / "set.tsv").write_text("\n".join(rows) + "\n")
    try:
        yield resolve_model(path), open_dataset(tmp_path / "set.tsv")
    finally:
        unregister_family_plugin(plugin)


def test_a_plugin_family_is_loaded_and_described(toy):
    sm, _ = toy
    assert sm.family == "toy" and family_of(sm).name == "toy"
    kinds = [(i.path, i.kind) for i in layer_inventory(sm)]
    assert kinds == [("frontend.blocks.0", "cnn"), ("frontend.blocks.1", "cnn"), ("body.proj", "transformer"),
                     ("body.pos", "pos_conv"), ("body.blocks.0.up", "transformer"),
                     ("body.blocks.0.down", "transformer"),
                     ("body.blocks.1.up", "transformer"), ("body.blocks.1.down", "transformer"), ("out", "head")]
    lengths = torch.tensor([11, 12, 300, 307, 1001])
    frames = [sm.model(torch.zeros(1, int(n))).shape[1] for n in lengths]  # oracle: the forward itself
    assert output_lengths(sm, lengths).tolist() == frames


def test_prefix_cache_quantization_and_export_work_on_a_plugin_family(toy, tmp_path):
    from modelopt.torch.quantization.nn import TensorQuantizer

    from recipes.export.onnx import export_onnx
    from recipes.export.onnx_runner import make_session

    sm, utts = toy
    batches = make_batches(utts, sm, batch_seconds=1)
    assert len(transcribe(sm, batches, progress=False)) == len(utts)
    qsm = quantize_copy(sm, stablequant_config(8, 8, num_bins=128), batches)
    model = qsm.model
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    acts = [n for n, q in quantizers.items() if q.is_enabled and n.endswith("input_quantizer")]
    assert len(acts) == 9
    assert_prefix_cache_exact(model, quantizers, acts, batches)
    qsm = quantize_copy(sm, stablequant_config(8, 8, num_bins=128), batches)
    summary = export_onnx(qsm, tmp_path / "toy.onnx")
    assert summary["quantizers"] == 18
    x = batches[0].input_values
    got = make_session(tmp_path / "toy.onnx").run(["logits"], {"input_values": x.numpy()})[0]
    with torch.inference_mode():
        want = qsm.model(x).numpy()
    np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()))


def test_unknown_module_and_path_are_named(tmp_path):
    with pytest.raises(ValueError, match="no speech model family handles a .*Linear"):
        family_of(nn.Linear(2, 2))
    (tmp_path / "weights.xyz").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"weights.xyz: not a model any family reads .*fairseq"):
        resolve_model(tmp_path / "weights.xyz")


# ----------------------------------------------------------------------------- torchaudio


def _torchaudio():
    try:
        import torchaudio
    except Exception as e:  # ImportError, or an OSError from a torch/torchaudio build mismatch
        why = (f"torchaudio does not import with this torch ({type(e).__name__}: {str(e)[:120]}); "
               "./sq.sh installs torchaudio 2.11.0 without its compiled extension (see sq.sh)")
        if os.environ.get("SQ_EXPECT_TORCHAUDIO") == "1":  # ./sq.sh test: these tests must run
            pytest.fail(why)
        pytest.skip(why)
    return torchaudio


@pytest.fixture
def ta_and_hf():
    """A torchaudio model converted from a random HF wav2vec2 (torchaudio's own importer), so the
    HF model's logits are the oracle."""
    _torchaudio()
    from torchaudio.models.wav2vec2.utils import import_huggingface_model

    hf = random_model("tiny", seed=5)
    ta = import_huggingface_model(hf.model).eval()
    return wrap_speech_model(ta, CHAR_VOCAB), hf


def test_torchaudio_model_runs_as_its_hf_twin(ta_and_hf):
    ta, hf = ta_and_hf
    assert family_of(ta).name == "torchaudio" and ta.vocab == CHAR_VOCAB and ta.blank_id == 0
    x = torch.randn(2, 5000, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(family_of(ta).logits(ta.model, x), hf.model(x).logits, atol=1e-4, rtol=1e-4)
    lengths = torch.tensor([400, 4000, 5001])
    assert torch.equal(output_lengths(ta, lengths), output_lengths(hf, lengths))
    kinds = [i.kind for i in layer_inventory(ta)]
    assert kinds == [i.kind for i in layer_inventory(hf)]


def test_torchaudio_prefix_cache_and_export(ta_and_hf, tmp_path):
    from modelopt.torch.quantization.nn import TensorQuantizer

    from recipes.export.onnx import export_onnx

    ta, _ = ta_and_hf
    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        sf.write(tmp_path / f"u{i}.wav", (0.1 * rng.standard_normal(4000 + 400 * (i % 2))).astype("float32"), 16000)
        rows.append(f"u{i}.wav\tA")
    (tmp_path / "set.tsv").write_text("\n".join(rows) + "\n")
    batches = make_batches(open_dataset(tmp_path / "set.tsv"), ta, batch_seconds=1)
    qsm = quantize_copy(ta, stablequant_config(8, 8, num_bins=128), batches)
    quantizers = {n: m for n, m in qsm.model.named_modules() if isinstance(m, TensorQuantizer)}
    acts = [n for n, q in quantizers.items() if q.is_enabled and n.endswith("input_quantizer")]
    runner = PrefixRunner(qsm.model, forward_logits, batches)
    with torch.inference_mode():
        for name in acts:
            for n, q in quantizers.items():
                q.enable() if n == name else q.disable()
            for a, b in zip([forward_logits(qsm.model, b) for b in batches], runner.run(name.rsplit(".", 1)[0])):
                assert torch.equal(a, b), name
    qsm = quantize_copy(ta, stablequant_config(8, 8, num_bins=128), batches)
    summary = export_onnx(qsm, tmp_path / "ta.onnx")
    assert summary["quantizers"] > 0


def test_torchaudio_bundle_name_errors_are_one_line():
    _torchaudio()
    with pytest.raises(ValueError, match="not a torchaudio ASR bundle"):
        resolve_model("torchaudio:NO_SUCH_BUNDLE")


def _cli_json(capsys, args):
    from recipes.cli import main

    capsys.readouterr()
    assert main(args + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_torchaudio_checkpoint_dir_runs_the_cli_like_the_hf_demo(tmp_path, capsys):
    """The demo model converted by torchaudio's own importer, saved as a local checkpoint: it
    transcribes as the Hugging Face demo model does, quantizes, exports, and its ONNX scores as the
    quantized PyTorch model does."""
    _torchaudio()
    from recipes.cli import main
    from recipes.demo import demo_data
    from recipes.speech import families

    hf, model_dir = demo_as_torchaudio_dir(tmp_path / "ta_demo")
    assert sorted(p.name for p in model_dir.iterdir()) == ["labels.json", "model.safetensors",
                                                          "torchaudio_config.json"]
    assert [f.name for f in families() if f.claims_path(model_dir)] == ["torchaudio"]
    loaded = resolve_model(model_dir)
    assert (loaded.family, loaded.vocab, loaded.blank_id, loaded.word_delimiter, loaded.do_normalize) == \
        ("torchaudio", hf.vocab, hf.blank_id, hf.word_delimiter, hf.do_normalize)

    test, calib, dev = (str(demo_data(split)) for split in ("test", "calib", "dev"))
    want = _cli_json(capsys, ["eval", "--model", "demo", "--data", test, "--limit", "40"])
    got = _cli_json(capsys, ["eval", "--model", str(model_dir), "--data", test, "--limit", "40"])
    assert got["arch"] == "torchaudio.Wav2Vec2Model" and got["n"] == want["n"] == 40
    assert (got["ids"], got["hyps"], got["wer"]) == (want["ids"], want["hyps"], want["wer"])

    out, onnx_path, few = tmp_path / "q", tmp_path / "ta.onnx", ["--limit", "8"]
    assert main(["quantize", "--model", str(model_dir), "--calib", calib, "--dev", dev, *few,
                 "--grid", "0,0.1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["recipe"] == "default" and report["meta"]["model"] == str(model_dir)
    config = str(out / "modelopt_config.json")
    quantized = _cli_json(capsys, ["eval", "--model", str(model_dir), "--config", config, "--calib", calib,
                                   "--data", test, *few])
    assert main(["export", "--model", str(model_dir), "--config", config, "--calib", calib, *few,
                 "--onnx", str(onnx_path)]) == 0
    exported = _cli_json(capsys, ["eval", "--onnx", str(onnx_path), "--data", test, *few])
    assert exported["ids"] == quantized["ids"] and exported["precision"] == "int8-qdq"
    assert_near_transcripts(exported["hyps"], quantized["hyps"])  # the HF demo shows the same int8 tie
    saved = _cli_json(capsys, ["eval", "--model", str(model_dir), "--quantized", str(out / "model.pth"),
                               "--data", test, *few])  # OUT/model.pth restores onto the torchaudio model
    assert saved["hyps"] == quantized["hyps"]


@pytest.fixture
def ta_dir(ta_and_hf, tmp_path):
    from recipes.speech.torchaudio_ctc import save_torchaudio_model

    return save_torchaudio_model(ta_and_hf[0], tmp_path / "ta")


def _one_line_error(capsys, model_dir, *expected):
    from recipes.cli import main

    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--data", "no-such-data.tsv"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def test_torchaudio_checkpoint_dir_loads_folded_or_not(ta_and_hf, ta_dir, tmp_path):
    from safetensors.torch import save_file

    ta, hf = ta_and_hf
    x = torch.randn(1, 4000, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = hf.model(x).logits
        torch.testing.assert_close(resolve_model(ta_dir).model(x)[0], want, atol=1e-4, rtol=1e-4)
        folded = remove_weight_norm(import_hf_twin(hf))
        save_file({k: v.contiguous() for k, v in folded.state_dict().items()}, str(ta_dir / "model.safetensors"))
        assert any(k.endswith("pos_conv_embed.conv.weight") for k in folded.state_dict())
        torch.testing.assert_close(resolve_model(ta_dir).model(x)[0], want, atol=1e-4, rtol=1e-4)


def import_hf_twin(hf):
    from torchaudio.models.wav2vec2.utils import import_huggingface_model

    return import_huggingface_model(hf.model).eval()


def demo_as_torchaudio_dir(directory):
    """(HF demo, its torchaudio twin saved as a local checkpoint directory)."""
    from recipes.speech.torchaudio_ctc import save_torchaudio_model

    hf = resolve_model("demo")
    ta = wrap_speech_model(import_hf_twin(hf), hf.vocab)
    ta.do_normalize = hf.do_normalize  # the labels alone do not say; the HF feature extractor does
    return hf, save_torchaudio_model(ta, directory)


def test_torchaudio_checkpoint_dir_errors_name_the_file(ta_and_hf, ta_dir, capsys):
    from recipes.speech.torchaudio_ctc import save_torchaudio_model

    config_path, labels_path, weights = (ta_dir / n for n in ("torchaudio_config.json", "labels.json",
                                                               "model.safetensors"))
    config, labels, blob = json.loads(config_path.read_text()), labels_path.read_text(), weights.read_bytes()

    def restore():
        config_path.write_text(json.dumps(config)), labels_path.write_text(labels), weights.write_bytes(blob)

    config_path.unlink()
    _one_line_error(capsys, ta_dir, "torchaudio_config.json: missing")
    for text, message in (("{not json", "invalid JSON"),
                          (json.dumps({"conformer": {}, "do_normalize": False}), "expected one of 'wav2vec2_model'"),
                          (json.dumps({**config, "do_normalize": "yes"}), '"do_normalize" must be true or false'),
                          (json.dumps({**config, "wav2vec2_model": {**config["wav2vec2_model"], "bogus": 1}}),
                           "wav2vec2_model(...) rejects these arguments"),
                          (json.dumps({**config, "wav2vec2_model": {**config["wav2vec2_model"], "aux_num_out": 7}}),
                           "labels.json: 32 labels, but torchaudio_config.json gives the CTC head aux_num_out=7"),
                          (json.dumps({**config, "blank_id": 99}), '"blank_id" must be a label id')):
        config_path.write_text(text)
        _one_line_error(capsys, ta_dir, "torchaudio_config.json" if "labels.json" not in message else "labels.json",
                        message)
    restore()
    labels_path.unlink()
    _one_line_error(capsys, ta_dir, "labels.json: missing")
    labels_path.write_text('{"0": "-"}')
    _one_line_error(capsys, ta_dir, "labels.json: expected a non-empty JSON list")
    restore()
    weights.unlink()
    _one_line_error(capsys, ta_dir, "model.safetensors: missing")
    weights.write_bytes(b"not safetensors at all")
    _one_line_error(capsys, ta_dir, "model.safetensors: not a readable safetensors file")
    wider = config["wav2vec2_model"]["encoder_ff_interm_features"] + 8
    bigger = dict(config, wav2vec2_model={**config["wav2vec2_model"], "encoder_ff_interm_features": wider})
    restore()
    config_path.write_text(json.dumps(bigger))
    _one_line_error(capsys, ta_dir, "model.safetensors: ", "has shape", "torchaudio_config.json describes")
    fewer = dict(config, wav2vec2_model={**config["wav2vec2_model"],
                                         "encoder_num_layers": config["wav2vec2_model"]["encoder_num_layers"] - 1})
    config_path.write_text(json.dumps(fewer))
    _one_line_error(capsys, ta_dir, "model.safetensors: does not match", "unexpected keys")
    restore()
    assert resolve_model(ta_dir).family == "torchaudio"
    (ta_dir / "config.json").write_text("{}")  # a Hugging Face directory: not ours to claim or write
    with pytest.raises(ValueError, match="holds config.json"):
        save_torchaudio_model(ta_and_hf[0], ta_dir)


@pytest.mark.parametrize("bundle_name, normalizes", [("WAV2VEC2_ASR_BASE_10M", False),
                                                     ("WAV2VEC2_ASR_LARGE_LV60K_10M", True)])
def test_torchaudio_bundle_labels_blank_delimiter_and_normalisation(monkeypatch, bundle_name, normalizes):
    """``torchaudio:BUNDLE`` without the download: the bundle's own builder parameters (shrunk to one
    small layer) and get_model's wrapper; the labels, blank "-", delimiter "|" and the wrapper's
    waveform normalisation reach the SpeechModel, and the bare model is what runs."""
    torchaudio = _torchaudio()
    from torchaudio.pipelines._wav2vec2.utils import _extend_model

    from recipes.evaluation.asr import greedy_ctc_decode
    from recipes.speech.text import text_codec

    bundle = getattr(torchaudio.pipelines, bundle_name)
    assert bundle._normalize_waveform is normalizes
    small = {**bundle._params, "extractor_conv_layer_config": [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
             "encoder_embed_dim": 32, "encoder_num_layers": 1, "encoder_num_heads": 2,
             "encoder_ff_interm_features": 64}

    def get_model(*, dl_kwargs=None):
        model = torchaudio.models.wav2vec2_model(**small).eval()
        return _extend_model(model, normalize_waveform=True).eval() if normalizes else model

    monkeypatch.setattr(bundle, "get_model", get_model)
    sm = resolve_model(f"torchaudio:{bundle_name}")
    labels = list(bundle.get_labels())
    assert (sm.family, sm.name, sm.vocab, sm.blank_id, sm.word_delimiter, sm.do_normalize, sm.sampling_rate) == \
        ("torchaudio", bundle_name, labels, 0, "|", normalizes, 16000)
    assert labels[:2] == ["-", "|"] and type(sm.model).__name__ == "Wav2Vec2Model"
    ids = [labels.index(c) for c in "WW-E-L-L|-|IT'S"]
    assert greedy_ctc_decode(torch.tensor(ids), sm.vocab, sm.blank_id, sm.word_delimiter) == ["WELL IT'S"]
    codec = text_codec(sm)  # targets never contain the blank; a hyphen the labels lack is a space
    assert codec.canonical("Well-known, isn't it") == "WELL KNOWN ISN'T IT"
    assert 0 not in codec.encode("WELL-KNOWN") and labels.index("|") in codec.encode("WELL KNOWN")
    assert family_of(sm).logits(sm.model, torch.randn(1, 4000)).shape[-1] == len(labels)


def _layer_free(report: dict, keys: tuple[str, ...]) -> dict:
    """The figures of a report that do not name a module (torchaudio and HF name them differently)."""
    return {k: report[k] for k in keys}


def test_torchaudio_twin_of_the_demo_searches_as_the_demo_does(tmp_path):
    """The demo converted by torchaudio's importer computes the Hugging Face model's logits, so every
    search on it (paper recipe, --budget-bits, compare) must reach the demo's figures and decisions:
    the HF demo is the oracle, layer by layer in model order."""
    _torchaudio()
    from recipes.cli import main
    from recipes.demo import demo_data
    from recipes.evaluation import systems

    _, model_dir = demo_as_torchaudio_dir(tmp_path / "ta_demo")
    calib, dev, test = (str(demo_data(split)) for split in ("calib", "dev", "test"))
    few = ["--limit", "4", "--grid", "0,0.1,0.2", "--num-bins", "256"]
    reports = {}
    for name, model in (("hf", "demo"), ("ta", str(model_dir))):
        common = ["--model", model, "--calib", calib, "--dev", dev, *few]
        for run, extra in (("paper", ["--recipe", "paper"]), ("mixed", ["--budget-bits", "6"])):
            out = tmp_path / f"{name}_{run}"
            assert main(["quantize", *common, *extra, "--out", str(out)]) == 0
            reports[name, run] = json.loads((out / "report.json").read_text())
        assert main(["compare", *common, "--test", test, "--bits", "8", "--out", str(tmp_path / f"{name}_cmp")]) == 0
        reports[name, "compare"] = json.loads((tmp_path / f"{name}_cmp" / "compare.json").read_text())
    hf_paper, ta_paper = reports["hf", "paper"], reports["ta", "paper"]
    keys = ("float_wer", "stage2", "p_opt", "final_wer")
    assert _layer_free(ta_paper, keys) == _layer_free(hf_paper, keys)
    assert [(r["kind"], r["wer"], r["marked"]) for r in ta_paper["stage1"]] == \
        [(r["kind"], r["wer"], r["marked"]) for r in hf_paper["stage1"]]
    hf_mixed, ta_mixed = reports["hf", "mixed"], reports["ta", "mixed"]
    keys = ("avg_weight_bits", "float_wer", "final_wer", "final_kl", "score")
    assert _layer_free(ta_mixed, keys) == pytest.approx(_layer_free(hf_mixed, keys))
    assert [(c["kind"], c["format"]) for c in ta_mixed["choices"]] == [(c["kind"], c["format"])
                                                                      for c in hf_mixed["choices"]]
    hf_cmp, ta_cmp = reports["hf", "compare"], reports["ta", "compare"]
    assert ta_cmp["fp32_test_wer"] == hf_cmp["fp32_test_wer"]
    columns = [*systems.BASELINES, systems.PAPER, systems.DEFAULT]
    assert {m: ta_cmp["bits"]["8"][m] for m in columns} == {m: hf_cmp["bits"]["8"][m] for m in columns}
