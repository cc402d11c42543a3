"""Candidates side by side in one suffix forward vs one per forward, measured in one run.

    python benchmarks/bench_variants.py [--model demo] [--limit N] [--out benchmarks/results/bench_variants.json]

Same model, calibration and dev data, same process and thread count:

1. The default recipe's per-layer calibrator search: the walk's next two candidates of a layer
   scored in one forward of two copies of each dev batch (``variants_per_forward=2``, the
   default) vs one candidate per forward (``1``). Reports the phase times, their ratio, the
   evaluations, and whether every layer chose the same calibrator.
2. Mixed precision's per-layer sensitivities (every layer × format of the menu): a layer's
   formats side by side (``variants_per_forward=8``, the default) vs one per forward. Both runs
   resume the default recipe's W8A8 run of step 1 from its state file, so only the sensitivity
   phase differs. Reports the phase times, their ratio, the largest relative difference of a
   sensitivity (float rounding: a kernel may sum differently for k copies than for one) and
   whether the allocation at ``--budget`` is the same.
Writes JSON (and prints a table).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--limit", type=int, default=None, help="dev utterances (default: the whole dev set)")
    parser.add_argument("--budget", type=float, default=6.4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_variants.json"))
    args = parser.parse_args()

    import torch

    from recipes.data.readers import make_batches, open_dataset
    from recipes.report import markdown_table
    from recipes.runtime.atomic import write_json_atomic
    from recipes.search.engine import Settings
    from recipes.search.layerwise import run_layerwise
    from recipes.search.mixed import run_mixed
    from recipes.speech.models import resolve_model
    from recipes.workflows import demo_split

    torch.manual_seed(0)
    sm = resolve_model(args.model)
    calib = make_batches(open_dataset(demo_split("calib")), sm)
    dev = make_batches(open_dataset(demo_split("dev")), sm, limit=args.limit)
    result = {"model": args.model, "dev_utterances": dev.num_utterances, "dev_batches": len(dev),
              "dev_seconds": round(dev.seconds, 1), "torch_threads": torch.get_num_threads()}
    work = Path(tempfile.mkdtemp(prefix="bench_variants_"))
    try:
        w8a8 = Settings(wbits=8, abits=8)
        one = run_layerwise(sm, calib, dev, w8a8, progress=True, variants_per_forward=1)
        two = run_layerwise(sm, calib, dev, w8a8, state_path=work / "state_w8a8.json", progress=True)
        result["default_recipe_layers"] = {
            "one_per_forward_s": one.seconds["layers"], "side_by_side_s": two.seconds["layers"],
            "speedup": round(one.seconds["layers"] / two.seconds["layers"], 2),
            "evaluations_one": one.evaluations, "evaluations_side_by_side": two.evaluations,
            "same_choices": [c.chosen for c in one.layers] == [c.chosen for c in two.layers],
            "dev_wer_one": one.final_wer, "dev_wer_side_by_side": two.final_wer}

        def mixed(variants: int):
            (work / "state.json").unlink(missing_ok=True)  # sensitivities from scratch, W8A8 run resumed
            return run_mixed(sm, calib, dev, args.budget, Settings(), state_path=work / "state.json", resume=True,
                             pareto_budgets=(), score="kl", variants_per_forward=variants)

        side, single = mixed(8), mixed(1)
        rel = max(abs(side.sensitivity[l][f] - single.sensitivity[l][f]) / max(abs(single.sensitivity[l][f]), 1e-30)
                  for l in single.sensitivity for f in single.sensitivity[l] if f != "float")
        result["mixed_sensitivity"] = {
            "layer_formats": sum(len(v) - 1 for v in single.sensitivity.values()),
            "one_per_forward_s": single.seconds["sensitivity"], "side_by_side_s": side.seconds["sensitivity"],
            "speedup": round(single.seconds["sensitivity"] / side.seconds["sensitivity"], 2),
            "max_relative_difference": rel, "budget": args.budget,
            "same_allocation": [c.format for c in side.choices] == [c.format for c in single.choices]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json_atomic(Path(args.out), result)
    d, m = result["default_recipe_layers"], result["mixed_sensitivity"]
    print(markdown_table(
        ["phase", "one per forward (s)", "side by side (s)", "speedup", "same decisions"],
        [["default recipe, per-layer calibrator search", d["one_per_forward_s"], d["side_by_side_s"],
          f"{d['speedup']}×", d["same_choices"]],
         [f"mixed sensitivities ({m['layer_formats']} layer × format)", m["one_per_forward_s"], m["side_by_side_s"],
          f"{m['speedup']}×", m["same_allocation"]]]))
    print(f"largest relative difference of a sensitivity: {m['max_relative_difference']:.2e}; wrote {args.out}")


if __name__ == "__main__":
    main()
