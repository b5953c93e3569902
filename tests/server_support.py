"""For the llama-server tests: a small stdlib HTTP client, a server started for a test, and the
Python API's greedy answer to compare with."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama_sparsek import Llama, SparseK
from llama_sparsek.cli_serve import free_port, http_ready, running, server_command

TIMEOUT = 300.0  # seconds for any one request: a hang fails the test instead of blocking it
# few keys, so that a prompt of a few hundred tokens is attended sparsely
SPARSE = SparseK(top_k=64, window=32, stride=0, block_size=8)
SPARSE_CTX = 1024
# the Python API's batches, so that the server splits a long prompt the same way
PY_BATCHES = ("--batch-size", "512", "--ubatch-size", "512")


def request(
    url: str, body: Any = None, *, raw: bytes | None = None, timeout: float = TIMEOUT
) -> tuple[int, Any]:
    """GET (no body) or POST JSON; (status, decoded JSON body), error statuses included."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text or b"null")
        except json.JSONDecodeError:
            return e.code, text.decode(errors="replace")


def ok(url: str, body: Any = None, *, timeout: float = TIMEOUT) -> Any:
    """The JSON answer of a request that must succeed."""
    status, answer = request(url, body, timeout=timeout)
    assert status == 200, (status, answer)
    return answer


def events(url: str, body: Any, *, timeout: float = TIMEOUT) -> list[Any]:
    """The JSON events of a server-sent-events answer, up to `data: [DONE]` or its end."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    out = []
    with urllib.request.urlopen(req, timeout=timeout) as response:
        assert response.status == 200
        assert response.headers.get_content_type() == "text/event-stream"
        for line in response:
            text = line.decode().strip()
            if not text.startswith("data: "):
                continue
            if text == "data: [DONE]":
                break
            out.append(json.loads(text[len("data: ") :]))
    return out


def long_prompt(n: int, n_vocab: int, seed: int = 1) -> list[int]:
    """BOS, then `n` - 1 random token ids of a vocabulary of `n_vocab` (3 control tokens)."""
    rng = np.random.default_rng(seed)
    return [1, *rng.integers(3, n_vocab, n - 1).tolist()]


def python_greedy(model: Path, prompt: list[int], settings: SparseK | None, n: int) -> list[int]:
    """The Python API's `n` greedy tokens after `prompt` (end of generation not stopping it)."""
    with Llama(model, n_ctx=SPARSE_CTX, n_threads=2, sparsek=settings) as llm:
        return list(llm.generate_tokens(prompt, n, stop_at_eog=False))


TINY_EOS = 2  # the tiny model's end-of-generation token (conftest.write_tiny_llama)


def before_eos(tokens: list[int]) -> list[int]:
    """The greedy tokens up to the tiny model's first end of generation: past it the server
    (`ignore_eos` bans the token) and the Python API (which takes it) continue differently."""
    return tokens[: tokens.index(TINY_EOS)] if TINY_EOS in tokens else tokens


def greedy_body(prompt: list[int], n: int) -> dict[str, Any]:
    """A /completion request for `n` greedy tokens after the token ids `prompt`, ids back."""
    return {
        "prompt": prompt,
        "n_predict": n,
        "temperature": 0,
        "ignore_eos": True,
        "return_tokens": True,
        "cache_prompt": False,
    }


@contextlib.contextmanager
def serve(
    log_dir: Path,
    model: Path,
    settings: SparseK | None,
    *,
    ctx: int,
    parallel: int = 1,
    threads: int = 2,
    extra: Sequence[str] = (),
) -> Iterator[str]:
    """llama-server on a free loopback port, as `llama-sparsek serve` starts it; its base URL.
    Stopped on every way out; its log is `log_dir/llama-server-PORT.log`."""
    port = free_port()
    cmd = server_command(
        model, settings, port=port, ctx=ctx, threads=threads, parallel=parallel, extra=extra
    )
    url = f"http://127.0.0.1:{port}"
    with running(cmd, http_ready(f"{url}/health"), log_dir / f"llama-server-{port}.log"):
        yield url
