"""llama-server as `llama-sparsek serve` runs it, against a real HTTP client.

The answers are checked against the Python API (`llama_sparsek.Llama`, greedy, same settings):
chat through the model's template, text completion, 4 requests decoded together, and a long
prompt on which SparseK drops keys. Also: prompt-cache reuse, bad requests, the CLI's signal
handling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import (
    PY_BATCHES,
    SPARSE,
    SPARSE_CTX,
    before_eos,
    events,
    greedy_body,
    long_prompt,
    ok,
    python_greedy,
    request,
    serve,
)

from llama_sparsek import Llama, SparseK, tools
from llama_sparsek.cli_serve import free_port, http_ready, server_command, stop
from llama_sparsek.sparsek import tool_flags

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SLOTS = 4


def smollm_chat_prompt(question: str) -> str:
    """SmolLM2's chat template (tokenizer.chat_template in its GGUF) rendered by hand."""
    return (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def chat_url(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SmolLM2 with the recommended SparseK settings, 4 slots of 1024 cells."""
    logs = tmp_path_factory.mktemp("server")
    with serve(logs, smollm2_path, SparseK(), ctx=SLOTS * 1024, parallel=SLOTS) as url:
        yield url


@pytest.fixture(scope="module")
def smollm(smollm2_path: Path) -> Iterator[Llama]:
    with Llama(smollm2_path, n_ctx=1024, n_threads=2, sparsek=SparseK()) as llm:
        yield llm


def test_health(chat_url: str) -> None:
    assert ok(f"{chat_url}/health") == {"status": "ok"}


def test_chat_uses_the_models_template(chat_url: str, smollm: Llama) -> None:
    question = "What is the capital of France?"
    answer = ok(
        f"{chat_url}/v1/chat/completions",
        {"messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0},
    )
    (choice,) = answer["choices"]
    assert choice["message"]["role"] == "assistant"
    prompt = smollm_chat_prompt(question)
    assert answer["usage"]["prompt_tokens"] == len(smollm.tokenize(prompt))
    expected = smollm.generate(prompt, 16)
    assert choice["message"]["content"] == expected.strip()
    assert choice["finish_reason"] in ("stop", "length")


def test_chat_streaming_equals_non_streaming(chat_url: str) -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 16,
        "temperature": 0,
        # both evaluate the whole prompt: a reused one is evaluated as a one-token batch, which
        # flash attention rounds differently (the same greedy answer is not guaranteed)
        "cache_prompt": False,
    }
    whole = ok(f"{chat_url}/v1/chat/completions", body)["choices"][0]["message"]["content"]
    chunks = events(f"{chat_url}/v1/chat/completions", {**body, "stream": True})
    assert len(chunks) > 2
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert "".join(pieces) == whole
    finish = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert finish[-1] in ("stop", "length")


def test_text_completion_equals_python(chat_url: str, smollm: Llama) -> None:
    prompt = "The capital of France is"
    answer = ok(
        f"{chat_url}/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0}
    )
    assert answer["choices"][0]["text"] == smollm.generate(prompt, 12)
    assert answer["usage"]["completion_tokens"] <= 12


def test_parallel_requests_each_get_their_own_answer(chat_url: str) -> None:
    prompts = [
        "The first rule of the road is",
        "def add(a, b):",
        "Once upon a time, a dragon",
        "The boiling point of water",
    ]
    body = {"max_tokens": 12, "temperature": 0}
    alone = [ok(f"{chat_url}/completion", {**body, "prompt": p})["content"] for p in prompts]
    together: list[Any] = [None] * len(prompts)

    def ask(i: int) -> None:
        together[i] = ok(f"{chat_url}/completion", {**body, "prompt": prompts[i]})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(r is not None for r in together), "a request got no answer"
    assert [r["content"] for r in together] == alone
    assert len({r["id_slot"] for r in together}) == SLOTS  # decoded in 4 slots at once


def test_prompt_cache_is_reused(chat_url: str) -> None:
    prefix = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(20))
    body = {"n_predict": 4, "temperature": 0, "cache_prompt": True}
    first = ok(f"{chat_url}/completion", {**body, "prompt": prefix + " First"})
    second = ok(f"{chat_url}/completion", {**body, "prompt": prefix + " Second"})
    n_prompt = second["tokens_evaluated"]
    assert first["timings"]["prompt_n"] == first["tokens_evaluated"]  # nothing cached yet
    assert second["timings"]["cache_n"] > n_prompt // 2
    assert second["timings"]["prompt_n"] < n_prompt - n_prompt // 2


def test_malformed_json_is_an_error_and_the_server_stays_up(chat_url: str) -> None:
    status, _ = request(f"{chat_url}/v1/chat/completions", raw=b'{"messages": [')
    assert 400 <= status < 600
    status, _ = request(f"{chat_url}/v1/chat/completions", {"messages": "not a list"})
    assert 400 <= status < 600
    assert ok(f"{chat_url}/health") == {"status": "ok"}


def test_prompt_longer_than_the_context_is_an_error(chat_url: str) -> None:
    too_long = "word " * 3000  # a slot holds 1024 tokens
    status, answer = request(f"{chat_url}/completion", {"prompt": too_long, "n_predict": 4})
    assert 400 <= status < 600, answer
    assert ok(f"{chat_url}/health") == {"status": "ok"}
    assert ok(f"{chat_url}/completion", {"prompt": "Hello", "n_predict": 2})["content"] != ""


def test_long_prompt_with_sparsek_equals_python(tiny_model: Path, tmp_path: Path) -> None:
    from conftest import TINY

    prompt = long_prompt(700, TINY["n_vocab"])
    n = 24
    expected = before_eos(python_greedy(tiny_model, prompt, SPARSE, n))
    assert len(expected) >= 4
    # SparseK changes this answer: the server's must come from the sparse graph
    assert python_greedy(tiny_model, prompt, None, n)[: len(expected)] != expected
    with serve(tmp_path, tiny_model, SPARSE, ctx=SPARSE_CTX, extra=PY_BATCHES) as url:
        answer = ok(f"{url}/completion", greedy_body(prompt, n))
    assert answer["tokens_evaluated"] == len(prompt)
    assert answer["tokens"][: len(expected)] == expected


def test_the_server_gets_the_runtime_sparsek_flags(tiny_model: Path) -> None:
    cmd = server_command(tiny_model, SPARSE)
    flags = tool_flags(SPARSE)
    assert flags == cmd[cmd.index("--sparsek") : cmd.index("--sparsek") + len(flags)]
    off = server_command(tiny_model, None)
    assert off[off.index("--sparsek") + 1] == "off"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_serve_stops_cleanly_on_a_signal(
    tiny_model: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_sparsek", "serve", "-m", str(tiny_model)]
    cmd += ["--port", str(port), "--ctx", "256", "--threads", "1", "--", "--no-ui"]
    log = (tmp_path / "serve.log").open("wb")
    # from tmp_path: `-m` must find the installed package, not a source checkout
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        ready = http_ready(f"http://127.0.0.1:{port}/health")
        for _ in range(600):
            if ready() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert ready(), (tmp_path / "serve.log").read_text()
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()
        assert not ready()
    finally:
        stop(proc)
        log.close()


def test_cli_serve_rejects_bad_options(tiny_model: Path) -> None:
    from typer.testing import CliRunner

    from llama_sparsek.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["serve", "-m", str(tiny_model), "--no-sparsek", "--sparsek-top-k", "8"]
    )
    assert result.exit_code == 2
    assert "--sparsek-top-k need SparseK on" in result.output
    result = runner.invoke(app, ["serve", "-m", str(tiny_model), "--sparsek-top-k", "0"])
    assert result.exit_code == 2
    assert "top_k" in result.output
    result = runner.invoke(app, ["serve", "-m", os.devnull + ".gguf"])
    assert result.exit_code == 2


def test_the_bundled_programs_find_their_libraries() -> None:
    """Every bundled program and library resolves its shared libraries from the package
    (RPATH $ORIGIN/../_lib and $ORIGIN), the RPC backend's included."""
    files = [tools.tool_path(name) for name in tools.TOOLS]
    files += sorted((tools.PACKAGE_DIR / "_lib").glob("*.so"))
    for path in files:
        ldd = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True)
        assert "not found" not in ldd.stdout, f"{path.name}:\n{ldd.stdout}"
    ldd = subprocess.run(
        ["ldd", str(tools.tool_path("llama-server"))], capture_output=True, text=True
    )
    (rpc_line,) = [line for line in ldd.stdout.splitlines() if "libggml-rpc.so =>" in line]
    rpc_lib = Path(rpc_line.split("=>")[1].split("(")[0].strip()).resolve()
    assert rpc_lib.parent == (tools.PACKAGE_DIR / "_lib").resolve()
    for name, flag in (("llama-server", "--version"), ("ggml-rpc-server", "--help")):
        run = subprocess.run([tools.tool_path(name), flag], capture_output=True, timeout=60)
        assert run.returncode == 0, run.stderr
