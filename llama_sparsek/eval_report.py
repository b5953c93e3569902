"""The report of an evaluation (`evaluation.Report`): the Markdown table, the plot and the files.

Everything here reads a finished report; measuring is `evaluation`'s, the command line is
`cli_eval`'s. Importing this module loads neither numpy nor matplotlib (the plot imports it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from llama_sparsek.evaluation import (
    DENSE,
    EvalConfig,
    EvalError,
    ModelResult,
    Report,
    VariantResult,
    kept_share,
    label,
)
from llama_sparsek.sparsek import SparseK


def speed_up(model: ModelResult, variant: VariantResult, test: str, depth: int) -> float | None:
    mine, base = variant.speed_of(test, depth), model.dense.speed_of(test, depth)
    if mine is None or base is None or base.tps <= 0:
        return None
    return mine.tps / base.tps


def ppl_increase(model: ModelResult, variant: VariantResult, ctx: int) -> float | None:
    """Perplexity increase over dense at this context, in percent."""
    mine, base = variant.ppl_at(ctx), model.dense.ppl_at(ctx)
    if mine is None or base is None:
        return None
    return 100.0 * (mine.ppl / base.ppl - 1.0)


def _tests(config: EvalConfig) -> list[tuple[str, int]]:
    pp, tg = f"pp{config.pp_tokens}", f"tg{config.tg_tokens}"
    return [(pp, d) for d in config.depths] + [(tg, d) for d in config.depths]


def table(report: Report) -> str:
    """A Markdown table per model: perplexity (+% vs dense), agreement, speed (x dense)."""
    cfg = report.config
    blocks = []
    for m in report.models:
        head = ["setting"] + [f"ppl@{c}" for c in cfg.contexts] + ["agree prefix", "agree all"]
        if cfg.speed:
            head += [f"{t}@d{d} t/s" for t, d in _tests(cfg)]
        rows = [head, ["---"] * len(head)]
        for v in m.variants:
            row = [v.label]
            for c in cfg.contexts:
                p, inc = v.ppl_at(c), ppl_increase(m, v, c)
                cell = "-" if p is None else f"{p.ppl:.3f}"
                row.append(cell if v.setting is None or inc is None else f"{cell} ({inc:+.2f}%)")
            a = v.agreement
            row += ["-", "-"] if a is None else [f"{a.prefix:.1f}%", f"{a.overall:.1f}%"]
            if cfg.speed:
                for t, d in _tests(cfg):
                    s, up = v.speed_of(t, d), speed_up(m, v, t, d)
                    cell = "-" if s is None else f"{s.tps:.1f}"
                    row.append(cell if v.setting is None or up is None else f"{cell} ({up:.2f}x)")
            rows.append(row)
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        title = f"**{m.model}** ({m.arch}, {m.text_tokens} text tokens)"
        blocks.append("\n".join([title, "", *lines]))
    return "\n\n".join(blocks + [f"> {n}" for n in report.notes])


def depth_for(ctx: int, depths: Sequence[int], tokens: int) -> int:
    """The deepest benchmarked depth whose test still fits in a context of ctx tokens: the speed
    that goes with that context's perplexity (the shallowest depth if none fits)."""
    fitting = [d for d in depths if d + tokens <= ctx]
    return max(fitting) if fitting else min(depths)


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only backend (imported here: the rest needs no matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise EvalError("the plot needs matplotlib (pip install matplotlib) or --no-plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(report: Report, path: Path) -> None:
    """Speed-up vs perplexity increase: one curve per setting through its contexts, one panel
    for prefill and one for decode; dense is the point (0 %, 1x)."""
    plt = _pyplot()

    cfg = report.config
    panels = [(f"pp{cfg.pp_tokens}", cfg.pp_tokens), (f"tg{cfg.tg_tokens}", cfg.tg_tokens)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), squeeze=False)
    for ax, (test, tokens) in zip(axes[0], panels, strict=True):
        for m in report.models:
            for v in m.variants[1:]:
                points = []
                for ctx in cfg.contexts:
                    up = speed_up(m, v, test, depth_for(ctx, cfg.depths, tokens))
                    inc = ppl_increase(m, v, ctx)
                    if up is not None and inc is not None:
                        points.append((inc, up, ctx))
                if not points:
                    continue
                name = v.label if len(report.models) == 1 else f"{m.model} {v.label}"
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name)
                for x, y, ctx in points:
                    ax.annotate(f"{ctx // 1024}k" if ctx >= 1024 else str(ctx), (x, y), fontsize=8)
        ax.plot([0], [1], "k*", markersize=12, label=DENSE)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.axvline(0.0, color="grey", linewidth=0.5)
        ax.set_xlabel("perplexity increase vs dense (%)")
        ax.set_ylabel(f"{test} speed-up vs dense (x)")
        ax.set_title(f"{test} at the deepest depth that fits each context")
        ax.legend(fontsize=8)
    fig.suptitle(f"SparseK vs dense ({report.corpus or 'text'}; labels: context)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- Pareto front


def common_context(reports: Sequence[Report]) -> int:
    """The largest perplexity context that every report measured."""
    shared = set.intersection(*(set(r.config.contexts) for r in reports)) if reports else set()
    if not shared:
        raise EvalError("the reports share no perplexity context")
    return max(shared)


class ParetoPoint(NamedTuple):
    model: str
    setting: str
    kept: float  # keys kept per scored token, % of those it sees
    increase: float  # perplexity increase vs dense, %
    front: bool  # no other setting of the model is as good on both and better on one


def _dominated(p: tuple[float, float], others: Sequence[tuple[float, float]]) -> bool:
    return any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in others)


