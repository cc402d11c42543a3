"""report.json / report.md / PNG plots of ``stablequant quantize`` (default or paper recipe)."""

from __future__ import annotations

from pathlib import Path

from calibrators import percentile_amax

from .common import (
    REAPPLY,
    SYSTEM_NAMES,
    ci_text,
    markdown_table,
    pyplot,
    resamples_of,
    save_and_close,
    short_layer,
    write_outputs,
)


def dev_summary(meta: dict) -> str:
    """fp32, the uniform baselines and the recipe on dev, with intervals against fp32 and the best."""
    dev, ci = meta["dev"], meta["dev_intervals"]
    rows = [[SYSTEM_NAMES.get(k, k), v["wer"], v["cer"], f"{v['word_errors']}/{v['words']}",
             ci_text(ci.get(k, {}).get("vs_fp32")), ci_text(ci.get(k, {}).get("vs_best_baseline"))]
            for k, v in dev.items()]
    return "\n".join([
        markdown_table(["system", "dev WER %", "dev CER %", "word errors", "Δ vs fp32 [95 % CI]",
                        f"Δ vs best baseline ({SYSTEM_NAMES.get(ci['best_baseline'])}) [95 % CI]"], rows),
        "",
        f"Intervals: paired bootstrap over dev utterances ({resamples_of(ci)} resamples, seeded); "
        "(n.s.) = the interval contains 0, the difference is not significant. Baselines: one method "
        "for every activation quantizer, per-channel max weights.",
    ])

def quantize_markdown(result, meta: dict) -> str:
    return paper_markdown(result, meta) if result.recipe == "paper" else layerwise_markdown(result, meta)

def layerwise_markdown(result, meta: dict) -> str:
    s = result.settings
    starts = markdown_table(
        ["activations / weights", "dev KL to fp32", "dev WER %"],
        [[k, f"{v['kl']:.5f}", v["wer"]] for k, v in result.starts.items()])
    layers = markdown_table(
        ["layer", "kind", "chosen calibrator", "amax", "shift", "dev KL after", "candidates tried (KL)"],
        [[short_layer(c.layer), c.kind, c.chosen, f"{c.amax:.4g}", f"{c.shift:.4g}" if c.shift else "",
          f"{c.kl[c.chosen]:.5f}",
          ", ".join(f"{k} {v:.4f}" for k, v in sorted(c.kl.items(), key=lambda kv: kv[1]))]
         for c in result.layers])
    return "\n".join([
        f"# StableQuant report: {meta.get('model')} ({meta.get('arch')}), default recipe",
        "",
        f"W{s['wbits']}A{s['abits']}, {s['num_bins']} histogram bins; calibration {meta.get('calib_utterances')} "
        f"utts, dev {meta.get('dev_utterances')} utts; {result.evaluations} dev evaluations in "
        f"{meta.get('seconds')} s. Decisions minimise the dev KL divergence of the output distribution "
        "from fp32 (`--recipe paper` for the published algorithm).",
        "",
        dev_summary(meta),
        "",
        f"**Start:** {result.start} (dev KL {result.starts[result.start]['kl']:.5f}) → "
        f"**final dev KL {result.final_kl:.5f}**; weights: per-channel {result.weight_calibrator}.",
        "",
        "## Uniform starts (every activation quantizer one method)",
        "",
        starts,
        "",
        "## Per-layer calibrator search (model order, each layer's candidates with the others as chosen)",
        "",
        layers,
        "",
        REAPPLY,
        "",
    ])

