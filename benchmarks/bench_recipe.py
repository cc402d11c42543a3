"""Stage 1 with the cached float prefix vs a naive whole-model re-run per layer, in one run.

    python benchmarks/bench_recipe.py [--model demo] [--bits 8]

Both runs use the same model, calibration and dev data, and a one-point Stage-2 grid so that the
printed Stage-1 times compare like with like; the marks must be identical. Also reports the
wall time of a full default ``stablequant quantize`` run (51-point grid) on the same data.
Writes benchmarks/results/bench_recipe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--skip-full", action="store_true", help="skip the full 51-point run")
    args = parser.parse_args()

    import torch

    from recipes.atomic import write_json_atomic
    from recipes.data import make_batches, open_dataset
    from recipes.models import resolve_model
    from recipes.stablequant import Settings, run_stablequant
    from recipes.workflows import demo_split

    torch.manual_seed(0)
    sm = resolve_model(args.model)
    calib = make_batches(open_dataset(demo_split("calib")), sm, batch_seconds=32)
    dev = make_batches(open_dataset(demo_split("dev")), sm, batch_seconds=32)
    runs = {}
    for name, naive in (("reuse", False), ("naive", True)):
        s = Settings(wbits=args.bits, abits=args.bits, grid=[0.0], naive_stage1=naive)
        r = run_stablequant(sm, calib, dev, s, progress=False)
        runs[name] = {"stage1_seconds": r.seconds["stage1"], "marked": r.marked,
                      "stage1_wer": [x.wer for x in r.stage1]}
    same = runs["reuse"]["marked"] == runs["naive"]["marked"] and \
        runs["reuse"]["stage1_wer"] == runs["naive"]["stage1_wer"]
    ratio = runs["naive"]["stage1_seconds"] / runs["reuse"]["stage1_seconds"]
    result = {"model": args.model, "bits": args.bits, "dev_utterances": dev.num_utterances,
              "dev_seconds": round(dev.seconds, 1), "stage1_reuse_s": runs["reuse"]["stage1_seconds"],
              "stage1_naive_s": runs["naive"]["stage1_seconds"], "stage1_speedup": round(ratio, 2),
              "same_marks_and_wers": same, "marked": runs["reuse"]["marked"]}
    if not args.skip_full:
        start = time.perf_counter()
        full = run_stablequant(sm, calib, dev, Settings(wbits=args.bits, abits=args.bits), progress=False)
        result["full_quantize_s"] = round(time.perf_counter() - start, 1)
        result["full_phases_s"] = full.seconds
        result["full_evaluations"] = full.evaluations
    print(f"{'measure':34s} value")
    for key in ("stage1_naive_s", "stage1_reuse_s", "stage1_speedup", "same_marks_and_wers",
                "full_quantize_s", "full_evaluations"):
        if key in result:
            print(f"{key:34s} {result[key]}")
    out = ROOT / "benchmarks" / "results" / "bench_recipe.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
