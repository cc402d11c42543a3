"""What each ``stablequant`` sub-command does, given its parsed arguments.

The CLI only parses; these functions load data and models, call the recipe, and write outputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from recipes.data.readers import make_batches, open_dataset
from recipes.runtime.atomic import require_writable
from recipes.runtime.device import batches_to, model_device, resolve_device, to_device
from recipes.runtime.distributed import Ranks, barrier, init_ranks, ranks_from_env
from recipes.speech.models import SpeechModel, resolve_model

log = logging.getLogger(__name__)

OUTPUT_FILES = ("report.json", "report.md", "modelopt_config.json", "model.pth", "state.json", "state_w8a8.json",
                "pareto.png",
                "activation_ranges.png", "wer_vs_cutoff.png", "compare.json", "compare.md")


def demo_split(split: str) -> Path:
    from recipes.demo import demo_data

    return Path(demo_data(split))


def start_ranks(args):
    """(device, ranks): resolve ``--device`` (one GPU per torchrun rank) and join the process group."""
    device = resolve_device(getattr(args, "device", "auto"), ranks_from_env().local_rank)
    ranks = init_ranks(device)
    log.info("rank %d/%d on %s", ranks.rank, ranks.world, device)
    return device, ranks


def load_model(args, device) -> SpeechModel:
    return to_device(resolve_model(args.model), device)


def load_batches(path: str | None, split: str, sm: SpeechModel, args, model_name: str):
    """Batches of a user data set, or of the shipped demo split when ``--model demo``, moved to the
    model's device once."""
    if path is None:
        if model_name != "demo":
            raise ValueError(f"--{split} is required unless --model demo (which ships its own {split} set)")
        path = demo_split(split)
    batches = make_batches(open_dataset(path), sm, batch_seconds=args.batch_seconds,
                           limit=args.limit, seed=args.seed, skip_bad=args.skip_bad)
    log.info("%s: %d utterances, %.1f s of audio from %s", split, batches.num_utterances, batches.seconds, path)
    return batches_to(batches, model_device(sm.model))


def prepare_out_dir(out: str, overwrite: bool, resume: bool, ranks: Ranks | None = None) -> Path:
    """Refuse to write into an existing non-empty directory unless asked; never delete anything.

    Every rank checks; rank 0 alone creates the directory / drops the old state, then all go on.
    """
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not (overwrite or resume):
        raise FileExistsError(f"output directory {out_dir} exists and is not empty: pass --overwrite "
                              "(our files are replaced, nothing else is touched) or --resume")
    require_writable(out_dir / "report.json")  # before minutes of search, not when the report is written
    barrier()  # nobody checks after rank 0 has changed the directory
    if ranks is None or ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for state in (out_dir / "state.json", out_dir / "state_w8a8.json"):
            if overwrite and not resume and state.exists():
                state.unlink()  # our own state files: a fresh run starts from scratch
    barrier()
    return out_dir


def start_search(args):
    """(device, ranks, model, calib batches, dev batches): how quantize and compare both begin,
    with torch seeded from ``--seed`` before anything is loaded."""
    torch.manual_seed(args.seed)
    device, ranks = start_ranks(args)
    sm = load_model(args, device)
    calib = load_batches(args.calib, "calib", sm, args, args.model)
    dev = load_batches(args.dev, "dev", sm, args, args.model)
    return device, ranks, sm, calib, dev


def run_quantize(args) -> dict:
    from recipes.api import run_recipe
    from recipes.report import write_quantize_outputs
    from recipes.search.engine import Settings

    device, ranks, sm, calib, dev = start_search(args)
    out_dir = prepare_out_dir(args.out, args.overwrite, args.resume, ranks)
    settings = Settings(wbits=args.wbits or args.bits, abits=args.bits, gamma=args.gamma,
                        grid=args.grid, num_bins=args.num_bins, naive_stage1=args.naive_stage1)
    if getattr(args, "budget_bits", None) is not None:
        from recipes.report import write_mixed_outputs
        from recipes.search.mixed import run_mixed_recipe

        if args.recipe != "default":
            raise ValueError("--budget-bits calibrates activations with the default recipe; drop --recipe paper")
        result, meta = run_mixed_recipe(sm, calib, dev, args.budget_bits, settings, state_path=out_dir / "state.json",
                                        resume=args.resume, seed=args.seed, progress=ranks.main,
                                        block_scale_bits=args.block_scale_bits, score=args.mixed_score,
                                        variants_per_forward=args.variants_per_forward)
        meta.update(model=str(args.model), device=str(device), ranks=ranks.world)
        if not ranks.main:  # rank 0 writes the outputs, once
            return result.to_json()
        print(write_mixed_outputs(out_dir, result, meta))
        print(f"\nwrote {out_dir}/ (report.md, report.json, modelopt_config.json, model.pth, pareto.png)")
        return result.to_json()
    result, meta = run_recipe(sm, calib, dev, settings, args.recipe, state_path=out_dir / "state.json",
                              resume=args.resume, seed=args.seed, progress=ranks.main,
                              variants_per_forward=args.variants_per_forward)
    meta.update(model=str(args.model), device=str(device), ranks=ranks.world)
    if not ranks.main:  # rank 0 writes the outputs, once
        return result.to_json()
    md = write_quantize_outputs(out_dir, result, meta)
    print(md)
    print(f"\nwrote {out_dir}/ (report.md, report.json, modelopt_config.json, model.pth, PNG plots)")
    return result.to_json()


