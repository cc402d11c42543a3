"""Mixed precision under a budget: exact allocation vs brute force, budget kept, config round trip."""

from __future__ import annotations

import copy
import itertools
import json

import jiwer
import numpy as np
import pytest
import torch

import sq_plugin  # noqa: F401
from calibrators import weight_block
from recipes.evaluation.asr import decode_logits, forward_logits
from recipes.search.allocation import allocate, average_bits, choose_score
from recipes.search.engine import DevScorer, Settings
from recipes.search.formats import MENU
from recipes.search.layerwise import LogitDivergence
from recipes.search.mixed import run_mixed
from recipes.search.qconfig import calibration_loop
from recipes.speech.models import remove_weight_norm

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402


def _brute_force(scores, sizes, bits, budget):
    best = None
    for combo in itertools.product(*[list(r) for r in scores]):
        if sum(n * bits[f] for n, f in zip(sizes, combo)) <= budget * sum(sizes) + 1e-9:
            cost = sum(r[f] for r, f in zip(scores, combo))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_allocation_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    bits = {"float": 16, "W8A8": 8, "W6A6": 6, "W4A8": 4}
    sizes = [int(n) for n in rng.integers(1, 50, 6) * 128]
    scores = []
    for _ in sizes:  # fewer bits, more damage (not strictly: noise on top)
        base = rng.exponential(1.0)
        scores.append({"float": 0.0, "W8A8": base * 0.1 + rng.random() * 0.05, "W6A6": base * 0.5,
                       "W4A8": base * 2 + rng.random()})
    for budget in (4.0, 4.7, 5.5, 6.4, 8.0, 11.3, 16.0):
        choice = allocate(scores, sizes, bits, budget)
        assert average_bits(sizes, [bits[f] for f in choice]) <= budget + 1e-12
        assert sum(r[f] for r, f in zip(scores, choice)) == pytest.approx(
            _brute_force(scores, sizes, bits, budget), abs=1e-9)
    with pytest.raises(ValueError, match="below the smallest"):
        allocate(scores, sizes, bits, 3.9)
    # a pinned layer keeps its format, the rest stays optimal under the same budget
    pinned = allocate(scores, sizes, bits, 9.0, fixed={0: "float"})
    assert pinned[0] == "float" and average_bits(sizes, [bits[f] for f in pinned]) <= 9.0
    rest = [r if i else {"float": r["float"]} for i, r in enumerate(scores)]  # oracle: layer 0 float only
    assert sum(r[f] for r, f in zip(scores, pinned)) == pytest.approx(_brute_force(rest, sizes, bits, 9.0), abs=1e-9)


def test_allocation_fractional_bits_exact():
    """Budget arithmetic is integer: a budget exactly at a combination's average is feasible."""
    bits = {"a": 16, "b": 4}
    sizes = [3, 7]
    exact = average_bits(sizes, [16, 4])  # 7.6
    choice = allocate([{"a": 0.0, "b": 1.0}, {"a": 0.0, "b": 1.0}], sizes, bits, exact)
    assert choice == ["a", "b"]


def test_mixed_budget_respected_and_config_reproduces(setup):
    sm, calib, dev = setup
    result = run_mixed(sm, calib, dev, 6.0, Settings(num_bins=256), progress=False,
                       pareto_budgets=(5.0,), score="kl")  # optimality below is checked for the KL scores
    sizes = [c.weights for c in result.choices]
    assert result.avg_weight_bits <= 6.0
    # block formats add their fp16 scales: 16 bits per block of c.block[1] weights
    assert result.avg_weight_bits == pytest.approx(average_bits(
        sizes, [MENU[c.format].bits + (16 / c.block[1] if c.block else 0) for c in result.choices]))
    assert {c.format for c in result.choices} - {"float"}  # something is quantized
    # the allocation is optimal for the measured sensitivities (brute force is too big: check
    # that no single-layer change within budget lowers the predicted sum)
    modules = dict(sm.model.named_modules())
    pred = sum(result.sensitivity[c.layer][c.format] for c in result.choices)
    assert pred == pytest.approx(result.predicted_kl)
    for i, c in enumerate(result.choices):
        for f in result.menu:
            block = weight_block(modules[c.layer].weight.shape)
            if MENU[f].blocks and block is None:
                assert f not in result.sensitivity[c.layer]  # not offered where no block fits
                continue
            own = MENU[f].bits + (16 / block[1] if MENU[f].blocks else 0)
            bits = [d.bits if j != i else own for j, d in enumerate(result.choices)]
            if average_bits(sizes, bits) <= 6.0:
                assert result.sensitivity[c.layer][f] >= result.sensitivity[c.layer][c.format] - 1e-12
    # oracle: a fresh mtq.quantize of the emitted config, plain full forwards
    model = remove_weight_norm(copy.deepcopy(sm.model))
    mtq.quantize(model, json.loads(json.dumps(result.config)), calibration_loop(calib))
    mine = dict(result.model.model.named_modules())
    enabled = 0
    for name, q in model.named_modules():
        if isinstance(q, TensorQuantizer):
            assert q.is_enabled == mine[name].is_enabled, name
            if q.is_enabled:
                enabled += 1
                assert q.num_bits == mine[name].num_bits, name
                assert torch.equal(q.amax, mine[name].amax), name
    assert enabled
    with torch.inference_mode():
        ref = [forward_logits(sm.model, b) for b in dev]
        out = [forward_logits(model, b) for b in dev]
    assert LogitDivergence(ref)(out) == pytest.approx(result.final_kl, rel=1e-5)
    assert DevScorer(sm, dev).wer(out) == result.final_wer
    assert [p["budget"] for p in result.pareto] == [5.0, 6.0]


