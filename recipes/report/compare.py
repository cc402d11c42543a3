"""compare.json / compare.md of ``stablequant compare``."""

from __future__ import annotations

from pathlib import Path

from recipes.evaluation import systems
from recipes.runtime.atomic import write_json_atomic, write_text_atomic

from .common import SYSTEM_NAMES, ci_text, count_text, markdown_table, short_layer
from .mixed import mixed_compare_markdown


def compare_markdown(table: dict) -> str:
    bits = list(table["bits"])
    fp32 = table["fp32_test_wer"]
    methods = [*systems.BASELINES, systems.PAPER, systems.DEFAULT]
    t1 = markdown_table(
        ["precision", "TR-layers MAX", "All-layers MAX", "TR-layers Pct", "All-layers Pct"],
        [["fp32", fp32, fp32, fp32, fp32]] + [
            [f"W{b}A{b}", r[systems.tr_only("max")], r["max"], r[systems.tr_only("percentile")], r["percentile"]]
            for b, r in table["bits"].items()],
    )

    def best_mark(r, m):
        wer = r[m]
        return f"**{wer:.2f}**" if wer == min(r[k] for k in methods) else f"{wer:.2f}"

    t2 = markdown_table(
        ["precision", "Max", f"Percentile ({table['percentile']})", "MSE", "Entropy", "StableQuant (paper)",
         "StableQuant (default)"],
        [[f"W{b}A{b}", *(best_mark(r, m) for m in methods)] for b, r in table["bits"].items()],
    )
    ci_rows = []
    for b, r in table["bits"].items():
        best = r["intervals"]["best_baseline"]
        for m in methods:
            ci = r["intervals"][m]
            ci_rows.append([f"W{b}A{b}", SYSTEM_NAMES[m], r[m], ci_text(ci["vs_fp32"]),
                            ci_text(ci.get("vs_best_baseline")) if m != best else "(best baseline)"])
    t3 = markdown_table(["precision", "method", "test WER %", "Δ vs fp32 [95 % CI]",
                         "Δ vs best baseline [95 % CI]"], ci_rows)
    choices = markdown_table(
        ["precision", "paper: clipped layers", "paper: p_opt", "default: weights", "default: calibrators chosen"],
        [[f"W{b}A{b}", ", ".join(short_layer(n) for n in r["clipped_layers"]) or "-", r["p_opt"],
          r["weight_calibrator"], count_text(r["layer_calibrators"].values())] for b, r in table["bits"].items()])
    parts = [
        f"# Calibration methods compared: {table.get('model')}",
        "",
        f"Test-set WER %, {table.get('test_utterances')} utterances ({table.get('test_words')} words; one word "
        f"= {100 / max(table.get('test_words') or 1, 1):.2f} points). fp32: {fp32:.2f}. Every choice made "
        f"on the dev set. Bits: {', '.join(bits)}. Best of each row in bold.",
        "",
        "## Table I: Transformer layers only vs all layers",
        "",
        t1,
        "",
        "## Table II: calibration methods (all layers quantized)",
        "",
        t2,
        "",
        "## Differences with 95 % intervals",
        "",
        f"Paired bootstrap over test utterances ({table.get('resamples')} resamples, seeded). "
        "Best baseline: the lowest test WER among Max, Percentile, MSE, Entropy and the paper recipe. "
        "(n.s.): the interval contains 0.",
        "",
        t3,
        "",
        "## What each recipe chose",
        "",
        choices,
        "",
    ]
    subsets = {name for r in table["bits"].values() for name in r.get("subsets", {})}
    if subsets:
        rows = [[f"W{b}A{b}", name, *(r["subsets"][name][m] for m in ["fp32", *methods])]
                for b, r in table["bits"].items() for name in sorted(r.get("subsets", {}))]
        parts += ["## Test subsets (test WER %)", "",
                  markdown_table(["precision", "subset", "fp32", "Max", "Percentile", "MSE", "Entropy",
                                  "StableQuant (paper)", "StableQuant (default)"], rows), ""]
    if table.get("mixed"):
        parts.append(mixed_compare_markdown(table))
    return "\n".join(parts)

def write_compare_outputs(out_dir: Path, table: dict) -> str:
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "compare.json", table)
    md = compare_markdown(table)
    write_text_atomic(out_dir / "compare.md", md)
    return md
