"""Scale-out with llama.cpp's RPC backend: two workers (`llama-sparsek rpc-server`) on loopback
ports hold the model's layers (`--rpc ... -ngl 99`), llama-server runs SparseK over them."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from server_support import (
    PY_BATCHES,
    SPARSE,
    SPARSE_CTX,
    before_eos,
    greedy_body,
    long_prompt,
    ok,
    python_greedy,
    serve,
)

from llama_sparsek.cli_serve import (
    free_port,
    http_ready,
    rpc_server_command,
    running,
    server_command,
    stop,
    tcp_ready,
)


@contextlib.contextmanager
def workers(log_dir: Path, n: int = 2) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """`n` RPC workers on free loopback ports: their endpoints and processes."""
    with contextlib.ExitStack() as stack:
        out = []
        for _ in range(n):
            port = free_port()
            cmd = rpc_server_command("127.0.0.1", port, ["--threads", "1"])
            log = log_dir / f"rpc-{port}.log"
            proc = stack.enter_context(running(cmd, tcp_ready("127.0.0.1", port), log))
            out.append((f"127.0.0.1:{port}", proc))
        yield out


def rpc_args(endpoints: list[str]) -> list[str]:
    return ["--rpc", ",".join(endpoints), "--n-gpu-layers", "99"]


def test_split_over_two_workers_equals_the_local_run(tiny_model: Path, tmp_path: Path) -> None:
    from conftest import TINY

    prompt = long_prompt(700, TINY["n_vocab"])
    n = 24
    expected = before_eos(python_greedy(tiny_model, prompt, SPARSE, n))
    assert len(expected) >= 4
    with workers(tmp_path) as pool:
        endpoints = [e for e, _ in pool]
        extra = [*PY_BATCHES, *rpc_args(endpoints)]
        with serve(tmp_path, tiny_model, SPARSE, ctx=SPARSE_CTX, extra=extra) as url:
            answer = ok(f"{url}/completion", greedy_body(prompt, n))
    assert answer["tokens"][: len(expected)] == expected
    for endpoint in endpoints:  # the server used both workers (the readiness probe is one)
        log = (tmp_path / f"rpc-{endpoint.rsplit(':', 1)[1]}.log").read_text()
        assert log.count("Accepted client connection") > 1, log


def test_a_worker_killed_mid_request_is_an_error_not_a_hang(
    tiny_model: Path, tmp_path: Path
) -> None:
    from conftest import TINY

    prompt = long_prompt(64, TINY["n_vocab"])
    with workers(tmp_path) as pool:
        port = free_port()
        extra = rpc_args([e for e, _ in pool])
        cmd = server_command(tiny_model, SPARSE, port=port, ctx=4096, threads=2, extra=extra)
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "llama-server.log"
        with running(cmd, http_ready(f"{url}/health"), log) as server:
            body = {**greedy_body(prompt, 3800), "stream": True}
            req = urllib.request.Request(
                f"{url}/completion",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            started = time.monotonic()
            finished = False
            error: BaseException | None = None
            with urllib.request.urlopen(req, timeout=60) as response:
                response.readline()  # the first token is out: the request is running
                pool[1][1].send_signal(signal.SIGKILL)
                try:
                    for line in response:
                        if line.startswith(b"data: ") and json.loads(line[6:]).get("stop"):
                            finished = True
                except (OSError, http.client.HTTPException) as e:
                    error = e
            assert not finished, "the request finished although a worker was killed"
            assert time.monotonic() - started < 60
            # the server gives up on the lost worker: it exits (llama.cpp aborts on a broken
            # RPC connection) or stays healthy; it never keeps the port without answering
            deadline = time.monotonic() + 30
            while server.poll() is None and time.monotonic() < deadline:
                if http_ready(f"{url}/health")():
                    break
                time.sleep(0.2)
            assert server.poll() is not None or http_ready(f"{url}/health")()
            print(f"client error: {error!r}; server exit status: {server.poll()}")
            stop(server)