@pytest.mark.parametrize("score", ["kl", "ctc"])
def test_greedy_repair_keeps_only_improvements_within_budget(setup, score):
    """Force the repair (tolerance -1e9: every measurement 'misses', also a negative CTC
    prediction): each step pins one layer a format up, re-solves under the same budget, and is
    kept only if the measured score (dev KL, or dev CTC-loss change) falls."""
    sm, calib, dev = setup
    result = run_mixed(sm, calib, dev, 6.0, Settings(num_bins=256), progress=False, pareto_budgets=(),
                       tolerance=-1e9, max_repairs=2, score=score)
    assert result.score == score and list(result.candidates) == [score]
    assert 1 <= len(result.repairs) <= 2
    value = result.repairs[0]["before"]
    for step in result.repairs:
        assert step["score"] == score
        assert step["before"] == value and step["kept"] == (step["after"] < value)
        if step["kept"]:
            value = step["after"]
        assert step["bits_to"] > step["bits_from"] and step["bits_to"] > 4
    assert (result.final_kl if score == "kl" else result.final_ctc) == value and result.avg_weight_bits <= 6.0


def test_fp8_format_round_trips_through_a_fresh_quantize(setup, tmp_path):
    """Menu float / FP8 at 8 bits: every layer FP8 (float's 16 bits cannot fit), E4M3 per tensor with
    max ranges. Oracle: the config through JSON, re-applied by a fresh mtq.quantize (ModelOpt's own
    max calibration and E4M3 fake quant), gives the same amaxes, dev KL and WER; the ONNX export
    carries float8 weights and ONNX Runtime scores it."""
    from recipes.export.onnx import export_onnx
    from recipes.search.formats import model_weight_bits
    from recipes.search.qconfig import config_from_json

    sm, calib, dev = setup
    result = run_mixed(sm, calib, dev, 8.0, Settings(num_bins=256), progress=False, pareto_budgets=(),
                       menu=("float", "FP8"))
    assert {c.format for c in result.choices} == {"FP8"} and result.avg_weight_bits == 8.0
    assert model_weight_bits(result.model.model) == 8.0
    model = remove_weight_norm(copy.deepcopy(sm.model))
    mtq.quantize(model, config_from_json(json.loads(json.dumps(result.config))), calibration_loop(calib))
    mine = dict(result.model.model.named_modules())
    fp8 = 0
    for name, q in model.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            assert tuple(q.num_bits) == (4, 3) and tuple(mine[name].num_bits) == (4, 3), name
            assert q.amax.numel() == 1 and float(q.amax) == pytest.approx(float(mine[name].amax), rel=1e-6), name
            assert mine[name].bias is None, name  # shifted integer ranges do not carry over to FP8
            fp8 += 1
    assert fp8 == 2 * len(result.choices)
    with torch.inference_mode():
        ref = [forward_logits(sm.model, b) for b in dev]
        out = [forward_logits(model, b) for b in dev]
    assert LogitDivergence(ref)(out) == pytest.approx(result.final_kl, rel=1e-4)
    info = export_onnx(result.model, tmp_path / "fp8.onnx")
    assert info["precision"] == "fp8-qdq" and info["fp8_weights"] == len(result.choices)


