#!/usr/bin/env python3
"""Reproduce the README's results: dense vs SparseK on SmolLM2-135M over the default grid.

    python scripts/evaluate.py             # the README run, into docs/eval/
    python scripts/evaluate.py --quick     # the same pipeline at smoke-test size
    python scripts/evaluate.py --out DIR --threads 4 ...   # any `llama-sparsek eval` option

It runs `llama-sparsek eval` with the README's exact arguments (an option you give replaces the
README's value), then writes DIR/README-section.md: the command line, the table and the plot,
ready to paste.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from llama_sparsek.cli_eval import DEFAULT_GRID, eval_command

# The README run: each of these is replaced (not extended) when the caller gives the option.
README_OPTIONS = {
    "--model": "smollm2-135m",
    "--grid": DEFAULT_GRID,
    "--ctx": "4096,8192,16384",
    "--depths": "0,7168,15360",
    "--threads": "2",
    "--out": "docs/eval",
}
_ALIASES = {"-m": "--model"}
_SIZES = ("--ctx", "--depths")  # --quick brings its own


def command_args(user: list[str]) -> list[str]:
    """README_OPTIONS less those the user gave, then the user's arguments."""
    given = {_ALIASES.get(a, a.split("=", 1)[0]) for a in user if a.startswith("-")}
    if "--quick" in given:
        given.update(_SIZES)
    defaults = [
        x for opt, value in README_OPTIONS.items() if opt not in given for x in (opt, value)
    ]
    return defaults + user


def out_dir(args: list[str]) -> Path:
    """The --out directory the command writes to (the last one given)."""
    out = README_OPTIONS["--out"]
    for i, arg in enumerate(args):
        if arg == "--out" and i + 1 < len(args):
            out = args[i + 1]
        elif arg.startswith("--out="):
            out = arg.split("=", 1)[1]
    return Path(out)


def readme_section(args: list[str], out: Path) -> str:
    table = (out / "results.md").read_text().strip()
    plot = out / "results.png"
    lines = [
        "## Results",
        "",
        "Dense vs SparseK on real text (`llama-sparsek eval`, see `llama_sparsek/evaluation.py`"
        " for what each column measures):",
        "",
        "```sh",
        shlex.join(["llama-sparsek", "eval", *args]),
        "```",
        "",
        table,
    ]
    if plot.exists():
        lines += ["", f"![speed-up vs perplexity increase]({plot.as_posix()})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = command_args(sys.argv[1:] if argv is None else argv)
    app = typer.Typer(add_completion=False)
    app.command()(eval_command)
    try:
        # non-standalone click returns the exit code of a typer.Exit instead of raising it
        rc = typer.main.get_command(app).main(args, prog_name="evaluate.py", standalone_mode=False)
    except typer.Exit as e:
        rc = e.exit_code
    if rc:
        return int(rc)
    out = out_dir(args)
    (out / "README-section.md").write_text(readme_section(args, out))
    print(f"wrote {out / 'README-section.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
