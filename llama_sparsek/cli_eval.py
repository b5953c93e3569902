"""`llama-sparsek eval`: dense vs SparseK on real models and real long text (see evaluation)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from llama_sparsek import corpus, models
from llama_sparsek.evaluation import EvalConfig, EvalError, label
from llama_sparsek.sparsek import GRID_FLAGS, GRID_ITEM, SparseK

# the default first, then the previous default and exact keys
DEFAULT_GRID = f"{SparseK().grid_item()},1280:256:8,512:128:1"
DEFAULT_OUT = Path("eval-results")


# --------------------------------------------------------------------------- option parsing


def parse_grid(text: str) -> tuple[SparseK, ...]:
    """`top_k:window[:block_size[:summaries][:grow][:group]]` items (block size 1 if omitted;
    `summaries` scores the blocks from their summaries, `grow` lets top_k grow with the keys a
    query sees, `group` selects per K head: a switch an item does not name is off) separated by
    commas, e.g.
    `256:128,128:64:16,1536:256:8:summaries:grow`."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise ValueError(f"grid {text!r}: expected {GRID_ITEM}, comma-separated")
    settings = tuple(_parse_setting(item) for item in items)
    dupes = sorted({label(s) for s in settings if settings.count(s) > 1})
    if dupes:
        raise ValueError(f"grid {text!r} repeats {', '.join(dupes)}")
    return settings


def _parse_setting(item: str) -> SparseK:
    parts = item.split(":")
    flags = parts[3:]
    parts = parts[:3]
    if len(parts) < 2 or len(set(flags)) < len(flags) or not set(flags) <= set(GRID_FLAGS):
        raise ValueError(f"grid item {item!r}: expected {GRID_ITEM}")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"grid item {item!r}: values must be integers") from None
    try:
        top_k, window, *block = numbers
        return SparseK(
            top_k=top_k,
            window=window,
            block_size=block[0] if block else 1,
            **{name: int(flag in flags) for flag, name in GRID_FLAGS.items()},
        )
    except ValueError as e:
        raise ValueError(f"grid item {item!r}: {e}") from None


def parse_ints(values: Sequence[str], what: str) -> tuple[int, ...]:
    """Integers from repeated and/or comma-separated options (`--ctx 2048 --ctx 4096,8192`)."""
    out: list[int] = []
    for value in values:
        for part in value.split(","):
            try:
                out.append(int(part))
            except ValueError:
                raise ValueError(f"{what}: {part!r} is not an integer") from None
    if not out:
        raise ValueError(f"{what}: give at least one value")
    return tuple(out)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def build_config(
    *,
    quick: bool,
    ctx: list[str] | None,
    depths: str | None,
    **sizes: int | bool | None,
) -> EvalConfig:
    """The full (or --quick) configuration with every option the user gave on top of it."""
    base = EvalConfig.quick() if quick else EvalConfig()
    changes: dict[str, Any] = {k: v for k, v in sizes.items() if v is not None}
    if ctx:
        changes["contexts"] = parse_ints(ctx, "--ctx")
    if depths is not None:
        changes["depths"] = parse_ints([depths], "--depths")
    return replace(base, **changes)


