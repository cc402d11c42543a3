"""report.json / report.md / pareto.png of a mixed-precision run (``quantize --budget-bits``), and
the mixed rows of the compare table."""

from __future__ import annotations

from pathlib import Path

from recipes.evaluation import systems

from .common import REAPPLY, ci_text, markdown_table, pyplot, save_and_close, short_layer, write_outputs


def _system_names_and_bits(result) -> tuple[dict[str, str], dict[str, float]]:
    """Readable name and average weight bits of each system a mixed run scored."""
    names = {systems.FP32: "fp32", systems.DEFAULT_W8A8: "default recipe W8A8 (its own weights)",
             **{systems.uniform(k): f"uniform {k}" for k in result.uniform},
             **{systems.mixed_by(k): f"mixed, budget {result.budget_bits}, allocated by {k}"
                for k in result.candidates},
             systems.MIXED: f"mixed, budget {result.budget_bits} (chosen: {result.score})"}
    bits = {systems.FP32: 32.0, systems.DEFAULT_W8A8: 8.0,
            **{systems.uniform(k): v["avg_bits"] for k, v in result.uniform.items()},
            **{systems.mixed_by(k): v["avg_weight_bits"] for k, v in result.candidates.items()},
            systems.MIXED: result.avg_weight_bits}
    return names, bits


def mixed_markdown(result, meta: dict) -> str:
    dev, ci = meta["dev"], meta["dev_intervals"]
    names, bits = _system_names_and_bits(result)
    summary = markdown_table(
        ["system", "avg weight bits", "× smaller than fp32", "dev WER %", "word errors", "Δ vs fp32 [95 % CI]"],
        [[names.get(k, k), f"{bits.get(k, 0):.2f}", f"{32 / bits[k]:.2f}" if k in bits else "-", v["wer"],
          f"{v['word_errors']}/{v['words']}", ci_text(ci.get(k, {}).get("vs_fp32"))] for k, v in dev.items()])
    layers = markdown_table(
        ["layer", "kind", "weights", "format", "bits/weight", "dev KL alone", "dev CTC Δ alone", *result.menu],
        [[short_layer(c.layer), c.kind, c.weights, f"**{c.format}**" + (f" (g{c.block[1]})" if c.block else ""),
          f"{c.bits:.3g}", f"{c.predicted_kl:.5f}", f"{c.predicted_ctc:+.4f}",
          *(f"{result.sensitivity[c.layer][f]:.4f}" if f in result.sensitivity[c.layer] else "-" for f in result.menu)]
         for c in result.choices])
    pareto = markdown_table(["budget", "avg bits", "predicted dev KL", "measured dev KL", "measured dev CTC Δ",
                             "dev WER %"],
                            [[p["budget"], f"{p['avg_bits']:.3f}", f"{p['predicted_kl']:.5f}", f"{p['kl']:.5f}",
                              f"{p.get('ctc', 0.0):+.4f}", p["wer"]] for p in result.pareto])
    repairs = f"none needed (measured {result.score} score within tolerance of the prediction)" \
        if not result.repairs else \
        markdown_table(["layer fixed", "to", "score", "predicted gain", "measured before", "measured after", "kept"],
                       [[short_layer(r["layer"]), r["to"], r["score"], f"{r['predicted_gain']:.5f}",
                         f"{r['before']:.5f}", f"{r['after']:.5f}", r["kept"]] for r in result.repairs])
    candidates = markdown_table(
        ["allocated by", "avg bits", "predicted score", "dev WER %", "dev KL to fp32", "dev CTC Δ vs fp32",
         "calibration-set WER % (fp32)", "repairs kept", "formats"],
        [[f"**{k}**" if k == result.score else k, f"{v['avg_weight_bits']:.3f}", f"{v['predicted']:+.5f}",
          v["dev_wer"], f"{v['dev_kl']:.5f}", f"{v['dev_ctc']:+.4f}",
          "-" if v.get("calib_wer") is None else f"{v['calib_wer']:.2f} ({v['calib_fp32_wer']:.2f})",
          sum(r["kept"] for r in v["repairs"]),
          ", ".join(f"{f} ×{n}" for f, n in v["formats"].items())] for k, v in result.candidates.items()])
    counts: dict[str, int] = {}
    for c in result.choices:
        counts[c.format] = counts.get(c.format, 0) + 1
    return "\n".join([
        f"# StableQuant mixed precision: {meta.get('model')} ({meta.get('arch')}), budget {result.budget_bits} bits",
        "",
        f"**{result.avg_weight_bits:.3f} average bits per weight** (every Linear/Conv weight; float counts 16; "
        f"{result.block_scale_bits:g} bits per block scale of a -blk format) = "
        f"**{result.compression_vs_fp32:.2f}× smaller** than fp32; {result.avg_weight_bits_no_scales:.3f} bits "
        "counting grid bits only, as ModelOpt's auto_quantize does. Formats: "
        + ", ".join(f"{k} ×{n}" for k, n in counts.items()) + f". Menu: {', '.join(result.menu)} (-blk: one "
        "scale per block of up to 128 weights along the reduction dim, '-' where the layer's shape takes "
        f"none); {result.fp8}.",
        "",
        f"**Allocated by {result.score}** ({result.score_reason}). Dev KL to fp32: predicted (sum of per-layer "
        f"KLs) {result.predicted_kl:.5f}, measured {result.final_kl:.5f}; dev CTC loss minus fp32's: predicted "
        f"{result.predicted_ctc:+.4f}, measured {result.final_ctc:+.4f}. "
        f"Calibration {meta.get('calib_utterances')} utts, dev {meta.get('dev_utterances')} "
        f"utts; {result.evaluations} dev evaluations in {meta.get('seconds')} s "
        f"(phases: {', '.join(f'{k} {v:.0f} s' for k, v in result.seconds.items())}).",
        "",
        summary,
        "",
        "## Candidate allocations (one per sensitivity score; kept: the lower WER on the calibration "
        "utterances, whose transcripts neither score saw; ties: KL)",
        "",
        candidates,
        "",
        "## Per-layer formats (sensitivity: dev KL with only that layer at each format; CTC Δ: dev CTC loss "
        "change from fp32, layer alone at its format)",
        "",
        layers,
        "",
        "## Allocations at other budgets (the Pareto plot `pareto.png`)",
        "",
        pareto,
        "",
        f"## Greedy repair: {repairs}",
        "",
        REAPPLY,
        "",
    ])

