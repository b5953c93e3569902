"""`llama-sparsek eval-tasks`: dense vs SparseK on long-context retrieval tasks (see tasks)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from llama_sparsek import corpus, models
from llama_sparsek.sparsek import GRID_ITEM, SparseK

if TYPE_CHECKING:
    from llama_sparsek.tasks import ChatModel, Outcome

# room in the context for the chat template's tokens around the messages
TEMPLATE_MARGIN = 128


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def eval_tasks_command(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Registry name or GGUF path.")
    ] = models.DEFAULT_MODEL,
    grid: Annotated[
        str,
        typer.Option(help=f"SparseK settings {GRID_ITEM}, comma-separated."),
    ] = SparseK().grid_item(),
    task_names: Annotated[
        str,
        typer.Option("--tasks", help="Comma list of passkey, needle, needles, vartrack, words."),
    ] = "passkey,needle,vartrack,words",
    lengths: Annotated[
        str, typer.Option("--task-lengths", help="Prompt lengths in tokens, comma list.")
    ] = "4096,8192",
    samples: Annotated[
        int, typer.Option("--task-samples", help="Samples per task and length.")
    ] = 4,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 48,
    filler: Annotated[
        str, typer.Option(help=f"Pinned corpus for the filler: {', '.join(corpus.REGISTRY)}.")
    ] = corpus.DEFAULT_CORPUS,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write every answer and score here (JSON).")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Dense vs SparseK: passkey, needles, variable tracking, frequent words; accuracy table."""
    from llama_sparsek import tasks
    from llama_sparsek._binding import LlamaError
    from llama_sparsek.cli_eval import parse_grid, parse_ints
    from llama_sparsek.evaluation import label
    from llama_sparsek.llama import Llama

    try:
        if samples < 1 or max_tokens < 1:
            raise ValueError("--task-samples and --max-tokens must be positive")
        settings = parse_grid(grid)
        names = tasks.parse_tasks(task_names)
        sizes = parse_ints([lengths], "--task-lengths")
        path = models.resolve(model)
        n_ctx = max(sizes) + max_tokens + TEMPLATE_MARGIN
        text = corpus.load_text(filler)

        def opener(setting: SparseK | None) -> Callable[[], AbstractContextManager[ChatModel]]:
            @contextmanager
            def open_model() -> Iterator[ChatModel]:
                with Llama(path, n_ctx=n_ctx, n_threads=threads, sparsek=setting) as llm:
                    yield cast("ChatModel", llm)

            return open_model

        with Llama(path, n_ctx=256, n_threads=threads) as tokenizer:  # only its vocabulary
            prompts = tasks.make_samples(names, sizes, samples, tokenizer, text)

        def show(variant: str, o: Outcome) -> None:
            if progress:
                typer.echo(
                    f"{variant} {o.sample.task}@{o.sample.length} seed {o.sample.seed}: "
                    f"{o.score:.2f} {o.answer.strip()[:60]!r}",
                    err=True,
                )

        variants = {label(s): opener(s) for s in (None, *settings)}
        report = tasks.compare(variants, prompts, max_tokens=max_tokens, on_done=show)
        if out is not None:
            partial = out.with_name(f".{out.name}.partial")
            partial.write_text(json.dumps(report.to_json(), indent=1) + "\n")
            partial.replace(out)
    except (ValueError, OSError, LlamaError, models.ModelError, corpus.CorpusError) as e:
        raise _fail(str(e)) from None
    typer.echo(report.table())
