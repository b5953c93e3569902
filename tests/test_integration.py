"""Integration on the real default model (SmolLM2-135M), against upstream's own CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

from llama_sparsek import Llama, tools

PROMPT = "The capital of France is Paris. The capital of Germany is"


def test_greedy_matches_upstream_completion_cli(smollm2_path: Path) -> None:
    n = 48
    with Llama(smollm2_path, n_ctx=1024, n_threads=2, flash_attn=True) as llm:
        ours = llm.generate(PROMPT, n, temperature=0.0)
    cmd = [
        str(tools.tool_path("llama-completion")),
        "-m",
        str(smollm2_path),
        "-p",
        PROMPT,
        "-n",
        str(n),
        "--temp",
        "0",
        "-no-cnv",
        "--no-display-prompt",
        "-c",
        "1024",
        "-t",
        "2",
        "-fa",
        "on",
        "--no-warmup",
        "--simple-io",
    ]
    proc = subprocess.run(
        cmd, text=True, capture_output=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = proc.stdout.replace("[end of text]", "")
    assert len(ours.strip()) > 10
    assert ours.strip() == theirs.strip()


def test_smollm2_answers_sensibly(smollm2_path: Path) -> None:
    with Llama(smollm2_path, n_ctx=512, n_threads=2) as llm:
        assert "Berlin" in llm.generate(PROMPT, 8)