@pytest.mark.parametrize("seed", range(3))
def test_allocation_with_negative_scores_matches_brute_force(seed):
    """CTC-loss changes can be below fp32's (negative, some below float's 0): still the exact optimum."""
    rng = np.random.default_rng(100 + seed)
    bits = {"float": 16, "W8A8": 8, "W6A6": 6, "W4A8": 4}
    sizes = [int(n) for n in rng.integers(1, 50, 6) * 128]
    scores = [{"float": 0.0, **{f: float(rng.normal(0.0, 1.0)) for f in ("W8A8", "W6A6", "W4A8")}} for _ in sizes]
    assert any(v < 0 for r in scores for v in r.values())
    for budget in (4.0, 5.1, 6.4, 9.0, 16.0):
        choice = allocate(scores, sizes, bits, budget)
        assert average_bits(sizes, [bits[f] for f in choice]) <= budget + 1e-12
        assert sum(r[f] for r, f in zip(scores, choice)) == pytest.approx(
            _brute_force(scores, sizes, bits, budget), abs=1e-9)


def test_choose_score_lower_calibration_wer_ties_to_kl():
    """Synthetic candidates: the lower calibration-set WER wins whatever its dev WER or KL; equal
    goes to KL; without calibration WERs (no transcripts there) KL, not the dev-fitted CTC."""
    assert choose_score({"kl": {"dev_wer": 14.0, "calib_wer": 15.03, "dev_kl": 0.001},
                         "ctc": {"dev_wer": 15.0, "calib_wer": 14.74, "dev_kl": 0.002}})[0] == "ctc"
    assert choose_score({"ctc": {"dev_wer": 14.31, "calib_wer": 15.5, "dev_kl": 0.0001},
                         "kl": {"dev_wer": 15.46, "calib_wer": 15.2, "dev_kl": 0.003}})[0] == "kl"
    score, why = choose_score({"ctc": {"dev_wer": 1.0, "calib_wer": 15.0}, "kl": {"dev_wer": 9.0, "calib_wer": 15.0}})
    assert score == "kl" and "tie" in why
    score, why = choose_score({"ctc": {"dev_wer": 1.0, "calib_wer": None}, "kl": {"dev_wer": 9.0, "calib_wer": None}})
    assert score == "kl" and "no calibration transcripts" in why
    assert choose_score({"ctc": {"dev_wer": 99.0}})[0] == "ctc"
    with pytest.raises(ValueError):
        choose_score({})


def _hand_ctc(sm, batches, logits) -> float:
    """Oracle: Σ over batches of the mean over utterances of torch's CTC loss / target length,
    targets spelled from the vocabulary by hand (batches are unpadded: every frame is valid)."""
    total = 0.0
    for batch, out in zip(batches, logits):
        lp = torch.log_softmax(out.double(), -1).transpose(0, 1)
        per_utt = []
        for k, text in enumerate(batch.texts):
            ids = [sm.vocab.index(sm.word_delimiter if ch == " " else ch) for ch in " ".join(text.upper().split())]
            loss = torch.nn.functional.ctc_loss(lp[:, k:k + 1], torch.tensor([ids]), torch.tensor([lp.shape[0]]),
                                                torch.tensor([len(ids)]), blank=sm.blank_id, reduction="sum",
                                                zero_infinity=True)
            per_utt.append(float(loss) / len(ids))
        total += sum(per_utt) / len(per_utt)
    return total


