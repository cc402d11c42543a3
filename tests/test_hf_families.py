"""The family matrix: every wav2vec2-style CTC class of transformers runs every sub-command, or is
refused up front with one line.

Seeded tiny random models (``random_model(shape, arch, **switches)``) saved as Hugging Face
directories, two short synthetic utterances whose references are the float model's own transcripts
(float WER 0: every quantization error shows), and ``recipes.cli.main`` as the CLI. One
configuration per class runs the full command set (eval, quantize with both recipes, compare,
quantize --budget-bits, export --onnx then eval --onnx); the configuration switches of real
checkpoints (layer-norm CNN, pre-LN "stable" layers, conv bias, rotary positions) run the cheaper
checks (eval, prefix-cache exactness, quantize, export and ONNX eval).
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from oracles import assert_near_transcripts, assert_prefix_cache_exact

import sq_plugin  # noqa: F401  (registers the "stablequant" algorithm)
from recipes.cli import main
from recipes.data.readers import make_batches, open_dataset
from recipes.evaluation.asr import forward_logits
from recipes.search.qconfig import quantize_copy, stablequant_config
from recipes.speech import layer_inventory
from recipes.speech.contract import find_module
from recipes.speech.hf_ctc import REFUSED_ARCHS, SUPPORTED_ARCHS, prepare_model
from recipes.speech.models import random_config, random_model, remove_weight_norm, resolve_model, save_model

# large checkpoints: layer-norm CNN with bias, pre-LN ("stable") Transformer layers
LARGE = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
LAYER_CNN = dict(feat_extract_norm="layer", conv_bias=True)  # classes with no do_stable_layer_norm

# one configuration per class: the full command set
FULL = {
    "Wav2Vec2ForCTC": ("wav2vec2", {}),  # base: group-norm CNN, no conv bias, post-LN layers
    "HubertForCTC": ("hubert", {}),
    "WavLMForCTC": ("wavlm", {}),  # relative position buckets, gated position bias threaded
    "Data2VecAudioForCTC": ("data2vec-audio", {}),  # layer-norm CNN with bias, 5 positional convs
    "Wav2Vec2ConformerForCTC": ("wav2vec2-conformer", {}),  # relative positions
    "UniSpeechForCTC": ("unispeech", {}),
    "UniSpeechSatForCTC": ("unispeech-sat", {}),
    "SEWForCTC": ("sew", {}),  # squeeze (pool) before and upsampling after the layers
    "SEWDForCTC": ("sew-d", {}),  # DeBERTa layers at encoder.encoder.layer, shared rel. embeddings
}
# the other switches: eval, prefix cache, quantize, export, ONNX eval
SWITCHES = [
    ("wav2vec2", LARGE),
    ("hubert", LARGE),
    ("wavlm", LARGE),
    ("unispeech", LARGE),
    ("unispeech-sat", LARGE),
    ("wav2vec2-conformer", dict(position_embeddings_type="rotary", **LAYER_CNN)),
    ("sew", LAYER_CNN),
    ("sew-d", LAYER_CNN),
]
QUANTIZE = ["--grid", "0,0.1", "--num-bins", "128"]
LENGTHS = (4000, 4400)  # 12 and 13 frames: even and odd (SEW's squeeze pads odd ones back)


def _id(value):
    arch, switches = value
    return "-".join([arch, *(f"{k}={v}" for k, v in switches.items())])


def _cli(args, json_out=False):
    """(exit code, parsed --json output or None, stderr) of one ``stablequant`` call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args + (["--json"] if json_out else []))
    return rc, (json.loads(out.getvalue()) if json_out and rc == 0 else None), err.getvalue()


