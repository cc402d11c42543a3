"""Device and multi-rank cost of the search, measured side by side in one run.

    python benchmarks/bench_gpu.py                       # CUDA: hubert-large + wav2vec2-large shapes
    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py     # no CUDA: the demo model's shape on the CPU
    python benchmarks/bench_gpu.py --shapes hubert:large --dev 64 --ranks 2

Per shape (random weights from the real configs, synthetic audio of 8-12 s; ``demo``: the shipped
model on its dev set):

1. calibration collecting StableQuant histograms vs ModelOpt MAX calibration (same batches,
   alternated, best of ``--repeats``); target <= 1.5x;
2. Stage 1 of the paper recipe (one-point Stage-2 grid) vs the sum of its suffix forwards (the
   same cut points run in float with every prefix cache already built: the floor for Stage 1;
   alternated, best of ``--repeats``; wall and CPU seconds);
   target <= 1.2x; peak memory of the recipe (GPU: max allocated; CPU: process max RSS);
3. Stage 1 under ``torchrun`` with 1 rank vs N ranks (same worker, 1 thread per rank on the CPU,
   one GPU per rank on CUDA; skipped where fewer GPUs than ranks); target: 2 ranks >= 1.8x.

Writes benchmarks/results/bench_gpu_<cuda|cpu>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("THE", "QUANT", "SPEECH", "MODEL", "LAYER", "SCALE", "NOISE", "VOICE", "RANGE", "CLIP")


def workload(shape: str, dev_n: int, calib_n: int, device, seed: int = 0):
    """(speech model on device, calib batches, dev batches) for ``arch:shape`` or ``demo``."""
    import numpy as np

    from recipes.api import as_batches
    from recipes.data.readers import make_batches, open_dataset
    from recipes.runtime.device import batches_to, to_device
    from recipes.speech.models import random_model, remove_weight_norm, resolve_model
    from recipes.workflows import demo_split

    if shape == "demo":
        sm = resolve_model("demo")
        calib = make_batches(open_dataset(demo_split("calib")), sm, limit=calib_n, seed=seed)
        dev = make_batches(open_dataset(demo_split("dev")), sm, limit=dev_n, seed=seed)
    else:
        arch, size = shape.split(":")
        sm = random_model(size, arch, seed=seed)
        remove_weight_norm(sm.model)
        rng = np.random.default_rng(seed)

        def pairs(n):  # 8-12 s in whole seconds, so equal lengths share batches
            return [(rng.standard_normal(16000 * int(rng.integers(8, 13))).astype(np.float32) * 0.1,
                     " ".join(rng.choice(WORDS, size=int(rng.integers(15, 30))))) for _ in range(n)]

        calib, dev = as_batches(pairs(calib_n), sm), as_batches(pairs(dev_n), sm)
    to_device(sm, device)
    return sm, batches_to(calib, device), batches_to(dev, device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibration_times(sm, calib, device, repeats: int) -> dict:
    """Seconds of one calibration (``mtq.quantize`` on a copy, best of repeats, alternated):
    ModelOpt MAX; our histograms collected (amax = their max: the collection cost); the recipe's
    whole calibration (histograms + StableQuant/MSE search for every activation quantizer)."""
    import sq_plugin
    from recipes.search.calibrate import base_config
    from recipes.search.engine import Settings
    from recipes.search.qconfig import quant_cfg, quantize_copy

    collect = quant_cfg(8, 8)
    collect[2] = {"quantizer_name": "*input_quantizer",
                  "cfg": {"num_bits": 8, "axis": None, "calibrator": sq_plugin.calibrator("max")}}
    configs = {"max": {"quant_cfg": quant_cfg(8, 8), "algorithm": "max"},
               "histogram": {"quant_cfg": collect, "algorithm": "max"},
               "recipe": base_config(Settings())}
    best = {k: float("inf") for k in configs}
    for _ in range(repeats):
        for name, config in configs.items():  # alternated, so both see the same machine load
            _sync(device)
            start = time.perf_counter()
            qsm = quantize_copy(sm, config, calib)
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
            del qsm
    return {"histogram_s": round(best["histogram"], 3), "max_s": round(best["max"], 3),
            "ratio": round(best["histogram"] / best["max"], 2), "recipe_calibration_s": round(best["recipe"], 3),
            "recipe_ratio": round(best["recipe"] / best["max"], 2)}


@contextmanager
def cpu_seconds_per_phase():
    """Also record the CPU seconds of each recipe phase (robust to other jobs on a shared
    machine when torch runs one thread): yields the dict the phases land in."""
    from recipes.search import engine

    cpu_seconds: dict[str, float] = {}

    class Clock(engine.PhaseClock):
        def __init__(self):
            super().__init__()
            self._cpu = time.process_time()

        def lap(self, phase: str) -> None:
            super().lap(phase)
            now = time.process_time()
            cpu_seconds[phase], self._cpu = now - self._cpu, now

    original, engine.PhaseClock = engine.PhaseClock, Clock
    try:
        yield cpu_seconds
    finally:
        engine.PhaseClock = original


def _suffix_forwards(result, dev, device) -> tuple[float, float]:
    """(wall, CPU) seconds of the Stage-1 cut points run in float, every prefix cache built."""
    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer

    from recipes.evaluation.asr import forward_logits
    from recipes.search.reuse import PrefixRunner

    model = result.model.model
    for module in model.modules():  # float: every quantizer off
        if isinstance(module, TensorQuantizer):
            module.disable()
    runner = PrefixRunner(model, forward_logits, dev)
    wall = cpu = 0.0
    with torch.inference_mode():
        for row in result.stage1:
            runner.run(row.layer)  # builds this cut's caches (not counted)
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            runner.run(row.layer)
            _sync(device)
            wall += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
    runner.clear()
    return wall, cpu


def stage1_vs_suffix_forwards(sm, calib, dev, device, repeats: int) -> dict:
    """Stage 1 of the paper recipe vs the sum of the same suffix forwards in float, caches built;
    alternated ``repeats`` times, best of each (wall and CPU seconds taken separately)."""
    import torch

    from recipes.search.engine import Settings
    from recipes.search.paper import run_stablequant

    best = {"stage1": float("inf"), "stage1_cpu": float("inf"), "suffix": float("inf"), "suffix_cpu": float("inf")}
    peak = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with cpu_seconds_per_phase() as cpu:
            result = run_stablequant(sm, calib, dev, Settings(grid=[0.0]), progress=False)
        if device.type == "cuda":
            peak = max(peak or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
        suffix, suffix_cpu = _suffix_forwards(result, dev, device)
        for key, value in (("stage1", result.seconds["stage1"]), ("stage1_cpu", cpu["stage1"]),
                           ("suffix", suffix), ("suffix_cpu", suffix_cpu)):
            best[key] = min(best[key], value)
    return {"activation_quantizers": len(result.stage1), "repeats": repeats, "stage1_s": round(best["stage1"], 3),
            "suffix_forwards_s": round(best["suffix"], 3), "ratio": round(best["stage1"] / best["suffix"], 2),
            "stage1_cpu_s": round(best["stage1_cpu"], 3), "suffix_forwards_cpu_s": round(best["suffix_cpu"], 3),
            "cpu_ratio": round(best["stage1_cpu"] / best["suffix_cpu"], 2),
            "per_quantizer_s": round(best["stage1"] / len(result.stage1), 4), "marked": result.marked,
            "phases_s": result.seconds, "peak_gpu_mib": None if peak is None else round(peak, 1)}


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    """One torchrun rank: the paper recipe's Stage 1 on the shared workload; each rank writes its
    wall and CPU seconds (CPU time = the work this rank did, whatever else runs on the machine)."""
    import torch

    from recipes.runtime.device import resolve_device
    from recipes.runtime.distributed import init_ranks, ranks_from_env
    from recipes.search import engine, paper

    device = resolve_device(args.device, ranks_from_env().local_rank)
    ranks = init_ranks(device)
    torch.manual_seed(0)
    sm, calib, dev = workload(args.shape, args.dev, args.calib, device)
    with cpu_seconds_per_phase() as cpu_seconds:
        result = paper.run_stablequant(sm, calib, dev, engine.Settings(grid=[0.0]), progress=False)
    Path(f"{args.worker}.rank{ranks.rank}").write_text(json.dumps({
        "stage1_s": result.seconds["stage1"], "stage1_cpu_s": cpu_seconds["stage1"], "marked": result.marked,
        "stage1_wer": [r.wer for r in result.stage1], "threads": torch.get_num_threads()}))


def ranks_vs_one(shape: str, args, device) -> dict:
    """Stage 1 under torchrun with 1 rank and with ``args.ranks`` ranks, same worker, one after the other."""
    import torch

    if device.type == "cuda" and torch.cuda.device_count() < args.ranks:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s) for {args.ranks} ranks"}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.ranks):
            path = Path(tmp) / f"ranks{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   str(Path(__file__).resolve()), "--worker", str(path), "--shape", shape, "--dev", str(args.dev),
                   "--calib", str(args.calib), "--device", args.device]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"torchrun with {n} rank(s) failed:\n{run.stderr[-3000:]}")
            out[n] = [json.loads(Path(f"{path}.rank{r}").read_text()) for r in range(n)]
    one, many = out[1][0], out[args.ranks]
    busiest = max(r["stage1_cpu_s"] for r in many)
    return {"ranks": args.ranks, "one_rank_s": round(one["stage1_s"], 3),
            "n_ranks_s": round(many[0]["stage1_s"], 3), "speedup": round(one["stage1_s"] / many[0]["stage1_s"], 2),
            "one_rank_cpu_s": round(one["stage1_cpu_s"], 3),
            "n_ranks_cpu_s_per_rank": [round(r["stage1_cpu_s"], 3) for r in many],
            "work_split": round(one["stage1_cpu_s"] / busiest, 2),
            "same_decisions": all(one["marked"] == r["marked"] and one["stage1_wer"] == r["stage1_wer"]
                                  for r in many),
            "threads_per_rank": one["threads"], "load_average_1min": round(os.getloadavg()[0], 2)}


def print_table(shape: str, device: str, dev_n: int, row: dict) -> None:
    c, s, r = row.get("calibration"), row.get("stage1"), row.get("ranks", {})
    lines = []
    if c:
        lines += [("calibration: histograms vs MAX", c["histogram_s"], c["max_s"], c["ratio"], "<= 1.5x"),
                  ("  + range search of every quantizer", c["recipe_calibration_s"], c["max_s"], c["recipe_ratio"], "")]
    if s:
        lines += [("Stage 1 vs sum of suffix forwards (wall)", s["stage1_s"], s["suffix_forwards_s"], s["ratio"],
                   "<= 1.2x"),
                  ("  the same in CPU seconds", s["stage1_cpu_s"], s["suffix_forwards_cpu_s"], s["cpu_ratio"],
                   "(robust to other jobs on the machine)")]
    if "speedup" in r:
        lines += [(f"Stage 1, 1 rank / {r['ranks']} ranks (wall)", r["one_rank_s"], r["n_ranks_s"], r["speedup"],
                   f">= 1.8x (same decisions: {r['same_decisions']})"),
                  (f"  CPU-s, 1 rank / busiest of {r['ranks']}", r["one_rank_cpu_s"], max(r["n_ranks_cpu_s_per_rank"]),
                   r["work_split"], f"speedup on {r['ranks']} idle cores; load avg {r['load_average_1min']}")]
    elif r:
        lines.append((f"ranks: {r['skipped']}", float("nan"), float("nan"), float("nan"), ""))
    print(f"\n{shape} on {device} ({dev_n} dev utterances, {row['dev_audio_s']} s of audio):")
    print(f"  {'measure':44s} {'a':>9s} {'b':>9s} {'a/b':>6s}  target")
    for label, x, y, ratio, target in lines:
        print(f"  {label:44s} {x:8.2f}s {y:8.2f}s {ratio:5.2f}x  {target}")
    if s:
        print(f"  peak memory: GPU {s['peak_gpu_mib']} MiB (max allocated), process RSS {row['peak_rss_mib']} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="arch:size (hubert:large, wav2vec2:large, wav2vec2:base) or demo; "
                             "default: the two large shapes on CUDA, demo on the CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dev", type=int, default=None, help="dev utterances (default 64 on CUDA, 40 on CPU)")
    parser.add_argument("--calib", type=int, default=None, help="calibration utterances (default 32 / 16)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-ranks", action="store_true")
    parser.add_argument("--only-ranks", action="store_true", help="only the N ranks vs 1 measurement")
    parser.add_argument("--out", default=None,
                        help="results JSON (default benchmarks/results/bench_gpu_<cuda|cpu>.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    from recipes.runtime.device import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.dev = args.dev or (64 if cuda else 40)
    args.calib = args.calib or (32 if cuda else 16)
    if args.worker:
        worker(args)
        return
    from recipes.runtime.atomic import write_json_atomic

    shapes = args.shapes or (["hubert:large", "wav2vec2:large"] if cuda else ["demo"])
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "dev_utterances": args.dev, "calib_utterances": args.calib, "shapes": {}}
    for shape in shapes:
        torch.manual_seed(0)
        sm, calib, dev = workload(shape, args.dev, args.calib, device)
        row = {"dev_audio_s": round(dev.seconds, 1)}
        if not args.only_ranks:
            row["calibration"] = calibration_times(sm, calib, device, args.repeats)
            row["stage1"] = stage1_vs_suffix_forwards(sm, calib, dev, device, args.repeats)
            row["peak_rss_mib"] = round(_max_rss_mib(), 1)
        del sm, calib, dev
        if not args.skip_ranks:
            row["ranks"] = ranks_vs_one(shape, args, device)
        result["shapes"][shape] = row
        print_table(shape, result["device"], args.dev, row)
    out = (Path(args.out) if args.out
           else ROOT / "benchmarks" / "results" / f"bench_gpu_{'cuda' if cuda else 'cpu'}.json")
    write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
