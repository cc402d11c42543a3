"""Algorithm 1 end to end on a tiny random model.

A random model recognises nothing, so the dev "references" are the float model's own greedy
transcripts: float WER is 0 and every quantization error shows up as WER. Oracles: a plain full
forward (for the prefix cache), a naive Stage 1, a fresh ``mtq.quantize`` of the emitted config.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import sq_plugin  # noqa: F401
from recipes.evaluation.asr import forward_logits
from recipes.search.engine import DevScorer, Settings
from recipes.search.grid import parse_grid
from recipes.search.layerwise import run_layerwise
from recipes.search.paper import run_stablequant
from recipes.search.qconfig import calibration_loop, quantize_copy, stablequant_config
from recipes.search.reuse import PrefixRunner
from recipes.speech.models import remove_weight_norm

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

GRID = [0.0, 0.05, 0.1, 0.2, 0.5]


def test_prefix_cache_matches_full_forward(setup):
    sm, calib, dev = setup
    qsm = quantize_copy(sm, stablequant_config(8, 8, num_bins=256), calib)
    model = qsm.model
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    acts = [n for n, q in quantizers.items() if q.is_enabled and n.endswith("input_quantizer")]
    runner = PrefixRunner(model, forward_logits, dev)
    with torch.inference_mode():
        for name in acts:  # model order, as Stage 1 visits them
            for n, q in quantizers.items():
                q.enable() if n == name else q.disable()
            full = [forward_logits(model, b) for b in dev]
            cached = runner.run(name.rsplit(".", 1)[0])
            for a, b in zip(full, cached):
                assert torch.equal(a, b), name


def test_variants_side_by_side_equal_one_at_a_time(setup):
    """PrefixRunner.run_variants (k forms of a layer in one forward of k copies of each batch)
    gives each form's logits as a forward with the layer in that form alone, on batches of one
    and of two utterances; a layer fed a batch that is not k copies is refused by name."""
    from recipes.data.readers import Batch

    sm, calib, dev = setup
    qsm = quantize_copy(sm, stablequant_config(8, 8, num_bins=256), calib)
    model = qsm.model
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    acts = [n for n, q in quantizers.items() if q.is_enabled and n.endswith("input_quantizer")]
    for q in quantizers.values():
        q.disable()
    rng = torch.Generator().manual_seed(0)
    pair = Batch(torch.randn(2, 7000, generator=rng) * 0.1, None, torch.tensor([7000, 7000]), ["A", "B"], ["p", "q"])
    batches = [*dev, pair]
    runner = PrefixRunner(model, forward_logits, batches)
    with torch.inference_mode():
        for name in acts[:: max(1, len(acts) // 6)] + acts[-1:]:  # conv, glue and encoder layers
            q, amax = quantizers[name], quantizers[name].amax.clone()

            def form(scale: float | None):
                def put():
                    if scale is None:
                        q.disable()
                    else:
                        q.amax = amax * scale
                        q.enable()
                return put

            forms = [form(None), form(1.0), form(0.25)]
            side_by_side = runner.run_variants(name.rsplit(".", 1)[0], forms)
            for put, outs in zip(forms, side_by_side):
                put()
                alone = [forward_logits(model, b) for b in batches]
                for a, b in zip(alone, outs):
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5), name
            q.disable()
        layer = acts[0].rsplit(".", 1)[0]
        odd = PrefixRunner(model, lambda m, b: forward_logits(m, Batch(b.input_values[:1], None, b.lengths[:1],
                                                                       b.texts[:1], b.ids[:1])), [pair])
        # rows that are not the k copies of the batch (SEW-D's shared relative position embeddings
        # reach its projections so): the variants run one per forward instead, with the same outputs
        forms = [form(None), form(1.0)]
        fallback = odd.run_variants(layer, forms)
        for put, outs in zip(forms, fallback):
            put()
            alone = [odd.forward(model, b) for b in [pair]]
            assert len(outs) == 1 and torch.equal(outs[0], alone[0])


def test_stage1_reuse_equals_naive_and_config_reproduces(setup):
    sm, calib, dev = setup
    fast = run_stablequant(sm, calib, dev, Settings(grid=GRID, gamma=0.25, num_bins=256), progress=False)
    naive = run_stablequant(sm, calib, dev, Settings(grid=GRID, gamma=0.25, num_bins=256, naive_stage1=True),
                            progress=False)
    assert fast.float_wer == 0.0
    assert [r.wer for r in fast.stage1] == [r.wer for r in naive.stage1]
    assert fast.marked == naive.marked
    assert any(r.wer > 0 for r in fast.stage1)  # quantization is visible in this setup
    assert fast.marked == [r.quantizer for r in fast.stage1 if r.wer - fast.float_wer > 0.25]
    # argmin with ties to the smaller p
    best = min(fast.stage2.values())
    assert fast.p_opt == min(float(p) for p, w in fast.stage2.items() if w == best)

    # the emitted config is plain JSON and reproduces the model through mtq.quantize
    config = json.loads(json.dumps(fast.config))
    assert config["algorithm"]["clip_layers"] == sorted(fast.marked)
    fresh = remove_weight_norm(copy.deepcopy(sm.model))
    mtq.quantize(fresh, config, calibration_loop(calib))
    mine = dict(fast.model.model.named_modules())
    for name, q in fresh.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            assert torch.equal(q.amax, mine[name].amax), name
    with torch.inference_mode():
        wer = DevScorer(sm, dev).wer([forward_logits(fresh, b) for b in dev])
    assert wer == fast.final_wer


def test_resume_after_kill_gives_same_result(setup, tmp_path, monkeypatch):
    sm, calib, dev = setup
    settings = Settings(grid=GRID, num_bins=256)
    reference = run_stablequant(sm, calib, dev, settings, progress=False)
    state = tmp_path / "state.json"
    calls = {"n": 0}
    real = DevScorer.errors

    def dying(self, logits):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt("killed")
        return real(self, logits)

    monkeypatch.setattr(DevScorer, "errors", dying)
    with pytest.raises(KeyboardInterrupt):
        run_stablequant(sm, calib, dev, settings, state_path=state, progress=False)
    monkeypatch.setattr(DevScorer, "errors", real)
    saved = json.loads(state.read_text())
    assert len(saved["stage1"]) == 6  # float + 6 layers finished before the kill
    assert saved["phases_done"] == ["calibrate", "float"]  # killed inside stage1
    with pytest.raises(FileExistsError, match="--resume"):
        run_stablequant(sm, calib, dev, settings, state_path=state, progress=False)
    resumed = run_stablequant(sm, calib, dev, settings, state_path=state, resume=True, progress=False)
    assert resumed.evaluations < reference.evaluations
    assert json.loads(state.read_text())["phases_done"] == ["calibrate", "float", "stage1", "stage2"]
    same = {"evaluations": 0, "seconds": {}}
    assert resumed.to_json() | same == reference.to_json() | same
    other = Settings(grid=GRID, num_bins=256, gamma=1.0)
    with pytest.raises(ValueError, match="different gamma"):
        run_stablequant(sm, calib, dev, other, state_path=state, resume=True, progress=False)


def test_bad_settings_and_data(setup):
    sm, calib, dev = setup
    with pytest.raises(ValueError, match="gamma"):
        run_stablequant(sm, calib, dev, Settings(gamma=-1), progress=False)
    with pytest.raises(ValueError, match="empty"):
        parse_grid("")
    with pytest.raises(ValueError, match="increasing"):
        Settings(grid=[0.2, 0.1]).validate()
    with pytest.raises(ValueError, match=r"\[0, 50\]"):
        parse_grid("0:60:10")
    assert parse_grid("0:0.5:0.01") == [round(0.01 * i, 10) for i in range(51)]
    with pytest.raises(ValueError, match="dev set is empty"):
        run_stablequant(sm, calib, [], Settings(grid=GRID), progress=False)


def test_compare_rows_match_independent_modelopt_runs(setup):
    """Table rows vs fresh ModelOpt quantizations: ModelOpt's own max calibration (all layers,
    and with the CNN disabled by config) and the emitted StableQuant config."""
    from recipes.compare import compare_methods
    from recipes.search.qconfig import CNN_PATTERN, quant_cfg

    sm, calib, dev = setup
    table = compare_methods(sm, calib, dev, dev, bits=[8], grid=GRID, num_bins=256)
    row = table["bits"]["8"]
    scorer = DevScorer(sm, dev)

    def fresh_wer(config):
        model = remove_weight_norm(copy.deepcopy(sm.model))
        mtq.quantize(model, config, calibration_loop(calib))
        with torch.inference_mode():
            return scorer.wer([forward_logits(model, b) for b in dev])

    assert table["fp32_test_wer"] == 0.0
    assert row["max"] == fresh_wer({"quant_cfg": quant_cfg(8, 8), "algorithm": "max"})
    assert row["max_tr_only"] == fresh_wer({"quant_cfg": quant_cfg(8, 8, disable=[CNN_PATTERN]), "algorithm": "max"})
    sq = run_stablequant(sm, calib, dev, Settings(grid=GRID, num_bins=256), progress=False)
    assert row["stablequant_paper"] == fresh_wer(sq.config)
    default = run_layerwise(sm, calib, dev, Settings(grid=GRID, num_bins=256), progress=False)
    assert row["stablequant"] == fresh_wer(default.config)
    # intervals: every system against fp32; the best baseline by test WER
    best = row["intervals"]["best_baseline"]
    assert row[best] == min(row[m] for m in ("max", "percentile", "mse", "entropy", "stablequant_paper"))
    assert set(row["intervals"]["stablequant"]) == {"vs_fp32", "vs_best_baseline"}


def _fresh(sm, calib, config):
    model = remove_weight_norm(copy.deepcopy(sm.model))
    mtq.quantize(model, json.loads(json.dumps(config)), calibration_loop(calib))
    return model


def test_paper_recipe_stage2_is_algorithm2_at_every_cutoff(setup):
    """Every Stage-2 WER equals a fresh ModelOpt run of Algorithm 2 at that cut-off: the marked
    layers clipped at p then MSE, every other activation quantizer MSE, weights max."""
    sm, calib, dev = setup
    result = run_stablequant(sm, calib, dev, Settings(grid=GRID, num_bins=256), progress=False)
    scorer = DevScorer(sm, dev)
    for p in GRID:
        model = _fresh(sm, calib, stablequant_config(8, 8, cutoff=p, clip_layers=result.marked, num_bins=256))
        with torch.inference_mode():
            assert scorer.wer([forward_logits(model, b) for b in dev]) == result.stage2[str(p)], p


def test_default_recipe_monotone_and_config_reproduces(setup):
    from recipes.search.layerwise import LogitDivergence

    sm, calib, dev = setup
    result = run_layerwise(sm, calib, dev, Settings(wbits=6, abits=6, num_bins=256), progress=False)
    starts = result.starts
    assert result.start == min(starts, key=lambda k: starts[k]["kl"])
    shifted = [c for c in result.layers if c.chosen.endswith(" +shift")]
    # 4 plain + 4 shifted uniform starts (the tiny model has one-sided GELU inputs), + MSE weights
    assert len(starts) == 9 and sum(k.endswith("+shift/max") for k in starts) == 4
    assert all(c.shift != 0 for c in shifted) and all(c.shift == 0 for c in result.layers if c not in shifted)
    kl_before = starts[result.start]["kl"]
    for choice in result.layers:  # a step moves only to a clearly lower score, never a higher one
        assert choice.kl[choice.chosen] <= kl_before
        kl_before = choice.kl[choice.chosen]
    # oracle: a fresh mtq.quantize of the emitted config, full forwards without any cache
    model = _fresh(sm, calib, result.config)
    mine = dict(result.model.model.named_modules())
    for name, q in model.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            assert torch.allclose(q.amax, mine[name].amax, rtol=0, atol=0), name
            if q.bias:  # a shifted range re-applies with the same shift, bit for bit
                assert torch.equal(q.bias_value, mine[name].bias_value.to(q.bias_value.dtype)), name
    with torch.inference_mode():
        ref = [forward_logits(sm.model, b) for b in dev]
        out = [forward_logits(model, b) for b in dev]
    assert LogitDivergence(ref)(out) == pytest.approx(result.final_kl, rel=1e-5)
    assert result.final_kl == pytest.approx(kl_before, rel=1e-5)
    assert DevScorer(sm, dev).wer(out) == result.final_wer


def test_default_recipe_resumes_to_the_same_result(setup, tmp_path, monkeypatch):
    from recipes.search import layerwise

    sm, calib, dev = setup
    settings = Settings(num_bins=256)
    reference = run_layerwise(sm, calib, dev, settings, progress=False)
    state = tmp_path / "state.json"
    real, calls = layerwise.LogitDivergence.batch_sums, {"n": 0}

    def dying(self, logits):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt("killed")
        return real(self, logits)

    monkeypatch.setattr(layerwise.LogitDivergence, "batch_sums", dying)
    with pytest.raises(KeyboardInterrupt):
        run_layerwise(sm, calib, dev, settings, state_path=state, progress=False)
    monkeypatch.setattr(layerwise.LogitDivergence, "batch_sums", real)
    # the default recipe reads neither gamma nor the cut-off grid: another value is the same run
    paper_only = Settings(num_bins=256, gamma=3.0, grid=[0.0, 0.3])
    resumed = run_layerwise(sm, calib, dev, paper_only, state_path=state, resume=True, progress=False)
    assert resumed.evaluations < reference.evaluations
    same = {"evaluations": 0, "seconds": {}, "settings": {}}
    assert resumed.to_json() | same == reference.to_json() | same
    with pytest.raises(ValueError, match="different num_bins"):
        run_layerwise(sm, calib, dev, Settings(num_bins=128), state_path=state, resume=True, progress=False)


def test_walk_ladder_prefetch_sees_every_comparison_first_and_changes_nothing():
    """The walk with a prefetch callback ends where it ends without one, and every label it
    compares was announced to prefetch before (brute force over ladders, starts and orders)."""
    from itertools import permutations

    from recipes.search.layerwise import walk_ladder

    labels = list("abcde")
    for kls in permutations(range(5)):
        score = dict(zip(labels, kls))
        for start in labels:
            plain = walk_ladder(labels, start, lambda new, old: score[new] < score[old])
            announced, compared = set(), []

            def better(new, old):
                compared.append(new)
                assert new in announced or new == start, (new, kls, start)
                return score[new] < score[old]

            assert walk_ladder(labels, start, better, lambda due: announced.update(due)) == plain
            assert set(compared) <= announced | {start}


def test_default_recipe_side_by_side_candidates_choose_as_one_at_a_time(setup):
    """Scoring the walk's next two candidates in one forward (default) picks the same calibrators,
    with the same per-layer KLs up to float rounding, as one candidate per forward."""
    sm, calib, dev = setup
    settings = Settings(num_bins=256)
    pairs = run_layerwise(sm, calib, dev, settings, progress=False)
    single = run_layerwise(sm, calib, dev, settings, progress=False, variants_per_forward=1)
    assert [(c.quantizer, c.chosen) for c in pairs.layers] == [(c.quantizer, c.chosen) for c in single.layers]
    for a, b in zip(pairs.layers, single.layers):
        assert a.kl == pytest.approx(b.kl, rel=1e-3, abs=1e-9)
    assert pairs.config == single.config and pairs.final_wer == single.final_wer


def test_one_standard_error_rule_by_hand():
    """clearly_lower: the paired difference must beat its standard error over dev batches."""
    from recipes.search.layerwise import LogitDivergence

    ref = [torch.zeros(1, 5, 3) for _ in range(4)]  # 4 batches of 5 frames: 20 frames
    div = LogitDivergence(ref)
    old = [1.0, 1.0, 1.0, 1.0]
    # d = [-0.4, -0.4, -0.4, -0.4]: no spread, SE 0, mean diff -1.6/20 < 0 -> lower
    assert div.clearly_lower([0.6] * 4, old)
    # d = [-2, +1, -1, +0.4]: sum -1.6 (mean -0.08 per frame), var (ddof 1) = 1.8533,
    # SE = sqrt(4 * 1.8533) / 20 = 0.1361 -> -0.08 is not below -0.1361
    assert not div.clearly_lower([-1.0, 2.0, 0.0, 1.4], old)
    assert div.mean([-1.0, 2.0, 0.0, 1.4]) == pytest.approx(2.4 / 20)
    assert not div.clearly_lower(old, old)