def eval_command(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Registry name or GGUF path (repeatable)."),
    ] = None,
    grid: Annotated[
        str,
        typer.Option(help=f"SparseK settings {GRID_ITEM}, comma-separated."),
    ] = DEFAULT_GRID,
    ctx: Annotated[
        list[str] | None,
        typer.Option("--ctx", help="Perplexity contexts, repeatable/comma list [4096,8192,16384]."),
    ] = None,
    depths: Annotated[
        str | None, typer.Option(help="llama-bench depths, comma list [0,7168,15360].")
    ] = None,
    windows: Annotated[int | None, typer.Option(help="Perplexity windows per context [4].")] = None,
    prompts: Annotated[int | None, typer.Option(help="Greedy-agreement prompts [4].")] = None,
    prompt_tokens: Annotated[int | None, typer.Option(help="Tokens per prompt [12032].")] = None,
    gen_tokens: Annotated[int | None, typer.Option(help="Greedy tokens per prompt [256].")] = None,
    pp: Annotated[int | None, typer.Option("--pp", help="llama-bench prompt tokens [512].")] = None,
    tg: Annotated[
        int | None, typer.Option("--tg", help="llama-bench tokens generated [128].")
    ] = None,
    repetitions: Annotated[int | None, typer.Option(help="llama-bench repetitions [3].")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all).")] = None,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Run llama-bench.")] = True,
    text: Annotated[
        Path | None, typer.Option(help="A UTF-8 text file instead of the pinned corpus.")
    ] = None,
    corpus_name: Annotated[
        str, typer.Option("--corpus", help=f"Pinned corpus: {', '.join(corpus.REGISTRY)}.")
    ] = corpus.DEFAULT_CORPUS,
    quick: Annotated[bool, typer.Option(help="Tiny sizes: a smoke test in seconds.")] = False,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write results.png.")] = True,
    out: Annotated[Path, typer.Option(help="Directory for results.json/.md/.png.")] = DEFAULT_OUT,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Dense vs SparseK: perplexity, greedy agreement, prefill/decode speed; JSON, table, plot."""
    from llama_sparsek._binding import LlamaError
    from llama_sparsek.eval_report import table, write
    from llama_sparsek.evaluation import evaluate

    if plot and importlib.util.find_spec("matplotlib") is None:
        # checked before hours of evaluation, not when the plot is drawn
        raise _fail("--plot needs matplotlib: pip install 'llama-sparsek[eval]', or pass --no-plot")
    try:
        settings = parse_grid(grid)
        config = build_config(
            quick=quick,
            ctx=ctx,
            depths=depths,
            windows=windows,
            prompts=prompts,
            prompt_tokens=prompt_tokens,
            gen_tokens=gen_tokens,
            pp_tokens=pp,
            tg_tokens=tg,
            repetitions=repetitions,
            threads=threads,
            speed=speed,
        )
        body = text.read_text(encoding="utf-8") if text else corpus.load_text(corpus_name)
        paths = [(m, models.resolve(m)) for m in model or [models.DEFAULT_MODEL]]
        report = evaluate(
            paths,
            body,
            settings,
            config,
            corpus=str(text) if text else corpus_name,
            command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            progress=progress,
        )
        files = write(report, out, png=plot)
    except (
        ValueError,
        OSError,
        EvalError,
        LlamaError,
        models.ModelError,
        corpus.CorpusError,
    ) as e:
        raise _fail(str(e)) from None
    typer.echo(table(report))
    typer.echo("\n" + "\n".join(f"wrote {p}" for p in files.values()))


def pareto_command(
    results: Annotated[
        list[Path],
        typer.Argument(help="results.json of `eval` runs (or their --out dirs), a corpus each."),
    ],
    ctx: Annotated[
        int | None, typer.Option(help="Perplexity context [the largest all runs measured].")
    ] = None,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write the plot.")] = True,
    out: Annotated[Path, typer.Option(help="The plot's file.")] = Path("pareto.png"),
) -> None:
    """Settings per corpus: perplexity increase vs keys kept, the Pareto front, the worst corpus."""
    from llama_sparsek.eval_report import common_context, pareto_plot, pareto_table
    from llama_sparsek.evaluation import Report

    if plot and importlib.util.find_spec("matplotlib") is None:
        raise _fail("--plot needs matplotlib: pip install 'llama-sparsek[eval]', or pass --no-plot")
    try:
        reports = []
        for path in results:
            file = path / "results.json" if path.is_dir() else path
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise EvalError(f"{file}: not JSON ({e})") from None
            try:
                reports.append(Report.from_json(data))
            except EvalError as e:
                raise EvalError(f"{file}: {e}") from None
        at = ctx if ctx is not None else common_context(reports)
        typer.echo(pareto_table(reports, at))
        if plot:
            pareto_plot(reports, at, out)
            typer.echo(f"\nwrote {out}")
    except (OSError, EvalError) as e:
        raise _fail(str(e)) from None