def paper_markdown(result, meta: dict) -> str:
    s = result.settings
    stage1 = markdown_table(
        ["layer", "kind", "MAX amax", "dev WER %", "ΔWER", "marked"],
        [[short_layer(r.layer), r.kind, f"{r.amax_max:.4g}", r.wer, f"{r.delta:+.2f}",
          "**yes**" if r.marked else ""] for r in result.stage1],
    )
    marked = ", ".join(short_layer(r.layer) for r in result.stage1 if r.marked) or "(none)"
    return "\n".join([
        f"# StableQuant report: {meta.get('model')} ({meta.get('arch')}), paper recipe",
        "",
        f"W{s['wbits']}A{s['abits']}, γ = {s['gamma']} WER points, cut-off grid "
        f"{s['grid'][0]}..{s['grid'][-1]} ({len(s['grid'])} points), {s['num_bins']} histogram bins; "
        f"calibration {meta.get('calib_utterances')} utts, dev {meta.get('dev_utterances')} utts; "
        f"{result.evaluations} dev evaluations in {meta.get('seconds')} s.",
        "",
        dev_summary(meta),
        "",
        f"**Clipped layers (Stage 1):** {marked}  ",
        f"**Chosen cut-off p_opt:** {result.p_opt} %",
        "",
        "## Stage 1: each layer's activations alone with MAX calibration",
        "",
        stage1,
        "",
        "## Stage 2: dev WER by cut-off p",
        "",
        markdown_table(["p (%)", "dev WER %"], [[p, w] for p, w in result.stage2.items()]),
        "",
        REAPPLY,
        "",
    ])

def plot_activation_ranges(result, path: Path) -> None:
    """The paper's Fig. 1: per-layer |activation| spread, CNN layers vs Transformer layers."""
    plt = pyplot()
    rows = result.stage1 if result.recipe == "paper" else result.layers
    kinds = {r.quantizer: r.kind for r in rows}
    shifts = {r.quantizer: getattr(r, "shift", 0.0) for r in rows}
    names = list(result.histograms)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(names)), 4))
    colors = {"cnn": "tab:red", "pos_conv": "tab:orange", "transformer": "tab:blue", "head": "tab:green"}
    for i, name in enumerate(names):
        counts, edges, amax = result.histograms[name]
        if amax <= 0:
            continue
        q = [percentile_amax(counts, edges, amax, p) for p in (50.0, 99.0, 99.99)]
        c = colors.get(kinds.get(name), "gray")
        ax.plot([i, i], [max(q[0], 1e-6), amax], color=c, lw=1)
        ax.plot([i, i], [max(q[0], 1e-6), q[1]], color=c, lw=5, solid_capstyle="butt")
        ax.scatter([i], [amax], color=c, marker="^", s=14)
        ax.scatter([i], [q[2]], color=c, marker="_", s=30)
        if name in result.amax:  # the top of the quantized range (amax + shift for one-sided ranges)
            top = result.amax[name] + shifts.get(name, 0.0)
            ax.scatter([i], [top], color="black", marker="x", s=18, zorder=3)
    for kind, c in colors.items():
        if kind in kinds.values():
            ax.plot([], [], color=c, lw=5, label=kind)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    labels = ax.set_xticklabels([short_layer(n) for n in names], rotation=90, fontsize=8)
    marked = set(getattr(result, "marked", ()))
    for label, name in zip(labels, names):  # Stage-1 marked layers (paper recipe) in bold red
        if name in marked:
            label.set_color("tab:red")
            label.set_fontweight("bold")
    ax.set_xlabel("quantized layer (input activation), model order"
                  + (" — marked layers in bold red" if marked else ""),
                  fontsize=9)
    ax.scatter([], [], color="black", marker="x", label="chosen range top")
    ax.set_ylabel("|activation| (median–p99 bar, p99.99 tick, max ▲)")
    ax.set_title("Activation ranges by layer (input of each quantized layer)")
    ax.legend(fontsize=7)
    save_and_close(fig, path)

def plot_wer_vs_cutoff(result, path: Path) -> None:
    plt = pyplot()
    ps = [float(p) for p in result.stage2]
    wers = list(result.stage2.values())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ps, wers, marker=".", label="StableQuant (dev)")
    ax.axhline(result.float_wer, color="gray", ls="--", label="fp32")
    ax.axvline(result.p_opt, color="tab:red", ls=":", label=f"p_opt = {result.p_opt}")
    ax.set_xlabel("cut-off p (% of histogram mass removed)")
    ax.set_ylabel("dev WER %")
    ax.legend(fontsize=8)
    save_and_close(fig, path)

def write_quantize_outputs(out_dir: Path, result, meta: dict) -> str:
    plots = [(plot_activation_ranges, "activation_ranges.png")]
    if result.recipe == "paper":
        plots.append((plot_wer_vs_cutoff, "wer_vs_cutoff.png"))
    return write_outputs(out_dir, result, meta, quantize_markdown(result, meta), plots)