def _workspace(tmp_path, arch, switches, seed=1):
    """A saved model and a TSV of its own float transcripts: (model dir, data path, SpeechModel)."""
    sm = random_model("tiny", arch, seed=seed, **switches)
    model_dir = save_model(sm, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == [sm.arch]
    for key, value in switches.items():  # the switch really is in the checkpoint's config
        assert config[key] == value, key
    rng = np.random.default_rng(0)
    for i, n in enumerate(LENGTHS):
        sf.write(tmp_path / f"u{i}.flac", (0.1 * rng.standard_normal(n)).astype("float32"), 16000)
    (tmp_path / "raw.tsv").write_text("".join(f"u{i}.flac\tA\n" for i in range(len(LENGTHS))))
    rc, fp32, err = _cli(["eval", "--model", str(model_dir), "--data", str(tmp_path / "raw.tsv")], True)
    assert rc == 0, err
    by_id = dict(zip(fp32["ids"], fp32["hyps"]))
    rows = [f"{u.path.name}\t{by_id[u.id] or 'A'}" for u in open_dataset(tmp_path / "raw.tsv")]
    (tmp_path / "set.tsv").write_text("\n".join(rows) + "\n")
    return model_dir, str(tmp_path / "set.tsv"), sm


def _check_prefix_cache(sm, data):
    """With one quantizer enabled, the prefix-cached suffix forward is the full forward, exactly;
    and run_variants (k forms of a layer in one forward) equals one forward per form."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    batches = make_batches(open_dataset(data), sm, batch_seconds=1)
    qsm = quantize_copy(sm, stablequant_config(8, 8, num_bins=128), batches)
    model = qsm.model
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    acts = [n for n, q in quantizers.items() if q.is_enabled and n.endswith("input_quantizer")]
    # every Conv1d/Linear input, nothing else (no LayerNorm / pooling / embedding quantizer), and
    # every one of them saw data (a layer the forward never runs would have no range)
    assert [a.rsplit(".", 1)[0] for a in acts] == [i.path for i in layer_inventory(qsm)]
    assert all(quantizers[a].amax is not None for a in acts)
    def variants_equal_one_form_per_forward(name, full, runner):
        quantizers[name].disable()
        plain = [forward_logits(model, b) for b in batches]
        on, off = runner.run_variants(name.rsplit(".", 1)[0], [quantizers[name].enable, quantizers[name].disable])
        for want, got in zip(full + plain, on + off):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)

    assert_prefix_cache_exact(model, quantizers, acts, batches, then=variants_equal_one_form_per_forward)
    return len(acts)


def _quantize_export_and_onnx_eval(model_dir, data, out, saved=False):
    """quantize (default recipe), eval and export the quantized model (re-applying
    modelopt_config.json, or ``saved``: OUT/model.pth as it is), eval --onnx. ONNX Runtime's logits
    are the quantized PyTorch model's at every utterance length (up to int8 rounding ties), and so
    are its transcripts, but for the odd character a tie flips on these untrained models."""
    from recipes.export.onnx_runner import make_session
    from recipes.search.qconfig import load_quantized

    model = str(model_dir)
    rc, _, err = _cli(["quantize", "--model", model, "--calib", data, "--dev", data, *QUANTIZE,
                       "--out", str(out / "q")])
    assert rc == 0, err
    report = json.loads((out / "q" / "report.json").read_text())
    config = json.loads((out / "q" / "modelopt_config.json").read_text())
    assert report["meta"]["recipe"] == "default" and config["algorithm"]["method"] == "stablequant"
    assert len(config["algorithm"]["layer_calibrators"]) == len(report["layers"])
    how = (["--quantized", str(out / "q" / "model.pth")] if saved else
           ["--config", str(out / "q" / "modelopt_config.json"), "--calib", data])
    rc, quantized, err = _cli(["eval", "--model", model, *how, "--data", data], True)
    assert rc == 0, err
    onnx_path = out / "model.onnx"
    rc, _, err = _cli(["export", "--model", model, *how, "--onnx", str(onnx_path)])
    assert rc == 0, err
    rc, exported, err = _cli(["eval", "--onnx", str(onnx_path), "--data", data], True)
    assert rc == 0, err
    assert exported["precision"] == "int8-qdq" and exported["ids"] == quantized["ids"]
    assert_near_transcripts(exported["hyps"], quantized["hyps"])

    qsm = load_quantized(resolve_model(model_dir), out / "q" / "model.pth")
    session = make_session(onnx_path)
    for batch in make_batches(open_dataset(data), qsm, batch_seconds=1):
        x = batch.input_values
        got = session.run(["logits"], {"input_values": x.numpy()})[0]
        with torch.inference_mode():
            want = forward_logits(qsm.model, batch).numpy()
        assert got.shape == want.shape  # SEW's squeeze: odd frame counts padded back in the graph too
        np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()))
    return report


@pytest.mark.parametrize("arch_name", list(FULL))
def test_every_class_runs_every_command(arch_name, tmp_path):
    arch, switches = FULL[arch_name]
    model_dir, data, sm = _workspace(tmp_path, arch, switches)
    assert resolve_model(model_dir).arch == arch_name == sm.arch
    n_layers = _check_prefix_cache(sm, data)
    report = _quantize_export_and_onnx_eval(model_dir, data, tmp_path)
    assert len(report["layers"]) == n_layers

    common = ["--model", str(model_dir), "--calib", data, "--dev", data, *QUANTIZE]
    rc, _, err = _cli(["quantize", *common, "--recipe", "paper", "--out", str(tmp_path / "paper")])
    assert rc == 0, err
    paper = json.loads((tmp_path / "paper" / "report.json").read_text())
    assert paper["meta"]["recipe"] == "paper" and set(paper["stage2"]) == {"0.0", "0.1"}
    assert len(paper["stage1"]) == n_layers

    rc, _, err = _cli(["quantize", *common, "--budget-bits", "6", "--out", str(tmp_path / "mixed")])
    assert rc == 0, err
    mixed = json.loads((tmp_path / "mixed" / "report.json").read_text())
    assert mixed["meta"]["recipe"] == "mixed" and mixed["avg_weight_bits"] <= 6.0
    assert len(mixed["choices"]) == n_layers

    rc, _, err = _cli(["compare", *common, "--test", data, "--bits", "8", "--budgets",
                       "--out", str(tmp_path / "compare")])
    assert rc == 0, err
    compare = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert compare["fp32_test_wer"] == 0.0 and compare["test_utterances"] == len(LENGTHS)
    assert len(compare["bits"]["8"]["layer_calibrators"]) == n_layers


@pytest.mark.parametrize("case", SWITCHES, ids=_id)
def test_configuration_switches(case, tmp_path):
    arch, switches = case
    model_dir, data, sm = _workspace(tmp_path, arch, switches, seed=2)
    modules = dict(sm.model.named_modules())
    convs = modules[find_module(sm.model, "feature_extractor.conv_layers")]
    if switches.get("do_stable_layer_norm"):  # pre-LN layers, the encoder's LayerNorm after them
        assert type(modules[find_module(sm.model, "encoder")]).__name__.endswith("EncoderStableLayerNorm")
    if switches.get("feat_extract_norm") == "layer":
        assert all(type(c).__name__.endswith("LayerNormConvLayer") for c in convs)
    if "conv_bias" in switches:
        assert (convs[0].conv.bias is not None) == switches["conv_bias"]
    n_layers = _check_prefix_cache(sm, data)
    report = _quantize_export_and_onnx_eval(model_dir, data, tmp_path, saved=True)
    assert len(report["layers"]) == n_layers


# ----------------------------------------------------------------------------- structure


def test_prepared_models_compute_what_transformers_computes():
    """prepare_model routes WavLM's attention projections through their Linear modules (transformers
    hands their weights to F.multi_head_attention_forward, so the modules never ran and their
    quantizers saw nothing) and retires the conformer's positional conv its forward never calls;
    the logits stay transformers' own."""
    import transformers

    x = torch.randn(2, 4400, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 4400, dtype=torch.long)
    mask[1, 3000:] = 0  # a padded row: the key padding mask still applies
    for arch, kwargs in (("wavlm", {}), ("wavlm", LARGE), ("wav2vec2-conformer", {}),
                         ("wav2vec2-conformer", {"position_embeddings_type": "rotary"})):
        config = random_config("tiny", arch, **kwargs)
        torch.manual_seed(0)
        plain = remove_weight_norm(getattr(transformers, config.architectures[0])(config).eval())
        prepared = prepare_model(remove_weight_norm(getattr(transformers, config.architectures[0])(config).eval()))
        prepared.load_state_dict(plain.state_dict())
        ran = set()
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.add(n)) for n, m in prepared.named_modules()]
        with torch.inference_mode():
            for kw in ({}, {"attention_mask": mask}):
                torch.testing.assert_close(prepared(x, **kw).logits, plain(x, **kw).logits, rtol=1e-5, atol=1e-5)
        for h in hooks:
            h.remove()
        linears = {n for n, m in prepared.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))}
        assert linears <= ran, sorted(linears - ran)
        assert set(plain.state_dict()) == set(prepared.state_dict())  # the same checkpoint keys


