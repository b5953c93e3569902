"""`llama-sparsek bench`: time to first token of a long prompt (see prefill_bench)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llama_sparsek.prefill_bench import (
    DEFAULT_MODEL,
    DEFAULT_REPETITIONS,
    DEFAULT_THREADS,
    DEFAULT_TOKENS,
    ENGINES,
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def bench_command(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Registry name or GGUF path.")
    ] = DEFAULT_MODEL,
    tokens: Annotated[
        str, typer.Option(help="Prompt lengths in tokens, comma-separated.")
    ] = ",".join(map(str, DEFAULT_TOKENS)),
    repetitions: Annotated[
        int, typer.Option("--repetitions", "-r", help="Runs per engine (best counts).")
    ] = DEFAULT_REPETITIONS,
    threads: Annotated[int, typer.Option(help="CPU threads.")] = DEFAULT_THREADS,
    engines: Annotated[
        str,
        typer.Option(help="Engines to run, comma-separated (default: all)."),
    ] = ",".join(ENGINES),
    profile: Annotated[
        bool,
        typer.Option("--profile/--no-profile", help="A perf profile row per llama.cpp engine."),
    ] = False,
    upstream_src: Annotated[
        Path | None,
        typer.Option(help="The vendor/llama.cpp working copy (tag `upstream`) to build from."),
    ] = None,
) -> None:
    """Time to first token, upstream llama.cpp vs dense vs SparseK (vs OpenVINO GenAI)."""
    from llama_sparsek import corpus, models, upstream_build
    from llama_sparsek._binding import LlamaError
    from llama_sparsek.prefill_bench import (
        BenchConfig,
        BenchError,
        parse_engines,
        parse_tokens,
        render,
        run,
    )
    from llama_sparsek.prefill_profile import ProfileError

    try:
        config = BenchConfig(
            model=model,
            tokens=parse_tokens(tokens),
            repetitions=repetitions,
            threads=threads,
            engines=parse_engines(engines),
            profile=profile,
            upstream_source=upstream_src,
        )
        report = run(config)
    except (
        ValueError,
        OSError,
        BenchError,
        ProfileError,
        LlamaError,
        models.ModelError,
        corpus.CorpusError,
        upstream_build.UpstreamBuildError,
    ) as e:
        raise _fail(str(e)) from None
    typer.echo(render(report))
