"""mtq.auto_quantize with StableQuant's INT8 format beside NVIDIA's, on the demo (small limits)."""

from __future__ import annotations

import copy

import pytest
import torch

import sq_plugin
from recipes.data.readers import make_batches, open_dataset
from recipes.demo import demo_data
from recipes.search.autoquant import ctc_targets, run_auto_quantize
from recipes.search.qconfig import calibration_loop
from recipes.speech.models import remove_weight_norm, resolve_model

mtq = pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def demo():
    sm = resolve_model("demo")
    return sm, make_batches(open_dataset(demo_data("calib")), sm, limit=4)


def test_auto_quantize_searches_the_stablequant_format(demo):
    sm, calib = demo
    qsm, state = run_auto_quantize(sm, calib, 7.0, [sq_plugin.STABLEQUANT_INT8_CFG, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"])
    best = state["best"]
    assert best["is_satisfied"] and best["constraints"]["effective_bits"] <= 7.0
    chosen = {name.removesuffix(".quant_recipe"): str(r) for name, r in best["recipe"].items()}
    ours = [layer for layer, r in chosen.items() if r.startswith("CUSTOM_0")]
    assert ours, chosen  # at 7 bits some layers must be int8, and the only int8 format is ours
    # oracle: a plain mtq.quantize with the same format calibrates the same scales (histograms
    # and weights are collected in float either way)
    fmt = copy.deepcopy(sq_plugin.STABLEQUANT_INT8_CFG)
    config = {"quant_cfg": [{"quantizer_name": "*", "enable": False}, *fmt["quant_cfg"],
                            {"quantizer_name": "*layer_norm*", "enable": False}], "algorithm": fmt["algorithm"]}
    fresh = remove_weight_norm(copy.deepcopy(sm.model))
    mtq.quantize(fresh, config, calibration_loop(calib))
    mine, ref = dict(qsm.model.named_modules()), dict(fresh.named_modules())
    for layer in ours:
        for q in ("input_quantizer", "weight_quantizer"):
            assert mine[f"{layer}.{q}"].is_enabled and mine[f"{layer}.{q}"].num_bits == 8
            assert torch.equal(mine[f"{layer}.{q}"].amax, ref[f"{layer}.{q}"].amax), (layer, q)


def test_without_the_plugin_allow_list_modelopt_refuses(demo, monkeypatch):
    """Why sq_plugin touches ModelOpt's private allow-list: 0.47 refuses any other algorithm."""
    from modelopt.torch.quantization import model_quant

    sm, calib = demo
    monkeypatch.setattr(model_quant, "_AUTO_QUANTIZE_SUPPORTED_ALGORITHMS",
                        model_quant._AUTO_QUANTIZE_SUPPORTED_ALGORITHMS - {"stablequant"})
    with pytest.raises(ValueError, match="'stablequant'.*not supported by auto_quantize"):
        run_auto_quantize(sm, calib, 7.0, [sq_plugin.STABLEQUANT_INT8_CFG])


def test_ctc_targets(demo):
    sm, _ = demo
    labels, lengths = ctc_targets(sm, ["AB C", "d"])
    vocab = sm.vocab
    assert [vocab[i] for i in labels] == ["A", "B", sm.word_delimiter, "C", "D"]
    assert lengths.tolist() == [4, 1]
    labels, lengths = ctc_targets(sm, ["A#B", "Aé"])  # '#' is no letter: a space; 'é': the unknown token
    assert [vocab[i] for i in labels] == ["A", sm.word_delimiter, "B", "A", "<unk>"]
    assert lengths.tolist() == [3, 2]
