"""What every report shares: tables, interval text, layer names, figures and the output writer."""

from __future__ import annotations

from pathlib import Path

from recipes.evaluation import systems
from recipes.runtime.atomic import atomic_output, write_json_atomic, write_text_atomic

REAPPLY = ("Re-apply with `import sq_plugin`, `recipes.speech.models.remove_weight_norm(model)` (ModelOpt cannot wrap "
           "the positional conv's weight norm), then "
           "`mtq.quantize(model, json.load(open('modelopt_config.json')), forward_loop)` (a config with "
           "`block_sizes`: `recipes.search.qconfig.load_config('modelopt_config.json')` instead of `json.load`, which "
           "turns their integer axes into strings ModelOpt 0.47 refuses).")
SYSTEM_NAMES = systems.DISPLAY


def save_figure(fig, path: Path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")

def pyplot():
    """matplotlib.pyplot on the Agg backend: reports are drawn into files, often where there is no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

def save_and_close(fig, path: Path) -> None:
    """Write the figure (atomically, as save_figure) and close it: pyplot keeps every open figure alive."""
    import matplotlib.pyplot as plt

    save_figure(fig, path)
    plt.close(fig)

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

def resamples_of(ci: dict) -> int:
    return next((v["resamples"] for entry in ci.values() if isinstance(entry, dict) for v in entry.values()), 0)

def count_text(values) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k} ×{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))

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
