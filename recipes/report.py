"""Reports: JSON (machine) + markdown table (person) + PNG plots, all written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibrators import percentile_amax

from .atomic import atomic_output, write_json_atomic, write_text_atomic
from .stablequant import StableQuantResult


def _save_figure(fig, path: Path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def quantize_markdown(result: StableQuantResult, meta: dict) -> str:
    s = result.settings
    stage1 = markdown_table(
        ["layer", "kind", "MAX amax", "dev WER %", "ΔWER", "marked"],
        [[r.layer, r.kind, f"{r.amax_max:.4g}", r.wer, f"{r.delta:+.2f}", "yes" if r.marked else ""]
         for r in result.stage1],
    )
    summary = markdown_table(
        ["", "dev WER %"],
        [["fp32", result.float_wer], [f"StableQuant W{s['wbits']}A{s['abits']}", result.final_wer]],
    )
    marked = ", ".join(r.layer for r in result.stage1 if r.marked) or "(none)"
    return "\n".join([
        f"# StableQuant report: {meta.get('model')} ({meta.get('arch')})",
        "",
        f"W{s['wbits']}A{s['abits']}, γ = {s['gamma']} WER points, cut-off grid "
        f"{s['grid'][0]}..{s['grid'][-1]} ({len(s['grid'])} points), {s['num_bins']} histogram bins; "
        f"calibration {meta.get('calib_utterances')} utts, dev {meta.get('dev_utterances')} utts; "
        f"{result.evaluations} dev evaluations in {meta.get('seconds')} s.",
        "",
        summary,
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
        "Re-apply with `mtq.quantize(model, json.load(open('modelopt_config.json')), forward_loop)` "
        "after `import sq_plugin`.",
        "",
    ])


def plot_activation_ranges(result: StableQuantResult, path: Path) -> None:
    """The paper's Fig. 1: per-layer |activation| spread, CNN layers vs Transformer layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {r.quantizer: r.kind for r in result.stage1}
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
    for kind, c in colors.items():
        if kind in kinds.values():
            ax.plot([], [], color=c, lw=5, label=kind)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace(".input_quantizer", "").split(".", 1)[-1] for n in names],
                       rotation=90, fontsize=6)
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


def write_quantize_outputs(out_dir: Path, result: StableQuantResult, meta: dict) -> str:
    import modelopt.torch.opt as mto

    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "modelopt_config.json", result.config)
    write_json_atomic(out_dir / "report.json", {"meta": meta, **result.to_json()})
    md = quantize_markdown(result, meta)
    write_text_atomic(out_dir / "report.md", md)
    plot_activation_ranges(result, out_dir / "activation_ranges.png")
    plot_wer_vs_cutoff(result, out_dir / "wer_vs_cutoff.png")
    with atomic_output(out_dir / "model.pth") as tmp:
        mto.save(result.model.model, tmp)
    return md


def compare_markdown(table: dict) -> str:
    bits = list(table["bits"])
    fp32 = table["fp32_test_wer"]
    t1 = markdown_table(
        ["precision", "TR-layers MAX", "All-layers MAX", "TR-layers Pct", "All-layers Pct"],
        [["fp32", fp32, fp32, fp32, fp32]] + [
            [f"W{b}A{b}", r["max_tr_only"], r["max"], r["percentile_tr_only"], r["percentile"]]
            for b, r in table["bits"].items()],
    )
    t2 = markdown_table(
        ["precision", "clipped layers", "p_opt", "Max", f"Percentile ({table['percentile']})", "MSE",
         "Entropy", "StableQuant"],
        [[f"W{b}A{b}", ", ".join(n.replace(".input_quantizer", "").split("feature_extractor.")[-1]
                                 for n in r["clipped_layers"]) or "-", r["p_opt"],
          r["max"], r["percentile"], r["mse"], r["entropy"], r["stablequant"]]
         for b, r in table["bits"].items()],
    )
    return "\n".join([
        f"# Calibration methods compared: {table.get('model')}",
        "",
        f"Test-set WER %. fp32: {fp32:.2f}. Layers and p_opt chosen on the dev set. Bits: {', '.join(bits)}.",
        "",
        "## Table I: Transformer layers only vs all layers",
        "",
        t1,
        "",
        "## Table II: calibration methods (all layers quantized)",
        "",
        t2,
        "",
    ])


def write_compare_outputs(out_dir: Path, table: dict) -> str:
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "compare.json", table)
    md = compare_markdown(table)
    write_text_atomic(out_dir / "compare.md", md)
    return md