def run_compare(args) -> dict:
    from recipes.compare import compare_methods
    from recipes.report import write_compare_outputs

    device, ranks, sm, calib, dev = start_search(args)
    test = load_batches(args.test, "test", sm, args, args.model)
    out_dir = prepare_out_dir(args.out, args.overwrite, args.resume, ranks)
    subsets = {}
    for spec in args.subset or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--subset expects NAME=DATA, got {spec!r}")
        subsets[name] = path
    if not subsets and args.test is None and args.model == "demo":
        subsets = {name: demo_split(f"test_{name}") for name in ("seen", "heldout")}
    # a subset is the test utterances whose audio files its data set lists
    test_ids = {u.path.resolve(): u.id for u in open_dataset(args.test or demo_split("test"))}
    subsets = {name: {test_ids[u.path.resolve()] for u in open_dataset(path) if u.path.resolve() in test_ids}
               for name, path in subsets.items()}
    budgets = list(getattr(args, "budgets", None) or ())
    table = compare_methods(sm, calib, dev, test, bits=args.bits, gamma=args.gamma, grid=args.grid,
                            num_bins=args.num_bins, out_dir=out_dir, resume=args.resume, subsets=subsets,
                            seed=args.seed, budgets=budgets, mixed_score=args.mixed_score)
    table.update(model=str(args.model), device=str(device), ranks=ranks.world)
    if not ranks.main:
        return table
    md = write_compare_outputs(out_dir, table)
    print(md)
    return table


def _rank0_only(command: str) -> bool:
    """eval / export are not sharded: under torchrun only rank 0 runs them."""
    ranks = ranks_from_env()
    if not ranks.main:
        log.warning("rank %d: '%s' runs on rank 0 only", ranks.rank, command)
    return ranks.main


def _one_source(args, *options: str) -> None:
    """At most one of the given options: they are different ways to get the model to run."""
    given = [o for o in options if getattr(args, o.lstrip("-").replace("-", "_"), None)]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are alternatives: give one")


def run_eval(args) -> dict | None:
    if not _rank0_only("eval"):
        return None
    _one_source(args, "--config", "--quantized", "--onnx")
    if args.onnx:
        from recipes.export.onnx_runner import run_eval_onnx

        return run_eval_onnx(args.onnx, data=args.data, model=args.model, limit=args.limit,
                             batch_seconds=args.batch_seconds, skip_bad=args.skip_bad, seed=args.seed,
                             print_table=not args.json)
    from recipes.evaluation.evaluate import run_eval as eval_model

    device = resolve_device(args.device)
    if args.quantized:
        from recipes.search.qconfig import load_quantized

        qsm = to_device(load_quantized(resolve_model(args.model), args.quantized), device)
        return eval_model(qsm, args.data, limit=args.limit, batch_seconds=args.batch_seconds,
                          skip_bad=args.skip_bad, seed=args.seed, print_table=not args.json, device=device)
    if not args.config:
        return eval_model(args.model, args.data, limit=args.limit, batch_seconds=args.batch_seconds,
                          skip_bad=args.skip_bad, seed=args.seed, print_table=not args.json, device=device)
    from recipes.search.qconfig import load_config, quantize_copy

    config = load_config(args.config)
    sm = load_model(args, device)
    calib = load_batches(args.calib, "calib", sm, args, args.model)
    qsm = quantize_copy(sm, config, calib)
    return eval_model(qsm, args.data, limit=args.limit, batch_seconds=args.batch_seconds,
                      skip_bad=args.skip_bad, seed=args.seed, print_table=not args.json, device=device)


def run_export(args) -> dict | None:
    if not _rank0_only("export"):
        return None
    from recipes.export.onnx import build_trt_engine, export_onnx, require_tensorrt
    from recipes.search.qconfig import load_config, quantize_copy

    if args.engine:
        require_tensorrt()  # before any work: without TensorRT nothing is written
    sm = resolve_model(args.model)
    onnx_path = Path(args.onnx)
    if onnx_path.exists() and not args.overwrite:
        raise FileExistsError(f"{onnx_path} exists: pass --overwrite to replace it")
    require_writable(onnx_path)
    _one_source(args, "--config", "--quantized")
    if args.quantized:
        from recipes.search.qconfig import load_quantized

        sm = load_quantized(sm, args.quantized)
    elif args.config:  # calibrate on --device, export from the CPU
        to_device(sm, resolve_device(args.device))
        calib = load_batches(args.calib, "calib", sm, args, args.model)
        sm = to_device(quantize_copy(sm, load_config(args.config), calib), "cpu")
    info = export_onnx(sm, onnx_path, allow_fp32=args.allow_fp32)
    print(json.dumps(info, indent=2, default=str))
    if args.engine:
        build_trt_engine(onnx_path, args.engine)
        print(f"wrote TensorRT engine {args.engine}")
    return info
