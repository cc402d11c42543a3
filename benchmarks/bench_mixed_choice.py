"""Which of a mixed search's candidate allocations each choice rule keeps, and how each tests.

For every run directory given (``stablequant quantize --budget-bits B --out DIR``, with the other
score's allocation in ``DIR/score_<kl|ctc>/`` as ``bench_mixed.py --candidates`` leaves it), each
candidate's ``modelopt_config.json`` is re-applied by a fresh ``mtq.quantize`` and scored on the
calibration utterances (what ``--mixed-score auto`` now compares), on dev (what it compared
before) and on the test sets. Nothing here feeds a decision; it shows what the rules would keep.

    OMP_NUM_THREADS=1 python benchmarks/bench_mixed_choice.py runs/bench_big/budget_6.4 runs/bench_big/budget_6.4_s0 \\
        --test shipped= --test big=work_data/test_big/index.tsv
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--test", action="append", default=[], help="NAME=PATH (empty PATH: the shipped test set)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "mixed_choice.json"))
    a = ap.parse_args(argv)

    import torch

    from recipes.data.readers import make_batches, open_dataset
    from recipes.demo import demo_data
    from recipes.evaluation.asr import forward_logits
    from recipes.report import markdown_table
    from recipes.runtime.atomic import write_json_atomic, write_text_atomic
    from recipes.search.engine import DevScorer
    from recipes.search.fastquant import fast_fake_quant
    from recipes.search.qconfig import load_config, quantize_copy
    from recipes.speech.models import resolve_model

    sm = resolve_model("demo")
    calib = make_batches(open_dataset(demo_data("calib")), sm)
    sets = {"calib": DevScorer(sm, calib), "dev": DevScorer(sm, make_batches(open_dataset(demo_data("dev")), sm))}
    for spec in a.test:
        name, _, path = spec.partition("=")
        sets[name] = DevScorer(sm, make_batches(open_dataset(path or demo_data("test")), sm))

    def wers(model) -> dict:
        with torch.inference_mode(), fast_fake_quant(model):
            return {k: round(s.wer([forward_logits(model, b) for b in s.batches]), 3) for k, s in sets.items()}

    out = {"fp32": wers(sm.model), "runs": {}}
    rows = [["fp32", "-", "-", *out["fp32"].values(), "-", "-"]]
    for run in map(Path, a.runs):
        report = json.loads((run / "report.json").read_text())
        dirs = {report["score"]: run, **{d.name.removeprefix("score_"): d for d in run.glob("score_*")}}
        cands = {}
        for score, d in sorted(dirs.items()):
            qsm = quantize_copy(sm, load_config(d / "modelopt_config.json"), calib)
            cands[score] = {"avg_weight_bits": json.loads((d / "report.json").read_text())["avg_weight_bits"],
                            **wers(qsm.model)}
        by_calib = min(cands, key=lambda k: (cands[k]["calib"], k != "kl"))
        by_dev = min(cands, key=lambda k: (cands[k]["dev"], k != "kl"))
        out["runs"][str(run)] = {"budget_bits": report["meta"]["budget_bits"],
                                 "block_scale_bits": report["meta"]["block_scale_bits"], "candidates": cands,
                                 "kept_by_calibration_wer": by_calib, "kept_by_dev_wer": by_dev}
        for score, c in cands.items():
            rows.append([f"{run.name}: allocated by {score}", f"{c['avg_weight_bits']:.3f}",
                         report["meta"]["block_scale_bits"], *[c[k] for k in sets],
                         "kept" if score == by_calib else "", "kept" if score == by_dev else ""])
    write_json_atomic(Path(a.results), out)
    md = markdown_table(["allocation", "avg bits (scales counted)", "block-scale bits", *[f"{k} WER %" for k in sets],
                         "new rule (calibration WER)", "old rule (dev WER)"], rows)
    write_text_atomic(Path(a.results).with_suffix(".md"), md + "\n")
    print(md)


if __name__ == "__main__":
    main()