def test_rotary_export_runs_at_other_lengths_than_a_cached_one(tmp_path):
    """The conformer caches its rotary table per length: a forward at the export's trace length
    (1 s) just before exporting must not bake that table into the ONNX file (it did: ONNX Runtime
    then failed on anything longer). Float export, so the comparison is tight."""
    from recipes.export.onnx import export_onnx
    from recipes.export.onnx_runner import make_session

    sm = random_model("tiny", "wav2vec2-conformer", seed=3, position_embeddings_type="rotary")
    with torch.inference_mode():
        sm.model(torch.randn(1, 16000))  # the rotary table of the trace length is cached now
    export_onnx(sm, tmp_path / "rotary.onnx", allow_fp32=True)
    session = make_session(tmp_path / "rotary.onnx")
    for n in (6000, 40000):  # shorter and longer than the trace
        x = torch.randn(1, n, generator=torch.Generator().manual_seed(n))
        got = session.run(["logits"], {"input_values": x.numpy()})[0]
        with torch.inference_mode():
            want = sm.model(x).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- refusals


def _one_line_refusal(model_dir, *expected):
    rc, _, err = _cli(["eval", "--model", str(model_dir), "--data", "no-such-data.tsv"])
    err = err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def _hf_dir_with_config(directory, config):
    """A Hugging Face directory with its config.json only: a refusal reads nothing else."""
    directory.mkdir()
    config.to_json_file(str(directory / "config.json"))
    return directory


