"""``--device`` and the search sharded over torch.distributed ranks (gloo on the CPU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.cli import main
from recipes.runtime.distributed import DevShard, Ranks, assign_batches, ranks_from_env

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- --device
@pytest.mark.parametrize("value,message", [("gpu", "is not a device"), ("cuda:x", "is not a device"),
                                           ("cpu:0", "is not a device")])
def test_bad_device_refused_at_parse_time(capsys, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model", "no-such-model", "--out", "never", "--device", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and message in err and "no-such-model" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
@pytest.mark.parametrize("command", ["quantize", "compare", "eval", "export", "calibrators"])
def test_cuda_without_cuda_is_a_one_line_parse_error(capsys, command):
    extra = {"quantize": ["--out", "x"], "compare": ["--out", "x"], "export": ["--onnx", "x.onnx"]}.get(command, [])
    with pytest.raises(SystemExit) as exit_info:
        main([command, *extra, "--device", "cuda"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --device" in last and "CUDA is not available" in last


def test_auto_device_and_batches_moved_once():
    from recipes.data.readers import Batch, BatchList
    from recipes.runtime.device import batches_to, resolve_device

    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu", 0
                                                  if torch.cuda.is_available() else None)
    assert resolve_device("cpu") == torch.device("cpu")
    batches = BatchList([Batch(torch.zeros(2, 5), torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 5]),
                               ["A", "B"], ["a", "b"])], ["bad.flac"], 8000)
    moved = batches_to(batches, torch.device("cpu"))
    assert moved.skipped == ["bad.flac"] and moved.sampling_rate == 8000 and moved[0].ids == ["a", "b"]


# ------------------------------------------------------------------------------------- sharding
def test_assign_batches_balances_like_brute_force():
    """Greedy longest-first is within one largest batch of the best split (brute force over all)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        costs = [int(c) for c in rng.integers(1, 100, size=int(rng.integers(1, 9)))]
        for world in (1, 2, 3):
            owner = assign_batches(costs, world)
            assert owner == assign_batches(costs, world) and set(owner) <= set(range(world))
            load = max(sum(c for c, o in zip(costs, owner) if o == r) for r in range(world))
            best = min(max(sum(c for c, o in zip(costs, split) if o == r) for r in range(world))
                       for split in product(range(world), repeat=len(costs)))
            assert best <= load <= best + max(costs)


def test_one_rank_shard_is_the_whole_set():
    class B:
        def __init__(self, n, ids):
            self.input_values, self.ids = torch.zeros(n), ids

    batches = [B(10, ["a", "b"]), B(30, ["c"]), B(20, ["d", "e", "f"])]
    shard = DevShard(batches, Ranks())
    assert shard.positions == [0, 1, 2] and shard.rows == list(range(6))
    two = [DevShard(batches, Ranks(r, 2)) for r in (0, 1)]
    assert sorted(two[0].positions + two[1].positions) == [0, 1, 2]
    assert sorted(two[0].rows + two[1].rows) == list(range(6))


def test_torchrun_environment_is_validated(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert ranks_from_env() == Ranks(1, 2, 0)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        ranks_from_env()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one'"):
        ranks_from_env()


# ------------------------------------------------------------------------------------- 2 ranks
DECISIONS = {
    "paper": ("float_wer", "marked", "p_opt", "stage2", "final_wer", "amax", "config"),
    "default": ("float_wer", "starts", "start", "weight_calibrator", "layers", "final_kl", "final_wer",
                "amax", "config"),
    "mixed": ("float_wer", "sensitivity", "sensitivity_ctc", "candidates", "score", "choices", "final_kl",
              "final_ctc", "final_wer", "repairs", "pareto", "uniform", "config", "avg_weight_bits"),
}
RECIPES = tuple(DECISIONS)


def _argv(recipe: str, out: Path) -> list[str]:
    mixed = recipe == "mixed"  # --budget-bits: the default recipe's W8A8 run, then per-layer formats
    return ["quantize", "--model", "demo", "--limit", "6", "--recipe", "default" if mixed else recipe,
            "--grid", "0,0.05,0.5", "--num-bins", "512", "--device", "cpu", "--out", str(out),
            *(["--budget-bits", "6"] if mixed else [])]


def test_two_gloo_ranks_decide_exactly_as_one_process(tmp_path):
    """`stablequant quantize` under torchrun (2 gloo ranks, dev set sharded) = one process: same
    marked layers, p_opt, per-layer WERs, per-layer KLs and choices, amaxes, config and state file;
    for mixed precision (--budget-bits) the same per-layer KL / CTC sensitivities, calibration-set
    WERs, allocation and config; outputs written once by rank 0; the 2-rank state file resumes in
    one process."""
    code = ("import json, sys\nfrom recipes.cli import main\n"
            "for argv in json.loads(sys.argv[1]):\n    assert main(argv) == 0\n")
    runs = [_argv(recipe, tmp_path / f"two_{recipe}") for recipe in RECIPES]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--no-python", sys.executable, "-c", code, json.dumps(runs)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: a conv's float sums depend on the thread count
    try:
        for recipe in RECIPES:  # one process, meanwhile (the ranks wait on each other)
            assert main(_argv(recipe, tmp_path / f"one_{recipe}")) == 0
    finally:
        torch.set_num_threads(threads)
    out, _ = launch.communicate(timeout=600)
    assert launch.returncode == 0, out[-3000:]
    assert out.count("wrote ") == len(RECIPES), "rank 0 alone prints / writes the outputs"
    for recipe in RECIPES:
        one = json.loads((tmp_path / f"one_{recipe}" / "report.json").read_text())
        two = json.loads((tmp_path / f"two_{recipe}" / "report.json").read_text())
        assert two["meta"]["ranks"] == 2 and one["meta"]["ranks"] == 1
        for key in DECISIONS[recipe]:
            assert one[key] == two[key], (recipe, key)
        assert one["meta"]["dev"] == two["meta"]["dev"]
        if recipe == "paper":
            assert [(r["quantizer"], r["wer"], r["marked"]) for r in one["stage1"]] == \
                   [(r["quantizer"], r["wer"], r["marked"]) for r in two["stage1"]]
        for name in ("state.json", "state_w8a8.json") if recipe == "mixed" else ("state.json",):
            state = [json.loads((tmp_path / f"{n}_{recipe}" / name).read_text()) for n in ("one", "two")]
            assert state[0] == state[1], (recipe, name)
    # the 2-rank run's state resumes in one process without evaluating anything again
    assert main(_argv("paper", tmp_path / "two_paper") + ["--resume"]) == 0
    resumed = json.loads((tmp_path / "two_paper" / "report.json").read_text())
    one = json.loads((tmp_path / "one_paper" / "report.json").read_text())
    assert resumed["evaluations"] == 0 and all(resumed[k] == one[k] for k in DECISIONS["paper"])


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_recipe_on_cuda_never_waits_for_the_modelopt_extension(monkeypatch, tmp_path):
    """The whole paper recipe on CUDA runs without asking ModelOpt for its JIT-built extension."""
    from modelopt.torch.quantization import tensor_quant

    def refuse(*args, **kwargs):
        raise AssertionError("ModelOpt's CUDA extension was requested (a 61-s build on a fresh machine)")

    monkeypatch.setattr(tensor_quant, "get_cuda_ext", refuse)
    out = tmp_path / "gpu"
    assert main(["quantize", "--model", "demo", "--limit", "6", "--recipe", "paper", "--grid", "0,0.5",
                 "--device", "cuda", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["device"].startswith("cuda") and len(report["stage1"]) > 10
