"""Mixed precision on the demo: size, test WER, packed ONNX, and auto_quantize at equal bits.

Two bit counts: ours charges a block format's fp16 scales (4 + 16/block bits per weight);
ModelOpt 0.47's auto_quantize counts INT4_BLOCKWISE_WEIGHT_ONLY_CFG as num_bits = 4 (its
``estimate_quant_compression``), scales free. Every system is measured in both
(:func:`recipes.search.formats.model_weight_bits` reads them off the quantized model), and compared with
the other at the same count. For each budget (default 6.4 and 4):

* ours, ``stablequant quantize --budget-bits B`` (``--mixed-score auto``: allocated by dev KL and
  by dev CTC-loss change, the lower dev WER kept; scales counted; the first run pays for the
  default recipe's W8A8 run and the sensitivities, later ones resume from the same state), and
  the same with ``--block-scale-bits 0`` (ModelOpt's count);
* the test WER of the re-applied config's torch fake-quant model, the exported ONNX (packed INT4
  weights, block scales) with its size and ONNX Runtime test WER;
* ``mtq.auto_quantize`` with StableQuant's INT8 format beside NVIDIA's INT8 and INT4 (block 128,
  weight-only) formats, gradient scores from the CTC loss on the calibration set: at
  ``effective_bits`` B (its count), and at the largest target whose scales-counted bits are <= B
  (target lowered by the overshoot, at most 4 tries; none where even the smallest overshoots);
* paired-bootstrap 95 % intervals (test utterances, 1000 resamples) of ours minus auto_quantize
  at each count.

Every decision uses calib/dev only; WERs are on the shipped test set (150 utterances).

    OMP_NUM_THREADS=1 python benchmarks/bench_mixed.py [--budgets 6.4 4] [--work runs/bench_mixed]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "mixed_demo.json"
TARGETS = {"6.4": {"compression": 5.0, "wer_rise": 0.3}, "4.0": {"compression": 8.0, "wer_rise": 1.0}}


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[6.4, 4.0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_mixed"))
    ap.add_argument("--skip-autoquant", action="store_true")
    ap.add_argument("--test", default=None, help="test set (index.tsv or folder) instead of the shipped one")
    ap.add_argument("--results", default=str(RESULTS), help="JSON written here, the table beside it (.md)")
    ap.add_argument("--candidates", action="store_true",
                    help="also test the allocation of the score the search did not keep (its own resumed run)")
    a = ap.parse_args(argv)

    import torch

    import sq_plugin
    from recipes.cli import main as cli
    from recipes.data.readers import make_batches, open_dataset
    from recipes.demo import demo_data
    from recipes.evaluation.asr import forward_logits, paired_bootstrap
    from recipes.export.onnx import export_onnx
    from recipes.export.onnx_runner import run_eval_onnx
    from recipes.report import markdown_table
    from recipes.runtime.atomic import write_json_atomic, write_text_atomic
    from recipes.search.allocation import SCORES
    from recipes.search.autoquant import run_auto_quantize
    from recipes.search.engine import DevScorer
    from recipes.search.fastquant import fast_fake_quant
    from recipes.search.formats import model_weight_bits
    from recipes.search.layerwise import LogitDivergence
    from recipes.search.qconfig import load_config, quantize_copy
    from recipes.speech.models import resolve_model

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sm = resolve_model("demo")
    calib = make_batches(open_dataset(demo_data("calib")), sm)
    results = Path(a.results)
    test = make_batches(open_dataset(a.test or demo_data("test")), sm)
    dev = make_batches(open_dataset(demo_data("dev")), sm)
    scorer, dev_scorer = DevScorer(sm, test), DevScorer(sm, dev)

    def errors(model, on=None):
        on = on or scorer
        with torch.inference_mode(), fast_fake_quant(model):
            return on.errors([forward_logits(model, b) for b in on.batches])

    with torch.inference_mode():
        fp32_dev = [forward_logits(sm.model, b) for b in dev]
    dev_kl = LogitDivergence(fp32_dev)

    def dev_scores(model) -> dict:
        """Dev WER and dev KL to fp32 (our search's score): where a test gap shows before the test."""
        with torch.inference_mode(), fast_fake_quant(model):
            logits = [forward_logits(model, b) for b in dev]
        return {"dev_wer": dev_scorer.wer(logits), "dev_kl": dev_kl(logits)}

    fp32_err = errors(sm.model)
    fp32_wer = fp32_err.wer
    fp32_onnx = export_onnx(sm, work / "fp32.onnx", allow_fp32=True)
    out = {"fp32": {"test_wer": fp32_wer, "dev_wer": dev_scorer.wer(fp32_dev), "onnx_bytes": fp32_onnx["size_bytes"]},
           "budgets": {},
           "bit_counts": {"scales": "grid bits + 16 per block scale (fp16) of block formats; float 16",
                          "grid": "grid bits only (ModelOpt 0.47 auto_quantize: INT4_BLOCKWISE = 4); float 16"}}
    state_dir = work / "search"
    utt_errors = {}

    def bits_of(model) -> dict:
        return {"scales": model_weight_bits(model), "grid": model_weight_bits(model, 0)}

    def ours(budget: float, scale_bits: float) -> tuple[dict, object]:
        run_dir = work / f"budget_{budget}" if scale_bits == 16 else work / f"budget_{budget}_s{scale_bits:g}"
        run_dir.mkdir(exist_ok=True)
        for name in ("state.json", "state_w8a8.json"):  # share the budget-free search state
            if (state_dir / name).exists():
                (run_dir / name).write_bytes((state_dir / name).read_bytes())
        start = time.perf_counter()
        resume = (run_dir / "state.json").exists()
        args = ["quantize", "--model", "demo", "--budget-bits", str(budget), "--block-scale-bits", f"{scale_bits:g}",
                "--out", str(run_dir), "--overwrite"]
        if cli(args + (["--resume"] if resume else [])) != 0:
            raise SystemExit(f"quantize --budget-bits {budget} failed")
        seconds = time.perf_counter() - start
        state_dir.mkdir(exist_ok=True)
        for name in ("state.json", "state_w8a8.json"):
            (state_dir / name).write_bytes((run_dir / name).read_bytes())
        report = json.loads((run_dir / "report.json").read_text())
        qsm = quantize_copy(sm, load_config(run_dir / "modelopt_config.json"), calib)  # the config, re-applied
        err = errors(qsm.model)
        row = {"block_scale_bits": scale_bits, "avg_weight_bits": report["avg_weight_bits"],
               "avg_weight_bits_no_scales": report["avg_weight_bits_no_scales"], "bits": bits_of(qsm.model),
               "compression_vs_fp32": report["compression_vs_fp32"],
               "dev_wer": report["final_wer"], "dev_fp32_wer": report["float_wer"],
               "dev_wer_reapplied": errors(qsm.model, dev_scorer).wer, "dev_kl": report["final_kl"],
               "test_wer": err.wer, "search_seconds": report["meta"]["seconds"],
               "search_phases": report["seconds"], "resumed": resume, "run_seconds": round(seconds, 1),
               "score": report["score"], "score_reason": report["score_reason"],
               "candidates": {k: {f: v[f] for f in ("dev_wer", "dev_kl", "dev_ctc", "avg_weight_bits", "formats")}
                              for k, v in report["candidates"].items()},
               "formats": {}}
        for c in report["choices"]:
            key = c["format"] + (f" g{c['block'][1]}" if c.get("block") else "")
            row["formats"][key] = row["formats"].get(key, 0) + 1
        if a.candidates:  # the other score's allocation, from a resumed run of the same search
            row["candidate_test_wer"] = {report["score"]: err.wer}
            count = "scales" if scale_bits == 16 else "grid"
            utt_errors[str(float(budget)), f"ours_{report['score']}", count] = err
            for other in sorted(set(SCORES) - {report["score"]}):
                other_dir = run_dir / f"score_{other}"
                other_dir.mkdir(exist_ok=True)
                for name in ("state.json", "state_w8a8.json"):
                    (other_dir / name).write_bytes((run_dir / name).read_bytes())
                if cli(args[:-3] + ["--out", str(other_dir), "--overwrite", "--resume", "--mixed-score", other]) != 0:
                    raise SystemExit(f"quantize --budget-bits {budget} --mixed-score {other} failed")
                o_err = errors(quantize_copy(sm, load_config(other_dir / "modelopt_config.json"), calib).model)
                row["candidate_test_wer"][other] = o_err.wer
                utt_errors[str(float(budget)), f"ours_{other}", count] = o_err
        info = export_onnx(qsm, work / f"mixed_{budget}_s{scale_bits:g}.onnx")
        ort = run_eval_onnx(info["path"], data=a.test, model="demo", progress=False, print_table=False)
        row.update(onnx_bytes=info["size_bytes"], onnx_int4_weights=info["int4_weights"],
                   onnx_smaller_than_fp32=fp32_onnx["size_bytes"] / info["size_bytes"], onnx_test_wer=ort["wer"])
        return row, err

    def auto_quantize(target: float) -> tuple[dict, object]:
        start = time.perf_counter()
        aq, state = run_auto_quantize(sm, calib, target, [sq_plugin.STABLEQUANT_INT8_CFG, "INT8_DEFAULT_CFG",
                                                          "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"])
        chosen: dict[str, int] = {}
        for r in state["best"]["recipe"].values():
            name = str(r).split("(")[0]
            name = {"CUSTOM_0": "stablequant INT8"}.get(name, name)
            chosen[name] = chosen.get(name, 0) + 1
        err = errors(aq.model)
        return {"target": target, "effective_bits": state["best"]["constraints"]["effective_bits"],
                "bits": bits_of(aq.model), "test_wer": err.wer, **dev_scores(aq.model), "formats": chosen,
                "seconds": round(time.perf_counter() - start, 1)}, err

    for budget in a.budgets:
        key = str(float(budget))
        row = {}
        for count, scale_bits in (("scales", 16.0), ("grid", 0.0)):
            row[f"ours_{count}"], utt_errors[key, "ours", count] = ours(budget, scale_bits)
            print(json.dumps({key: row[f"ours_{count}"]}, indent=1, default=str), flush=True)
        if not a.skip_autoquant:
            last, err = auto_quantize(budget)
            row["aq_grid"], utt_errors[key, "aq", "grid"] = last, err
            fits, tries, target = last["bits"]["scales"] <= budget + 1e-9, [], budget
            while not fits and len(tries) < 4:  # lower the target by the overshoot until it fits
                target = round(target - (last["bits"]["scales"] - budget), 3)
                if target < 4.0:  # below its smallest format's count: nothing fits
                    break
                last, err = auto_quantize(target)
                tries.append({k: last[k] for k in ("target", "bits", "test_wer", "dev_wer", "dev_kl")})
                fits = last["bits"]["scales"] <= budget + 1e-9
            row["aq_scales"] = last if fits else None
            row["aq_scales_tries"] = tries
            if fits:
                utt_errors[key, "aq", "scales"] = err
            for count in ("scales", "grid"):
                if row.get(f"aq_{count}") is not None:
                    a_err, b_err = utt_errors[key, "ours", count], utt_errors[key, "aq", count]
                    row[f"ours_minus_aq_{count}"] = paired_bootstrap(a_err.word_edits, b_err.word_edits,
                                                                     a_err.words, 1000, 0)
                    for sc in SCORES:  # each score's own allocation (with --candidates)
                        c_err = utt_errors.get((key, f"ours_{sc}", count))
                        if c_err is not None:
                            row.setdefault(f"candidate_minus_aq_{count}", {})[sc] = paired_bootstrap(
                                c_err.word_edits, b_err.word_edits, c_err.words, 1000, 0)
        out["budgets"][key] = row
        print(json.dumps({key: row}, indent=1, default=str), flush=True)
    out["test_set"] = a.test or "shipped demo test set"
    write_json_atomic(results, out)

    def fmt(formats):
        return ", ".join(f"{k} ×{n}" for k, n in formats.items())

    rows = []
    for b, r in out["budgets"].items():
        for count, label in (("scales", "block scales counted"), ("grid", "ModelOpt's count")):
            o = r[f"ours_{count}"]
            rows.append([f"ours, budget {b} ({label}; allocated by {o['score']})", f"{o['bits']['scales']:.3f}",
                         f"{o['bits']['grid']:.3f}",
                         f"{32 / o['bits']['scales']:.2f}×", f"{o['dev_wer']:.2f}", f"{o['dev_kl']:.5f}", o["test_wer"],
                         f"{o['test_wer'] - fp32_wer:+.2f}", o["onnx_test_wer"], f"{o['onnx_smaller_than_fp32']:.2f}×",
                         fmt(o["formats"])])
            q = r.get(f"aq_{count}")
            if q is None and f"aq_{count}" in r:
                rows.append([f"auto_quantize at {b} ({label})", "-", "-", "-", "-", "-", "infeasible", "-", "-", "-",
                             "its smallest format overshoots the budget once scales are counted"])
            elif q is not None:
                rows.append([f"auto_quantize, effective_bits {q['target']} ({label} ≤ {b})",
                             f"{q['bits']['scales']:.3f}", f"{q['bits']['grid']:.3f}",
                             f"{32 / q['bits']['scales']:.2f}×",
                             f"{q['dev_wer']:.2f}", f"{q['dev_kl']:.5f}", q["test_wer"],
                             f"{q['test_wer'] - fp32_wer:+.2f}", "-", "-", fmt(q["formats"])])
    md = markdown_table(["system", "bits/weight, scales counted", "bits/weight, ModelOpt's count",
                         "smaller than fp32 (scales counted)", "dev WER %", "dev KL to fp32", "test WER %",
                         "Δ vs fp32", "ONNX Runtime test WER %", "ONNX smaller than fp32 ONNX", "formats"], rows)
    cis = []
    for b, r in out["budgets"].items():
        for count, label in (("scales", "block scales counted"), ("grid", "ModelOpt's count")):
            o = r[f"ours_{count}"]
            cands = "; ".join(f"{k}: dev WER {v['dev_wer']:.2f}, dev KL {v['dev_kl']:.5f}, "
                              f"dev CTC Δ {v['dev_ctc']:+.4f}"
                              for k, v in o["candidates"].items())
            cis.append(f"* budget {b}, {label}: candidates {cands} → {o['score']} ({o['score_reason']})")
    for b, r in out["budgets"].items():
        for count, label in (("scales", "block scales counted"), ("grid", "ModelOpt's count")):
            ci = r.get(f"ours_minus_aq_{count}")
            if ci:
                cis.append(f"* budget {b}, {label}: ours − auto_quantize = {ci['diff']:+.2f} "
                           f"[{ci['low']:+.2f}, {ci['high']:+.2f}] test WER points (paired bootstrap 95 %)")
            o = r[f"ours_{count}"]
            for sc, tw in o.get("candidate_test_wer", {}).items():
                c = r.get(f"candidate_minus_aq_{count}", {}).get(sc)
                vs = f"; {sc} − auto_quantize = {c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]" if c else ""
                kept = " (kept)" if sc == o["score"] else " (not kept)"
                cis.append(f"* budget {b}, {label}: allocation by {sc}{kept}: test WER {tw:.2f}{vs}")
    write_text_atomic(results.with_suffix(".md"), f"test set: {out['test_set']}\n\nfp32 test WER {fp32_wer:.2f}, "
                      f"dev WER {out['fp32']['dev_wer']:.2f}, fp32 ONNX "
                      f"{fp32_onnx['size_bytes'] / 2**20:.2f} MiB\n\n{md}\n\n" + "\n".join(cis) + "\n")
    print(md)
    print("\n".join(cis))


if __name__ == "__main__":
    main()
