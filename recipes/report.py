"""Reports: JSON (machine) + markdown table (person) + PNG plots, all written atomically."""

from __future__ import annotations

from pathlib import Path


from calibrators import percentile_amax

from .atomic import atomic_output, write_json_atomic, write_text_atomic
from .layerwise import LayerwiseResult
from .stablequant import StableQuantResult

REAPPLY = ("Re-apply with `import sq_plugin`, `recipes.models.remove_weight_norm(model)` (ModelOpt cannot wrap "
           "the positional conv's weight norm), then "
           "`mtq.quantize(model, json.load(open('modelopt_config.json')), forward_loop)` (a config with "
           "`block_sizes`: `recipes.qconfig.load_config('modelopt_config.json')` instead of `json.load`, which "
           "turns their integer axes into strings ModelOpt 0.47 refuses).")
SYSTEM_NAMES = {"fp32": "fp32", "max": "Max", "percentile": "Percentile", "mse": "MSE", "entropy": "Entropy",
                "stablequant_paper": "StableQuant (paper recipe)", "stablequant": "StableQuant (default recipe)"}


def _save_figure(fig, path: Path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def short_layer(name: str) -> str:
    """One way to show a layer everywhere: the module path without the model prefix/quantizer."""
    name = name.removesuffix(".input_quantizer")
    for prefix in ("wav2vec2.", "hubert.", "wavlm.", "data2vec_audio."):
        name = name.removeprefix(prefix)
    return name


def ci_text(ci: dict | None) -> str:
    """``+0.42 [-0.10, +0.95]`` with ``(n.s.)`` when the interval contains 0."""
    if not ci:
        return "-"
    mark = "" if ci["significant"] else " (n.s.)"
    return f"{ci['diff']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]{mark}"


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
        f"Intervals: paired bootstrap over dev utterances ({_resamples(ci)} resamples, seeded); "
        "(n.s.) = the interval contains 0, the difference is not significant. Baselines: one method "
        "for every activation quantizer, per-channel max weights.",
    ])


def _resamples(ci: dict) -> int:
    return next((v["resamples"] for entry in ci.values() if isinstance(entry, dict) for v in entry.values()), 0)


def quantize_markdown(result, meta: dict) -> str:
    if isinstance(result, LayerwiseResult):
        return layerwise_markdown(result, meta)
    return paper_markdown(result, meta)


def layerwise_markdown(result: LayerwiseResult, meta: dict) -> str:
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


def paper_markdown(result: StableQuantResult, meta: dict) -> str:
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


def plot_activation_ranges(result: StableQuantResult, path: Path) -> None:
    """The paper's Fig. 1: per-layer |activation| spread, CNN layers vs Transformer layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.stage1 if isinstance(result, StableQuantResult) else result.layers
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
    ax.set_xlabel("quantized layer (input activation), model order" + (" — marked layers in bold red" if marked else ""),
                  fontsize=9)
    ax.scatter([], [], color="black", marker="x", label="chosen range top")
    ax.set_ylabel("|activation| (median–p99 bar, p99.99 tick, max ▲)")
    ax.set_title("Activation ranges by layer (input of each quantized layer)")
    ax.legend(fontsize=7)
    _save_figure(fig, path)
    plt.close(fig)


def plot_wer_vs_cutoff(result: StableQuantResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = [float(p) for p in result.stage2]
    wers = list(result.stage2.values())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ps, wers, marker=".", label="StableQuant (dev)")
    ax.axhline(result.float_wer, color="gray", ls="--", label="fp32")
    ax.axvline(result.p_opt, color="tab:red", ls=":", label=f"p_opt = {result.p_opt}")
    ax.set_xlabel("cut-off p (% of histogram mass removed)")
    ax.set_ylabel("dev WER %")
    ax.legend(fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)


def write_outputs(out_dir: Path, result, meta: dict, markdown: str, plots) -> str:
    """config, report.json/.md, the plots (``[(plot_fn, file name)]``) and model.pth, each atomically."""
    import modelopt.torch.opt as mto

    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "modelopt_config.json", result.config)
    write_json_atomic(out_dir / "report.json", {"meta": meta, **result.to_json()})
    write_text_atomic(out_dir / "report.md", markdown)
    for plot, name in plots:
        plot(result, out_dir / name)
    with atomic_output(out_dir / "model.pth") as tmp:
        mto.save(result.model.model, tmp)
    return markdown


def write_quantize_outputs(out_dir: Path, result, meta: dict) -> str:
    plots = [(plot_activation_ranges, "activation_ranges.png")]
    if isinstance(result, StableQuantResult):
        plots.append((plot_wer_vs_cutoff, "wer_vs_cutoff.png"))
    return write_outputs(out_dir, result, meta, quantize_markdown(result, meta), plots)


def compare_markdown(table: dict) -> str:
    bits = list(table["bits"])
    fp32 = table["fp32_test_wer"]
    methods = ["max", "percentile", "mse", "entropy", "stablequant_paper", "stablequant"]
    t1 = markdown_table(
        ["precision", "TR-layers MAX", "All-layers MAX", "TR-layers Pct", "All-layers Pct"],
        [["fp32", fp32, fp32, fp32, fp32]] + [
            [f"W{b}A{b}", r["max_tr_only"], r["max"], r["percentile_tr_only"], r["percentile"]]
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
          r["weight_calibrator"], _count(r["layer_calibrators"].values())] for b, r in table["bits"].items()])
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
        from .mixed_report import mixed_compare_markdown

        parts.append(mixed_compare_markdown(table))
    return "\n".join(parts)


def _count(values) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k} ×{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def write_compare_outputs(out_dir: Path, table: dict) -> str:
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "compare.json", table)
    md = compare_markdown(table)
    write_text_atomic(out_dir / "compare.md", md)
    return md
