"""Before/after check of a refactoring: the demo's quantize (default, paper), --budget-bits and compare
write the same configs and figures at two revisions.

    python benchmarks/same_outputs.py --base ea3eb22 [--head HEAD] [--limit 8]

Each revision is checked out into a temporary git worktree and run in a fresh process with the
worktree first on PYTHONPATH (same venv, same data, same seeds); the JSON outputs are compared
with timings and paths left out. Prints one line per output and a JSON summary; exit 1 on a
difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "demo", "--grid", "0,0.1,0.2", "--num-bins", "512"]
RUNS = {  # name -> (argv after the sub-command, files compared)
    "quantize_default": (["quantize", *COMMON], ["report.json", "modelopt_config.json"]),
    "quantize_paper": (["quantize", *COMMON, "--recipe", "paper"], ["report.json", "modelopt_config.json"]),
    "budget_bits_6": (["quantize", *COMMON, "--budget-bits", "6"], ["report.json", "modelopt_config.json"]),
    "compare": (["compare", *COMMON, "--bits", "8", "--budgets", "6"], ["compare.json"]),
}
VOLATILE = ("seconds", "elapsed", "model", "source", "device", "rtf")


def plain(value):
    """JSON without what legitimately differs between two runs: timings and file paths."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not any(k.endswith(s) for s in VOLATILE)}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def run_revision(rev: str, work: Path, limit: int) -> dict:
    tree = work / f"tree-{rev}"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), rev], cwd=ROOT, check=True,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    outputs = {}
    try:
        for name, (argv, files) in RUNS.items():
            out = work / rev / name
            code = ("import sys, recipes; assert recipes.__file__.startswith(sys.argv[1]), recipes.__file__; "
                    "from recipes.cli import main; sys.exit(main(sys.argv[2:]))")
            cmd = [sys.executable, "-c", code, str(tree), *argv, "--limit", str(limit), "--out", str(out)]
            print(f"[{rev}] {name}", flush=True)
            # cwd: the tree (python -c puts the working directory first on sys.path)
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=tree)
            outputs[name] = {f: plain(json.loads((out / f).read_text())) for f in files}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    return outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="revision before the change")
    parser.add_argument("--head", default="HEAD", help="revision after it (default HEAD)")
    parser.add_argument("--limit", type=int, default=8, help="utterances per data set")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = run_revision(args.base, Path(tmp), args.limit)
        after = run_revision(args.head, Path(tmp), args.limit)
    summary = {}
    for name in RUNS:
        for f in before[name]:
            same = before[name][f] == after[name][f]
            summary[f"{name}/{f}"] = same
            print(f"{'same' if same else 'DIFFERENT':9s} {name}/{f}")
    print(json.dumps({"base": args.base, "head": args.head, "limit": args.limit, "same": summary}, indent=1))
    return 0 if all(summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