def test_classes_and_settings_the_recipes_cannot_run_are_refused_in_one_line(tmp_path):
    import transformers

    assert set(SUPPORTED_ARCHS) == {
        "Wav2Vec2ForCTC", "HubertForCTC", "WavLMForCTC", "Data2VecAudioForCTC", "Wav2Vec2ConformerForCTC",
        "UniSpeechForCTC", "UniSpeechSatForCTC", "SEWForCTC", "SEWDForCTC"}
    # every *ForCTC class transformers has is either supported or refused with its reason
    ctc = {name for name in dir(transformers) if name.endswith("ForCTC") and not name.startswith("Auto")}
    assert ctc == set(SUPPORTED_ARCHS) | set(REFUSED_ARCHS), ctc ^ (set(SUPPORTED_ARCHS) | set(REFUSED_ARCHS))

    bert = transformers.Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64, vocab_size=32,
                                           architectures=["Wav2Vec2BertForCTC"])
    _one_line_refusal(_hf_dir_with_config(tmp_path / "bert", bert), "Wav2Vec2BertForCTC is not supported",
                      "input_features", "not the raw waveform")
    from recipes.speech import wrap_speech_model

    with pytest.raises(ValueError, match="Wav2Vec2BertForCTC is not supported: it takes log-mel"):
        wrap_speech_model(transformers.Wav2Vec2BertForCTC(bert), _tokenizer(tmp_path))

    adapter = random_config("tiny", "wav2vec2", add_adapter=True)
    _one_line_refusal(_hf_dir_with_config(tmp_path / "adapter", adapter),
                      "Wav2Vec2ForCTC with add_adapter=true is not supported")
    with pytest.raises(ValueError, match="Wav2Vec2ConformerForCTC with add_adapter=true"):
        random_model("tiny", "wav2vec2-conformer", add_adapter=True)
    with pytest.raises(ValueError, match="position_embeddings_type='relative_key' is not supported"):
        random_model("tiny", "wav2vec2-conformer", position_embeddings_type="relative_key")
    with pytest.raises(ValueError, match="SEWConfig has no field.* do_stable_layer_norm"):
        random_config("tiny", "sew", do_stable_layer_norm=True)  # a switch that class does not have


def _tokenizer(tmp_path):
    from transformers import AutoTokenizer

    d = save_model(random_model("tiny", seed=0), tmp_path / "tok")
    return AutoTokenizer.from_pretrained(d, local_files_only=True)
