"""The ``stablequant`` command: argument parsing only; the work happens in :mod:`recipes.workflows`.

Nothing heavy is imported before the arguments are parsed, so ``--help`` and usage errors answer
at once (ModelOpt and torch load only when a sub-command runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

DEFAULT_GRID = "0:0.5:0.01"


def _grid(text: str) -> list[float]:
    """``start:stop:step`` (inclusive) or a comma list, e.g. ``0:0.5:0.01`` or ``0,0.1,0.2``."""
    from recipes.search.grid import parse_grid

    try:
        return parse_grid(text)
    except ValueError as e:  # argparse turns this into a usage error naming the value
        raise argparse.ArgumentTypeError(str(e)) from None


def _number(kind, low=None, high=None, power_of_two=False, strict_low=False):
    """An argparse type: a number in range, checked before any model or data is loaded."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if strict_low else value < low):
            raise argparse.ArgumentTypeError(f"{value} must be {'>' if strict_low else '>='} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} must be <= {high}")
        if power_of_two and value & (value - 1):
            raise argparse.ArgumentTypeError(f"{value} must be a power of two")
        return value

    return parse


def _device(text: str) -> str:
    """``auto|cpu|cuda[:N]``; a CUDA request is checked against the devices present at parse time."""
    from recipes.runtime.device import check_device

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device, default="auto",
                   help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun 'cuda' means "
                        "one GPU per rank (LOCAL_RANK)")


BITS = _number(int, 2, 16)
NUM_BINS = _number(int, 16, power_of_two=True)
GAMMA = _number(float, 0.0)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None / off) that would only add noise."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


DATA_HELP = {"calib": "calibration data (activation statistics)", "dev": "dev data (every decision)",
             "test": "test data (the reported WERs)", "data": "data to score"}


