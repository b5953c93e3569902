"""The typer CLI: commands, exit codes and messages for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama_sparsek.cli import app

ROOT = Path(__file__).resolve().parent.parent

runner = CliRunner()


def test_generate_on_a_path_streams_text(tiny_model: Path) -> None:
    result = runner.invoke(
        app,
        [
            "generate",
            "the and",
            "-m",
            str(tiny_model),
            "-n",
            "8",
            "--no-sparsek",
            "--ctx",
            "256",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_generate_missing_model_is_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "x", "-m", str(tmp_path / "none.gguf")])
    assert result.exit_code == 2
    assert "none.gguf" in result.output


def test_generate_invalid_sparsek_is_exit_2(tiny_model: Path) -> None:
    result = runner.invoke(app, ["generate", "x", "-m", str(tiny_model), "--sparsek-top-k", "0"])
    assert result.exit_code == 2
    assert "top_k" in result.output


def test_models_list_names_the_registry() -> None:
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert name in result.output


def test_models_unknown_name_is_exit_2() -> None:
    result = runner.invoke(app, ["models", "path", "gpt-17"])
    assert result.exit_code == 2
    assert "unknown model" in result.output


def test_info_shows_pin_and_patches() -> None:
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "0c1e57098bba43ac29e6e3b677cdceebdd22334f" in result.output
    assert "llama_sparsek_version" in result.output  # the subject of patch 0001
    assert "sparsek-7" in result.output


# Runs the CLI in a fresh interpreter, then prints the heavy modules it imported.
_IMPORT_PROBE = """
import json, sys
from llama_sparsek.cli import app
try:
    app(sys.argv[1:])
except SystemExit:
    pass
heavy = ("numpy", "llama_sparsek._llama_cffi", "llama_sparsek._binding", "llama_sparsek.llama")
print("\\nIMPORTED " + json.dumps([m for m in heavy if m in sys.modules]))
"""


def _heavy_imports(*args: str) -> list[str]:
    # from the tests' directory: the installed package, not the source tree's (no native module)
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, *args],
        text=True,
        capture_output=True,
        timeout=120,
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("IMPORTED "))
    imported: list[str] = json.loads(line.removeprefix("IMPORTED "))
    return imported


@pytest.mark.parametrize(
    "args",
    [
        ["models", "list"],
        ["--help"],
        ["gguf", "--help"],
        ["eval", "--help"],
        ["models", "path", "x"],
    ],
)
def test_commands_without_a_model_stay_lean(args: list[str]) -> None:
    """Commands that run no model import neither numpy nor the native library."""
    assert _heavy_imports(*args) == []


def test_gguf_show_stays_lean(tiny_model: Path) -> None:
    assert _heavy_imports("gguf", "show", str(tiny_model)) == []


def test_the_probe_sees_heavy_imports() -> None:
    """The probe itself can fail: `info` loads the native library (and generate would)."""
    assert "llama_sparsek._llama_cffi" in _heavy_imports("info")


def test_the_version_is_written_once() -> None:
    """pyproject.toml has no version of its own: the build reads `__version__` from
    llama_sparsek/__init__.py, so the installed metadata and the package agree."""
    import importlib.metadata
    import tomllib

    import llama_sparsek

    assert importlib.metadata.version("llama-sparsek") == llama_sparsek.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    source = project["tool"]["scikit-build"]["metadata"]["version"]
    assert source["input"] == "llama_sparsek/__init__.py"


SAMPLING_OPTIONS = {
    "temp": "temperature",
    "top-k": "top_k",
    "top-p": "top_p",
    "min-p": "min_p",
    "repeat-penalty": "repeat_penalty",
    "repeat-last-n": "penalty_last_n",
}


def test_sampling_defaults_live_in_sampling() -> None:
    """generate and chat leave every sampling option unset (Sampling() fills it in), and the
    README's synopsis shows Sampling()'s values."""
    import inspect

    from llama_sparsek.cli_generate import chat_command, generate_command, sampling_settings
    from llama_sparsek.sampling import Sampling

    defaults = Sampling()
    assert sampling_settings() == defaults
    for command in (generate_command, chat_command):
        params = inspect.signature(command).parameters
        for name in ("temp", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed"):
            assert params[name].default is None, (command.__name__, name)
    readme = (ROOT / "README.md").read_text()
    shown = dict(re.findall(r"\[--([a-z-]+) ([0-9.]+)\]", readme))
    for option, field in SAMPLING_OPTIONS.items():
        assert float(shown[option]) == getattr(defaults, field), option
