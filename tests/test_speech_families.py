"""The speech-model contract: a new family is one plugin class, and the recipes' machinery (loading,
layer kinds, frame counts, the prefix cache, quantization, ONNX export) works on it unchanged.
Also the torchaudio family, where torchaudio imports (torch 2.11 + torchaudio 2.11)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

import sq_plugin  # noqa: F401  (registers the "stablequant" algorithm)
from recipes.asr import forward_logits, transcribe
from recipes.data import make_batches, open_dataset
from recipes.models import CHAR_VOCAB, random_model, resolve_model
from recipes.qconfig import quantize_copy, stablequant_config
from recipes.reuse import PrefixRunner
from recipes.speech import (
    BlockLayout,
    SpeechFamily,
    SpeechModel,
    family_of,
    hookimpl,
    layer_inventory,
    output_lengths,
    register_family_plugin,
    unregister_family_plugin,
    wrap_speech_model,
)

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
                     ("body.pos", "pos_conv"), ("body.blocks.0.up", "transformer"), ("body.blocks.0.down", "transformer"),
                     ("body.blocks.1.up", "transformer"), ("body.blocks.1.down", "transformer"), ("out", "head")]
    lengths = torch.tensor([11, 12, 300, 307, 1001])
    frames = [sm.model(torch.zeros(1, int(n))).shape[1] for n in lengths]  # oracle: the forward itself
    assert output_lengths(sm, lengths).tolist() == frames


def test_prefix_cache_quantization_and_export_work_on_a_plugin_family(toy, tmp_path):
    from modelopt.torch.quantization.nn import TensorQuantizer

    from recipes.export import export_onnx
    from recipes.onnx_runner import make_session

    sm, utts = toy
    batches = make_batches(utts, sm, batch_seconds=1)
    assert len(transcribe(sm, batches, progress=False)) == len(utts)
    qsm = quantize_copy(sm, stablequant_config(8, 8, num_bins=128), batches)
    model = qsm.model
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    acts = [n for n, q in quantizers.items() if q.is_enabled and n.endswith("input_quantizer")]
    assert len(acts) == 9
    runner = PrefixRunner(model, forward_logits, batches)
    with torch.inference_mode():
        for name in acts:  # model order, one quantizer at a time, as Stage 1 visits them
            for n, q in quantizers.items():
                q.enable() if n == name else q.disable()
            full = [forward_logits(model, b) for b in batches]
            for a, b in zip(full, runner.run(name.rsplit(".", 1)[0])):
                assert torch.equal(a, b), name
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
        pytest.skip(f"torchaudio does not import with this torch ({type(e).__name__}: {str(e)[:120]})")
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

    from recipes.export import export_onnx

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
