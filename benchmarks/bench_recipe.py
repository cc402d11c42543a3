"""Recipe cost, measured side by side in one run on the same model, calibration and dev data.

    python benchmarks/bench_recipe.py [--model demo] [--bits 8 6] [--skip-stage1]

1. Stage 1 with the cached float prefix vs a naive whole-model re-run per layer (one-point
   Stage-2 grid so the Stage-1 times compare like with like; the marks must be identical).
2. The default recipe vs ``--recipe paper`` (51-point grid), per bit width: wall time of each,
   their ratio (target <= 1.5), evaluations, and the dev WER each reached.
Writes benchmarks/results/bench_recipe.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6])
    parser.add_argument("--skip-stage1", action="store_true", help="skip the reuse-vs-naive Stage-1 runs")
    args = parser.parse_args()

    import torch

    from recipes.data.readers import make_batches, open_dataset
    from recipes.runtime.atomic import write_json_atomic
    from recipes.search.engine import Settings
    from recipes.search.layerwise import run_layerwise
    from recipes.search.paper import run_stablequant
    from recipes.speech.models import resolve_model
    from recipes.workflows import demo_split

    torch.manual_seed(0)
    sm = resolve_model(args.model)
    calib = make_batches(open_dataset(demo_split("calib")), sm)
    dev = make_batches(open_dataset(demo_split("dev")), sm)
    result = {"model": args.model, "dev_utterances": dev.num_utterances, "dev_seconds": round(dev.seconds, 1),
              "torch_threads": torch.get_num_threads()}
    if not args.skip_stage1:
        runs = {}
        for name, naive in (("reuse", False), ("naive", True)):
            s = Settings(wbits=args.bits[0], abits=args.bits[0], grid=[0.0], naive_stage1=naive)
            r = run_stablequant(sm, calib, dev, s, progress=False)
            runs[name] = {"stage1_seconds": r.seconds["stage1"], "marked": r.marked,
                          "stage1_wer": [x.wer for x in r.stage1]}
        result["stage1"] = {
            "bits": args.bits[0], "reuse_s": runs["reuse"]["stage1_seconds"],
            "naive_s": runs["naive"]["stage1_seconds"],
            "speedup": round(runs["naive"]["stage1_seconds"] / runs["reuse"]["stage1_seconds"], 2),
            "same_marks_and_wers": runs["reuse"]["marked"] == runs["naive"]["marked"]
            and runs["reuse"]["stage1_wer"] == runs["naive"]["stage1_wer"],
            "marked": runs["reuse"]["marked"]}
        print(f"Stage 1 W{args.bits[0]}: naive {result['stage1']['naive_s']:.1f} s, reuse "
              f"{result['stage1']['reuse_s']:.1f} s -> {result['stage1']['speedup']}x, same marks and WERs: "
              f"{result['stage1']['same_marks_and_wers']}")
    result["recipes"] = {}
    print(f"{'bits':5s} {'paper s':>8s} {'default s':>10s} {'ratio':>6s} {'evals p/d':>10s} "
          f"{'dev WER p/d':>13s} {'fp32':>6s}")
    for bits in args.bits:
        row = {}
        for name, recipe in (("paper", run_stablequant), ("default", run_layerwise)):
            start = time.perf_counter()
            r = recipe(sm, calib, dev, Settings(wbits=bits, abits=bits), progress=False)
            row[name] = {"seconds": round(time.perf_counter() - start, 1), "phases_s": r.seconds,
                         "evaluations": r.evaluations, "dev_wer": r.final_wer}
        row["ratio_default_over_paper"] = round(row["default"]["seconds"] / row["paper"]["seconds"], 2)
        row["fp32_dev_wer"] = r.float_wer
        result["recipes"][str(bits)] = row
        print(f"W{bits}A{bits} {row['paper']['seconds']:8.1f} {row['default']['seconds']:10.1f} "
              f"{row['ratio_default_over_paper']:6.2f} "
              f"{row['paper']['evaluations']:4d}/{row['default']['evaluations']:<5d} "
              f"{row['paper']['dev_wer']:6.2f}/{row['default']['dev_wer']:<6.2f} {r.float_wer:6.2f}")
    out = ROOT / "benchmarks" / "results" / "bench_recipe.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
