"""The `llama-sparsek` command line."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from typing import Annotated

import typer

from llama_sparsek import models, tools

app = typer.Typer(
    help="SparseK attention for llama.cpp.", no_args_is_help=True, pretty_exceptions_enable=False
)
models_app = typer.Typer(help="Fetch and locate the registry's real models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _add_subcommands() -> None:
    from llama_sparsek.cli_bench import bench_command
    from llama_sparsek.cli_eval import eval_command, pareto_command
    from llama_sparsek.cli_generate import chat_command, generate_command
    from llama_sparsek.cli_gguf import app as gguf_app
    from llama_sparsek.cli_serve import register as register_serve
    from llama_sparsek.cli_tasks import eval_tasks_command

    app.command("generate")(generate_command)
    app.command("chat")(chat_command)
    app.add_typer(gguf_app, name="gguf", help="Show, set and unset SparseK keys in GGUF files.")
    app.command("eval")(eval_command)
    app.command("eval-pareto")(pareto_command)
    app.command("bench")(bench_command)
    register_serve(app)
    app.command("eval-tasks")(eval_tasks_command)


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


@models_app.command("verify")
def models_verify(
    names: Annotated[
        list[str] | None,
        typer.Argument(show_default=False, help="Models to check (default: every pulled one)."),
    ] = None,
) -> None:
    """Re-hash pulled models against their pins; exit 1 if one is damaged."""
    try:
        chosen = names or [n for n in models.REGISTRY if models.is_pulled(n)]
        damaged = 0
        for name in chosen:
            problem = models.verify(name, full=True)
            if problem is None:
                typer.echo(f"{name}: ok")
            else:
                damaged += problem != "not pulled"
                hint = (
                    ""
                    if problem == "not pulled"
                    else f" (repair: llama-sparsek models pull {name})"
                )
                typer.echo(f"{name}: {problem}{hint}")
    except (ValueError, OSError) as e:
        raise _fail(str(e)) from None
    if damaged:
        raise typer.Exit(1)


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
