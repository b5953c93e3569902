"""`llama-sparsek generate -f` / `chat`: long prompts, renamed flags, sampling, bad input."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama_sparsek import memory
from llama_sparsek.cli import app
from llama_sparsek.gguf import read_metadata

runner = CliRunner()
BASE = ["--no-sparsek", "--threads", "1", "--ctx", "512"]


def _gen(tiny_model: Path, *args: str, stdin: str | None = None) -> tuple[int, str]:
    result = runner.invoke(app, ["generate", "-m", str(tiny_model), *BASE, *args], input=stdin)
    return result.exit_code, result.output


def test_generate_from_a_file_and_stdin(tiny_model: Path, tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("the and of to in is it " * 20, encoding="utf-8")
    code, from_file = _gen(tiny_model, "-f", str(doc), "-n", "6")
    assert code == 0, from_file
    code, from_stdin = _gen(tiny_model, "-f", "-", "-n", "6", stdin=doc.read_text())
    assert code == 0, from_stdin
    assert from_file == from_stdin
    code, with_prompt = _gen(tiny_model, "-f", str(doc), "the", "-n", "6", "--timings")
    assert code == 0 and "prompt" in with_prompt and "reused" in with_prompt


def test_generate_sampling_flags(tiny_model: Path) -> None:
    args = ["the and", "-n", "8", "--temp", "0.8", "--seed", "3"]
    args += ["--top-k", "5", "--top-p", "0.9", "--min-p", "0.1", "--repeat-penalty", "1.3"]
    a = _gen(tiny_model, *args)
    b = _gen(tiny_model, *args)
    assert a[0] == 0 and a == b


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x", "--sparsek", "--sparsek-top-k", "0"], "top_k"),
        (["x", "--top-p", "0"], "top_p"),
        (["x", "--repeat-penalty", "0"], "repeat_penalty"),
        (["x", "--stop", ""], "stop"),
        ([], "PROMPT"),
        (["-f", "/nonexistent/doc.txt"], "doc.txt"),
        (["x", "--ctx", "4294967296"], "context size"),
    ],
)
def test_generate_bad_input_is_exit_2(tiny_model: Path, args: list[str], message: str) -> None:
    code, output = _gen(tiny_model, *args)
    assert code == 2
    assert message in output


def test_sparsek_flags_need_sparsek(tiny_model: Path) -> None:
    code, output = _gen(tiny_model, "x", "--sparsek-window", "64")
    assert code == 2 and "--sparsek-window" in output


def test_huge_context_is_refused_before_allocating(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="GiB"):
        memory.plan(tiny_model, 2**31)


def test_default_context_follows_the_memory_rule(tiny_model: Path) -> None:
    info = read_metadata(tiny_model)
    # 2 layers x 2 KV heads x (32 + 32) dims x 2 bytes
    assert memory.kv_bytes_per_token(info) == 2 * 2 * 64 * 2
    assert memory.kv_bytes_per_token(info, "q8_0", "q8_0") == int(2 * 2 * 64 * 34 / 32)
    plan = memory.plan(tiny_model)
    assert plan.n_ctx == min(4096, memory.kv_budget() // 512 // 256 * 256)
    assert "context" in plan.describe()


def test_chat_reads_questions_from_stdin(tiny_model: Path, tmp_path: Path) -> None:
    doc = tmp_path / "system.txt"
    doc.write_text("the and of it", encoding="utf-8")
    args = ["chat", "-m", str(tiny_model), *BASE, "-f", str(doc), "-n", "4"]
    result = runner.invoke(app, [*args, "--template", "chatml"], input="the\n\nof it\n")
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, args, input="")  # refused before the first question
    assert result.exit_code == 2 and "no chat template" in result.output


def test_chat_in_a_real_process_ends_at_eof(tiny_model: Path) -> None:
    cmd = [sys.executable, "-m", "llama_sparsek", "chat", "-m", str(tiny_model), *BASE]
    cmd += ["-n", "3", "--template", "chatml", "--timings"]
    proc = subprocess.run(  # cwd: import the installed package, not the source tree
        cmd, input="the\nand\n", text=True, capture_output=True, timeout=120, cwd=tiny_model.parent
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("prompt") == 2  # one --timings line per answer
    assert proc.stdout.endswith("\n")


def test_eval_plot_checks_matplotlib_first(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def no_matplotlib(name: str, *args: object) -> object:
        return None if name == "matplotlib" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", no_matplotlib)
    result = runner.invoke(app, ["eval", "--quick", "-m", "/nonexistent.gguf"])
    assert result.exit_code == 2
    assert "matplotlib" in result.output