def test_ctc_scores_match_hand_ctc_loss_and_auto_keeps_lower_dev_wer(setup, tmp_path):
    """A layer's CTC score = hand-computed CTC loss of a fresh mtq.quantize with only that layer
    quantized, minus fp32's; the final allocation's likewise. auto keeps the candidate with the
    lower calibration-set WER (checked by jiwer on the re-applied config), and --mixed-score kl
    reproduces the KL candidate from the same state."""
    sm, calib, dev = setup
    state = tmp_path / "state.json"
    result = run_mixed(sm, calib, dev, 6.0, Settings(num_bins=256), progress=False, pareto_budgets=(),
                       state_path=state)
    assert set(result.candidates) == {"kl", "ctc"}
    assert result.score == choose_score(result.candidates)[0]
    best = min(result.candidates.values(), key=lambda v: (v["calib_wer"], v["score"] != "kl"))
    assert best["score"] == result.score and result.final_wer == best["dev_wer"]
    with torch.inference_mode():
        fp32 = _hand_ctc(sm, dev, [forward_logits(sm.model, b) for b in dev])

    def hand_change(config) -> float:
        model = remove_weight_norm(copy.deepcopy(sm.model))
        mtq.quantize(model, json.loads(json.dumps(config)), calibration_loop(calib))
        with torch.inference_mode():
            return _hand_ctc(sm, dev, [forward_logits(model, b) for b in dev]) - fp32

    assert hand_change(result.config) == pytest.approx(result.final_ctc, rel=1e-3, abs=1e-5)
    # the kept allocation's calibration-set WER: its config re-applied by a fresh mtq.quantize
    fresh = remove_weight_norm(copy.deepcopy(sm.model))
    mtq.quantize(fresh, json.loads(json.dumps(result.config)), calibration_loop(calib))
    with torch.inference_mode():
        hyps = [h for b in calib for h in decode_logits(sm, forward_logits(fresh, b), b)]
    refs = [t for b in calib for t in b.texts]
    assert result.candidates[result.score]["calib_wer"] == pytest.approx(100 * jiwer.wer(refs, hyps), abs=1e-9)
    layer = next(c for c in result.choices if c.format != "float")
    mine = layer.layer + "."
    algorithm = result.config["algorithm"]
    alone = {"quant_cfg": [e for e in result.config["quant_cfg"]
                           if e["quantizer_name"] == "*" or e["quantizer_name"].startswith(mine)],
             "algorithm": {**algorithm, "layer_calibrators": {
                 n: e for n, e in algorithm["layer_calibrators"].items() if n.startswith(mine)}}}
    assert len(alone["quant_cfg"]) > 1
    assert hand_change(alone) == pytest.approx(result.sensitivity_ctc[layer.layer][layer.format], rel=1e-3, abs=1e-5)
    assert layer.predicted_ctc == result.sensitivity_ctc[layer.layer][layer.format]
    assert all(row["float"] == 0.0 for row in result.sensitivity_ctc.values())
    kl_only = run_mixed(sm, calib, dev, 6.0, Settings(num_bins=256), progress=False, pareto_budgets=(),
                        state_path=state, resume=True, score="kl")
    assert {c.layer: c.format for c in kl_only.choices} == result.candidates["kl"]["assignment"]
    assert kl_only.final_wer == result.candidates["kl"]["dev_wer"]


def test_resume_with_a_larger_menu_scores_only_the_new_formats(setup, tmp_path):
    """Sensitivities are per layer and format, so --resume with another menu keeps the scores it
    has (a sentinel planted in the state survives) and measures only the added format, which
    equals a fresh run's (up to float rounding); an older state file whose fingerprint still names its menu resumes."""
    sm, calib, dev = setup
    state = tmp_path / "state.json"
    small = ("float", "W8A8", "W4A16")
    run_mixed(sm, calib, dev, 8.0, Settings(num_bins=256), progress=False, pareto_budgets=(),
              state_path=state, menu=small, score="kl")
    data = json.loads(state.read_text())
    layer = next(iter(data["sensitivity"]))
    data["sensitivity"][layer]["W8A8"] = 123.0
    data["fingerprint"]["menu"] = list(small)  # as state files written before the menu left it
    state.write_text(json.dumps(data))
    big = run_mixed(sm, calib, dev, 8.0, Settings(num_bins=256), progress=False, pareto_budgets=(),
                    state_path=state, resume=True, menu=(*small, "W6A6"), score="kl")
    assert big.sensitivity[layer]["W8A8"] == 123.0  # kept, not re-measured
    fresh = run_mixed(sm, calib, dev, 8.0, Settings(num_bins=256), progress=False, pareto_budgets=(),
                      menu=(*small, "W6A6"), score="kl")
    # equal up to float rounding: the fresh run scores W6A6 side by side with three other formats
    # (one forward of 4 copies of each batch; a conv's kernel may sum differently for 4 rows than 1)
    assert {l: v["W6A6"] for l, v in big.sensitivity.items()} == \
        pytest.approx({l: v["W6A6"] for l, v in fresh.sensitivity.items()}, rel=1e-2)


def test_state_without_ctc_scores_is_recomputed(setup, tmp_path, caplog):
    """A state file from before CTC scoring (KL only) resumes: the CTC scores are recomputed, the KL kept."""
    sm, calib, dev = setup
    state = tmp_path / "state.json"
    first = run_mixed(sm, calib, dev, 6.0, Settings(num_bins=256), progress=False, pareto_budgets=(),
                      state_path=state, score="kl")
    data = json.loads(state.read_text())
    del data["sensitivity_ctc"]
    state.write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        again = run_mixed(sm, calib, dev, 6.0, Settings(num_bins=256), progress=False, pareto_budgets=(),
                          state_path=state, resume=True, score="kl")
    assert "without a CTC score" in caplog.text
    assert again.sensitivity == first.sensitivity and again.sensitivity_ctc == first.sensitivity_ctc