def plot_pareto(result, path: Path) -> None:
    """Average weight bits vs dev WER: the mixed allocations and the uniform formats."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    pts = sorted(result.pareto, key=lambda p: p["avg_bits"])
    ax.plot([p["avg_bits"] for p in pts], [p["wer"] for p in pts], marker="o", label="mixed (allocations)")
    ax.scatter([result.avg_weight_bits], [result.final_wer], s=90, marker="*", color="tab:red", zorder=3,
               label=f"mixed, budget {result.budget_bits}")
    for name, u in result.uniform.items():
        ax.scatter([u["avg_bits"]], [u["wer"]], marker="s", color="tab:gray", zorder=3)
        ax.annotate(f"uniform {name}", (u["avg_bits"], u["wer"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.axhline(result.float_wer, color="gray", ls="--", label="fp32")
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("dev WER %")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    save_and_close(fig, path)

def write_mixed_outputs(out_dir: Path, result, meta: dict) -> str:
    return write_outputs(out_dir, result, meta, mixed_markdown(result, meta), [(plot_pareto, "pareto.png")])

def mixed_compare_markdown(table: dict) -> str:
    rows = [[f"mixed, budget {b}", r.get("score", "kl"), f"{r['avg_weight_bits']:.2f}",
             f"{r['compression_vs_fp32']:.2f}×", r["dev_wer"], r["test_wer"], ci_text(r["vs_fp32"]),
             ", ".join(f"{k} ×{n}" for k, n in r["formats"].items())]
            for b, r in table["mixed"].items()]
    return "\n".join([
        "## Mixed precision under a size budget (`--budgets`)", "",
        "One format per layer (float counted as 16 bits, W8A8, W6A6, W4A8, W4A16, and block-wise "
        "W4A8-blk / W4A16-blk with their fp16 block scales counted) chosen from dev sensitivities under the "
        f"average-bits budget; fp32 test WER {table['fp32_test_wer']:.2f}.", "",
        markdown_table(["system", "allocated by", "avg weight bits", "smaller than fp32", "dev WER %",
                        "test WER %", "Δ vs fp32 [95 % CI]", "formats"], rows), ""])