def _add_common(p: argparse.ArgumentParser, data_args: tuple[str, ...] = ()) -> None:
    p.add_argument("--model", default="demo",
                   help="'demo' (shipped), a Hugging Face CTC model directory, a fairseq "
                        "CTC checkpoint (.pt with dict.ltr.txt beside it), torchaudio:BUNDLE or a "
                        "torchaudio checkpoint directory (torchaudio_config.json, labels.json, "
                        "model.safetensors)")
    for name in data_args:
        p.add_argument(f"--{name}", default=None, metavar="DATA",
                       help=f"{DATA_HELP[name]}: a LibriSpeech directory, fairseq .tsv manifest, plain "
                            "TSV (audio<TAB>transcript) or a saved Hugging Face datasets directory (save_to_disk); "
                            "default with --model demo: the shipped set")
    p.add_argument("--limit", type=_number(int, 1), default=None, metavar="N",
                   help="a deterministic (seeded) subset of N utterances per data set")
    p.add_argument("--batch-seconds", type=_number(float, 0.0, strict_low=True), default=32.0,
                   help="most audio seconds in one forward; only equal-length utterances share one, "
                        "so results never depend on it")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable or too short audio files (reported)")
    p.add_argument("--seed", type=int, default=0, help="seed for --limit subsets and bootstrap intervals")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="logging detail (DEBUG also shows tracebacks)")
    _add_device(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablequant",
        description="StableQuant post-training quantization for speech foundation models (NVIDIA ModelOpt plugin).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fmt = {"formatter_class": _Formatter}
    q = sub.add_parser("quantize", help="run StableQuant (default recipe, or --recipe paper) and write a "
                       "ModelOpt config + report", **fmt)
    _add_common(q, ("calib", "dev"))
    q.add_argument("--recipe", choices=["default", "paper"], default="default",
                   help="default: best calibrator per layer by dev logit divergence to fp32 (see README); "
                        "paper: Algorithms 1 and 2 exactly as published")
    q.add_argument("--bits", type=BITS, default=8, help="bits for weights and activations")
    q.add_argument("--wbits", type=BITS, default=None, help="weight bits (default: --bits)")
    q.add_argument("--budget-bits", type=_number(float, 4.0, 16.0), default=None, metavar="B",
                   help="mixed precision: one format per layer (float, W8A8, W6A6, W4A8, W4A16, W4A8-blk / "
                        "W4A16-blk with one scale per block of up to 128 weights, FP8 E4M3 W8A8) with at most B "
                        "average bits per Linear/Conv weight (float counts 16), chosen from dev sensitivities; "
                        "without it every layer gets --bits")
    q.add_argument("--block-scale-bits", type=_number(float, 0.0, 32.0), default=16.0, metavar="S",
                   help="with --budget-bits: bits the budget charges per block scale (default 16, fp16 scales; "
                        "0 counts grid bits only, as ModelOpt's auto_quantize does)")
    q.add_argument("--mixed-score", choices=["auto", "kl", "ctc"], default="auto",
                   help="with --budget-bits: per-layer score the allocation minimises: kl (dev KL to fp32), ctc "
                        "(dev CTC-loss change on the transcripts, as auto_quantize scores), or auto (allocate "
                        "with both, keep the lower WER on the calibration utterances, whose transcripts "
                        "neither score saw; ties: kl)")
    q.add_argument("--variants-per-forward", type=_number(int, 1), default=8, metavar="K",
                   help="candidates of one layer scored side by side in one forward of up to K copies of each "
                        "dev batch (mixed precision: a layer's formats; default recipe: the next 2 on its "
                        "ladder); cheaper than K forwards on small batches, K times the activation memory; "
                        "1: one per forward (the paper recipe always is)")
    q.add_argument("--gamma", type=GAMMA, default=0.25,
                   help="Stage-1 threshold: absolute WER %% rise that marks a layer")
    q.add_argument("--grid", type=_grid, default=DEFAULT_GRID, help="cut-off grid p (percent), start:stop:step or list")
    q.add_argument("--num-bins", type=NUM_BINS, default=2048, help="histogram bins per activation quantizer")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--overwrite", action="store_true", help="write into an existing output directory")
    q.add_argument("--resume", action="store_true", help="resume from OUT/state.json")
    q.add_argument("--naive-stage1", action="store_true", help="re-run the whole model per layer (benchmark only)")

    c = sub.add_parser("compare", help="the paper's Tables I and II on this model, with intervals", **fmt)
    _add_common(c, ("calib", "dev", "test"))
    c.add_argument("--bits", type=BITS, nargs="+", default=[8, 6, 4], help="bit widths (WnAn each)")
    c.add_argument("--gamma", type=GAMMA, default=0.25, help="paper recipe: Stage-1 threshold in WER points")
    c.add_argument("--grid", type=_grid, default=DEFAULT_GRID, help="paper recipe: cut-off grid p (percent)")
    c.add_argument("--num-bins", type=NUM_BINS, default=2048, help="histogram bins per activation quantizer")
    c.add_argument("--subset", action="append", default=None, metavar="NAME=DATA",
                   help="also report WER on the test utterances listed in DATA (repeatable); "
                        "--model demo: training voices vs held-out voices")
    c.add_argument("--budgets", type=_number(float, 4.0, 16.0), nargs="*", default=[6.0, 4.0], metavar="B",
                   help="also mixed precision at these average bits per weight (quantize --budget-bits); "
                        "give none to skip")
    c.add_argument("--mixed-score", choices=["auto", "kl", "ctc"], default="auto",
                   help="with --budgets: the mixed allocation's per-layer score (see quantize --mixed-score)")
    c.add_argument("--out", required=True, help="output directory (compare.json, compare.md, state files)")
    c.add_argument("--overwrite", action="store_true", help="write into an existing output directory")
    c.add_argument("--resume", action="store_true", help="reuse the finished searches in OUT")

    e = sub.add_parser("eval", help="WER/CER of a model (optionally quantized by a ModelOpt config, or an ONNX file)",
                       **fmt)
    _add_common(e, ("data",))
    e.add_argument("--config", default=None, help="modelopt_config.json written by 'stablequant quantize'")
    e.add_argument("--calib", default=None, help="calibration data for --config (default: the demo set)")
    e.add_argument("--onnx", default=None, help="evaluate an exported ONNX model with ONNX Runtime")
    e.add_argument("--quantized", default=None, metavar="MODEL_PTH",
                   help="evaluate the quantized model 'stablequant quantize' saved (OUT/model.pth) as it is")
    e.add_argument("--json", action="store_true",
                   help="print one JSON object (metrics and per-utterance transcripts) instead of the table")

    x = sub.add_parser("export", help="Q/DQ ONNX export (and TensorRT engine where available)", **fmt)
    _add_common(x, ("calib",))
    x.add_argument("--config", default=None, help="modelopt_config.json (from 'stablequant quantize')")
    x.add_argument("--quantized", default=None, metavar="MODEL_PTH",
                   help="export the quantized model 'stablequant quantize' saved (OUT/model.pth) as it is")
    x.add_argument("--onnx", required=True, help="output .onnx path")
    x.add_argument("--engine", default=None, help="also build a TensorRT engine (needs tensorrt + a GPU)")
    x.add_argument("--allow-fp32", action="store_true", help="allow exporting an unquantized model")
    x.add_argument("--overwrite", action="store_true")

    cal = sub.add_parser("calibrators", help="list the registered calibrators (built-in and plugins)", **fmt)
    _add_device(cal)  # accepted everywhere; listing needs no device
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, KeyError) as e:
        if getattr(args, "log_level", "WARNING") == "DEBUG":
            raise
        print(f"stablequant {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write refused half-way (disk full, permissions changed): one line
        if getattr(args, "log_level", "WARNING") == "DEBUG":
            raise
        print(f"stablequant {args.command}: error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if args.command in ("quantize", "compare"):
            hint = (f"; finished evaluations are kept in {args.out}: rerun the same command with --resume "
                    "to continue")
        print(f"stablequant {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "calibrators":
        import sq_plugin

        width = max(map(len, sq_plugin.calibrator_names()), default=0)
        for name in sq_plugin.calibrator_names():
            cls = sq_plugin.calibrator_class(name)
            print(f"{name:{width}s}  {cls.__module__}.{cls.__qualname__}")
        return 0
    from recipes import workflows

    result = getattr(workflows, f"run_{args.command}")(args)
    if result is not None and args.command == "eval" and args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # python -m recipes.cli (e.g. torchrun --module recipes.cli)
    raise SystemExit(main())
