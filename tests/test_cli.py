"""The typer CLI: commands, exit codes and messages for bad input."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from llama_sparsek.cli import app

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
    assert "sparsek-2" in result.output