def pareto_points(report: Report, ctx: int) -> list[ParetoPoint]:
    """Every SparseK setting measured at ctx, model by model, with its place on the front."""
    out = []
    for m in report.models:
        measured = []
        for v in m.variants[1:]:
            inc = ppl_increase(m, v, ctx)
            if v.setting is not None and inc is not None:
                kept = 100.0 * kept_share(v.setting, ctx)
                measured.append((v.label, (kept, inc)))
        pairs = [xy for _, xy in measured]
        out += [ParetoPoint(m.model, n, *xy, not _dominated(xy, pairs)) for n, xy in measured]
    return out


def pareto_table(reports: Sequence[Report], ctx: int) -> str:
    """Perplexity increase of every setting on every corpus (a report each), then the worst
    corpus (where all of them measured it); * marks the settings on a corpus's Pareto front."""
    columns = [r.corpus for r in reports]
    rows: dict[tuple[str, str], dict[str, tuple[float, float, bool]]] = {}
    for r in reports:
        for p in pareto_points(r, ctx):
            rows.setdefault((p.model, p.setting), {})[r.corpus] = (p.kept, p.increase, p.front)
    head = ["model", "setting", f"keys kept @{ctx}", *columns, "worst"]
    lines = [head, ["---"] * len(head)]
    for (model, name), cells in rows.items():
        share = next(iter(cells.values()))[0]
        row = [model, name, f"{share:.1f}%"]
        for c in columns:
            got = cells.get(c)
            row.append("-" if got is None else f"{got[1]:+.2f}%" + ("*" if got[2] else ""))
        worst = max(v[1] for v in cells.values())
        row.append(f"{worst:+.2f}%" if len(cells) == len(columns) else "-")
        lines.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


def pareto_plot(reports: Sequence[Report], ctx: int, path: Path) -> None:
    """A panel per corpus: perplexity increase vs keys kept for every setting and model, the
    Pareto front joined, the default ringed, the 2% target dashed."""
    plt = _pyplot()

    default = label(SparseK())
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cols = min(3, len(reports))
    rows = -(-len(reports) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, report in zip(axes.flat, reports, strict=False):
        models = list(dict.fromkeys(m.model for m in report.models))
        for color, model in zip(colors, models, strict=False):
            points = [p for p in pareto_points(report, ctx) if p.model == model]
            ax.scatter([p.kept for p in points], [p.increase for p in points], color=color, s=18)
            front = sorted((p.kept, p.increase) for p in points if p.front)
            ax.plot(*zip(*front, strict=True), color=color, linewidth=1, label=model)
            for p in points:
                ax.annotate(
                    p.setting,
                    (p.kept, p.increase),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
                if p.setting == default:
                    ax.scatter([p.kept], [p.increase], s=120, facecolors="none", edgecolors=color)
        ax.axhline(2.0, color="grey", linestyle="--", linewidth=0.8)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_title(f"{report.corpus} (ctx {ctx})", fontsize=10)
        ax.set_xlabel("keys kept per scored token (% of those it sees)")
        ax.set_ylabel("perplexity increase vs dense (%)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(reports) :]:
        ax.axis("off")
    fig.suptitle("SparseK settings per corpus: the line is the Pareto front, the ring the default")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: Report, out: Path, *, png: bool = True) -> dict[str, Path]:
    """results.json, results.md (the table) and, with png, results.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "md": out / "results.md"}
    files["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    files["md"].write_text(table(report) + "\n")
    if png:
        files["png"] = out / "results.png"
        plot(report, files["png"])
    return files


__all__ = [
    "ParetoPoint",
    "common_context",
    "depth_for",
    "pareto_plot",
    "pareto_points",
    "pareto_table",
    "plot",
    "ppl_increase",
    "speed_up",
    "table",
    "write",
]
