"""The `llama-sparsek` command line."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from dataclasses import replace
from typing import Annotated

import typer

from llama_sparsek import models, tools
from llama_sparsek.sparsek import SparseK, recommended

app = typer.Typer(
    help="SparseK attention for llama.cpp.", no_args_is_help=True, pretty_exceptions_enable=False
)
models_app = typer.Typer(help="Fetch and locate the registry's real models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _add_subcommands() -> None:
    from llama_sparsek.cli_eval import eval_command
    from llama_sparsek.cli_gguf import app as gguf_app

    app.add_typer(gguf_app, name="gguf", help="Show, set and unset SparseK keys in GGUF files.")
    app.command("eval")(eval_command)


_add_subcommands()


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's log.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr
    )
    if not verbose:
        logging.getLogger("llama_sparsek.llama_cpp").setLevel(logging.CRITICAL)


@app.command()
def generate(
    prompt: str,
    model: Annotated[str, typer.Option("--model", "-m", help="Registry name or GGUF path.")] = (
        models.DEFAULT_MODEL
    ),
    n: Annotated[int, typer.Option("-n", "--max-tokens", help="Tokens to generate.")] = 128,
    temp: Annotated[float, typer.Option("--temp", help="0 = greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context size.")] = 4096,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all).")] = None,
    sparsek: Annotated[
        bool, typer.Option("--sparsek/--no-sparsek", help="SparseK attention.")
    ] = True,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="SparseK keys kept per query.")
    ] = None,
    window: Annotated[int | None, typer.Option(help="SparseK local window.")] = None,
    stride: Annotated[int | None, typer.Option(help="SparseK global stride (0 = none).")] = None,
    block_size: Annotated[
        int | None, typer.Option("--block-size", help="SparseK block size (1 = single keys).")
    ] = None,
) -> None:
    """Generate text, streaming it to stdout."""
    from llama_sparsek._binding import LlamaError
    from llama_sparsek.llama import Llama

    try:
        settings: SparseK | bool = False  # --no-sparsek: dense, whatever the model file says
        if sparsek:
            given = {"top_k": top_k, "window": window, "stride": stride, "block_size": block_size}
            settings = replace(recommended(), **{k: v for k, v in given.items() if v is not None})
        elif (top_k, window, stride, block_size) != (None, None, None, None):
            raise ValueError("--top-k/--window/--stride/--block-size need --sparsek")
        path = models.resolve(model)
        with Llama(path, n_ctx=ctx, n_threads=threads, sparsek=settings, seed=seed) as llm:
            for piece in llm.stream(prompt, n, temperature=temp, seed=seed):
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
    except (ValueError, FileNotFoundError, LlamaError, models.ModelError) as e:
        raise _fail(str(e)) from None


@models_app.command("list")
def models_list() -> None:
    """The registry: name, whether pulled, description."""
    for spec in models.REGISTRY.values():
        mark = "pulled" if models.is_pulled(spec.name) else "-"
        default = " (default)" if spec.name == models.DEFAULT_MODEL else ""
        typer.echo(f"{spec.name:<20} {mark:<7} {spec.description}{default}")


@models_app.command("pull")
def models_pull(name: str) -> None:
    """Download, reassemble and verify a model; print its path."""
    try:
        typer.echo(models.pull(name))
    except (ValueError, models.ModelError) as e:
        raise _fail(str(e)) from None


@models_app.command("path")
def models_path(name: str) -> None:
    """Print where a model is (or will be) stored."""
    try:
        typer.echo(models.path(name))
    except ValueError as e:
        raise _fail(str(e)) from None


@app.command()
def info(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The pinned llama.cpp, the applied patches, build flags and CPU features."""
    from llama_sparsek import _binding

    _binding.init()
    facts = tools.build_info()
    facts["sparsek_version"] = _binding.c_string(_binding.lib.llama_sparsek_version())
    facts["system_info"] = _binding.c_string(_binding.lib.llama_print_system_info()).strip()
    facts["platform"] = platform.platform()
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    typer.echo(f"llama.cpp commit: {facts['llama_cpp_commit']}")
    typer.echo(f"patch series:     {facts['sparsek_version']}")
    for i, subject in enumerate(facts["patches"], 1):
        typer.echo(f"  {i:04d} {subject}")
    typer.echo(f"build:            {facts['build_type']}, {facts['compiler']}")
    for key, value in facts["cmake_args"].items():
        typer.echo(f"  {key}={value}")
    typer.echo(f"system:           {facts['system_info']}")


@app.command(
    "test-backend-ops",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def test_backend_ops(ctx: typer.Context) -> None:
    """Run the bundled upstream test-backend-ops (e.g. `test -b CPU -o FLASH_ATTN_EXT`)."""
    exe = tools.tool_path("test-backend-ops")
    os.execv(exe, [str(exe), *ctx.args])


def main() -> None:
    app()
