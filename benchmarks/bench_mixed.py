"""Mixed precision on the demo: size, test WER, packed ONNX, and auto_quantize at equal bits.

For each budget (default 6.4 and 4): ``stablequant quantize --budget-bits B`` (the first budget
pays for the default recipe's W8A8 run and the sensitivities; later ones resume from the same
state), the test WER of the torch fake-quant model, the exported ONNX (packed INT4 weights)
with its size and ONNX Runtime test WER, and ``mtq.auto_quantize`` at the same effective bits
with StableQuant's INT8 format beside NVIDIA's INT8 and INT4 (block 128, weight-only) formats,
gradient scores from the CTC loss on the calibration set. Every decision uses calib/dev only;
WERs are on the shipped test set (150 utterances).

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
    a = ap.parse_args(argv)

    import torch

    import sq_plugin
    from recipes.asr import forward_logits
    from recipes.atomic import write_json_atomic, write_text_atomic
    from recipes.autoquant import run_auto_quantize
    from recipes.cli import main as cli
    from recipes.data import make_batches, open_dataset
    from recipes.demo import demo_data
    from recipes.export import export_onnx
    from recipes.fastquant import fast_fake_quant
    from recipes.models import resolve_model
    from recipes.onnx_runner import run_eval_onnx
    from recipes.qconfig import load_config, quantize_copy
    from recipes.report import markdown_table
    from recipes.stablequant import DevScorer

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sm = resolve_model("demo")
    calib = make_batches(open_dataset(demo_data("calib")), sm)
    test = make_batches(open_dataset(demo_data("test")), sm)
    dev = make_batches(open_dataset(demo_data("dev")), sm)
    scorer, dev_scorer = DevScorer(sm, test), DevScorer(sm, dev)

    def test_wer(model, on=None) -> float:
        on = on or scorer
        with torch.inference_mode(), fast_fake_quant(model):
            return on.wer([forward_logits(model, b) for b in on.batches])

    fp32_wer = test_wer(sm.model)
    fp32_onnx = export_onnx(sm, work / "fp32.onnx", allow_fp32=True)
    out = {"fp32": {"test_wer": fp32_wer, "onnx_bytes": fp32_onnx["size_bytes"]}, "budgets": {}}
    state_dir = work / "search"
    for k, budget in enumerate(a.budgets):
        run_dir = work / f"budget_{budget}"
        run_dir.mkdir(exist_ok=True)
        for name in ("state.json", "state_w8a8.json"):  # share the budget-free search state
            if (state_dir / name).exists():
                (run_dir / name).write_bytes((state_dir / name).read_bytes())
        start = time.perf_counter()
        resume = (run_dir / "state.json").exists()
        args = ["quantize", "--model", "demo", "--budget-bits", str(budget), "--out", str(run_dir), "--overwrite"]
        if cli(args + (["--resume"] if resume else [])) != 0:
            raise SystemExit(f"quantize --budget-bits {budget} failed")
        seconds = time.perf_counter() - start
        state_dir.mkdir(exist_ok=True)
        for name in ("state.json", "state_w8a8.json"):
            (state_dir / name).write_bytes((run_dir / name).read_bytes())
        report = json.loads((run_dir / "report.json").read_text())
        qsm = quantize_copy(sm, load_config(run_dir / "modelopt_config.json"), calib)  # the config, re-applied
        row = {"avg_weight_bits": report["avg_weight_bits"], "compression_vs_fp32": report["compression_vs_fp32"],
               "dev_wer": report["final_wer"], "dev_fp32_wer": report["float_wer"],
               "dev_wer_reapplied": test_wer(qsm.model, dev_scorer),
               "test_wer": test_wer(qsm.model), "search_seconds": report["meta"]["seconds"],
               "search_phases": report["seconds"], "resumed": resume, "run_seconds": round(seconds, 1),
               "formats": {}}
        for c in report["choices"]:
            row["formats"][c["format"]] = row["formats"].get(c["format"], 0) + 1
        info = export_onnx(qsm, work / f"mixed_{budget}.onnx")
        ort = run_eval_onnx(info["path"], model="demo", progress=False, print_table=False)
        row.update(onnx_bytes=info["size_bytes"], onnx_int4_weights=info["int4_weights"],
                   onnx_smaller_than_fp32=fp32_onnx["size_bytes"] / info["size_bytes"], onnx_test_wer=ort["wer"])
        if not a.skip_autoquant:
            start = time.perf_counter()
            aq, state = run_auto_quantize(sm, calib, budget, [sq_plugin.STABLEQUANT_INT8_CFG, "INT8_DEFAULT_CFG",
                                                              "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"])
            chosen: dict[str, int] = {}
            for r in state["best"]["recipe"].values():
                name = str(r).split("(")[0]
                chosen[name] = chosen.get(name, 0) + 1
            row["auto_quantize"] = {"effective_bits": state["best"]["constraints"]["effective_bits"],
                                    "test_wer": test_wer(aq.model), "formats": chosen,
                                    "seconds": round(time.perf_counter() - start, 1)}
        out["budgets"][str(float(budget))] = row
        print(json.dumps({str(budget): row}, indent=1, default=str))
    write_json_atomic(RESULTS, out)
    rows = []
    for b, r in out["budgets"].items():
        rows.append([f"mixed, budget {b} (ours)", f"{r['avg_weight_bits']:.2f}", f"{r['compression_vs_fp32']:.2f}×",
                     r["test_wer"], f"{r['test_wer'] - fp32_wer:+.2f}", r["onnx_test_wer"],
                     f"{r['onnx_smaller_than_fp32']:.2f}×",
                     ", ".join(f"{k} ×{n}" for k, n in r["formats"].items())])
        if "auto_quantize" in r:
            q = r["auto_quantize"]
            rows.append([f"auto_quantize, {b} bits", f"{q['effective_bits']:.2f}", f"{32 / q['effective_bits']:.2f}×",
                         q["test_wer"], f"{q['test_wer'] - fp32_wer:+.2f}", "-", "-",
                         ", ".join(f"{k} ×{n}" for k, n in q["formats"].items())])
    md = markdown_table(["system", "avg weight bits", "smaller than fp32", "test WER %", "Δ vs fp32",
                         "ONNX Runtime test WER %", "ONNX smaller than fp32 ONNX", "formats"], rows)
    write_text_atomic(RESULTS.with_suffix(".md"), f"fp32 test WER {fp32_wer:.2f}, fp32 ONNX "
                      f"{fp32_onnx['size_bytes'] / 2**20:.2f} MiB\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
