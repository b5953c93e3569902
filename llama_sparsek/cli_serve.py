"""`llama-sparsek serve` and `llama-sparsek rpc-server`: llama.cpp's own HTTP server and RPC
worker, built from the patched tree, run in the foreground.

Nothing here serves or distributes anything itself: the commands resolve the model, turn the
SparseK options into llama.cpp arguments (`sparsek.tool_flags`, the one place that knows how)
and hand over to the bundled upstream program, forwarding Ctrl-C / SIGTERM to it and returning
its exit status.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from llama_sparsek import models, tools
from llama_sparsek.sparsek import SparseK, from_options, tool_flags

# signals a foreground wrapper passes on to the program it runs
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # prctl(2): the kernel signals the child when this process dies


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def server_command(
    model: Path,
    settings: SparseK | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    ctx: int = 4096,
    threads: int | None = None,
    parallel: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """The llama-server command line for `model` (flash attention on, as the Python API), with
    the bundled chat page unless `extra` chooses another (--path) or none (--no-ui)."""
    cmd = [str(tools.tool_path("llama-server")), "--model", str(model)]
    cmd += ["--host", host, "--port", str(port), "--ctx-size", str(ctx)]
    cmd += ["--parallel", str(parallel), "--flash-attn", "on"]
    if threads is not None:
        cmd += ["--threads", str(threads), "--threads-batch", str(threads)]
    ui = tools.ui_dir()
    if ui is not None and not {"--path", "--no-ui", "--no-webui"} & set(extra):
        cmd += ["--path", str(ui)]
    return cmd + tool_flags(settings) + list(extra)


def rpc_server_command(host: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """The command line of the bundled RPC worker (ggml-rpc-server) on host:port."""
    exe = tools.tool_path("ggml-rpc-server")
    return [str(exe), "--host", host, "--port", str(port), *extra]


def _die_with_parent() -> None:
    """In the child before exec: be sent SIGTERM when the wrapper dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_foreground(cmd: Sequence[str]) -> int:
    """Run `cmd` until it exits and return its exit status (128 + N when signal N ended it).

    The program gets a session of its own, so a terminal's Ctrl-C reaches it once, through
    this process (llama-server takes a second SIGINT as "exit now"); SIGINT, SIGTERM and SIGHUP
    are forwarded, and the program is sent SIGTERM if this process dies first.
    """
    proc: subprocess.Popen[bytes] | None = None
    pending: list[int] = []  # signals that arrived before the program started

    def forward(signum: int, frame: FrameType | None) -> None:
        del frame
        if proc is None:
            pending.append(signum)
        elif proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        proc = subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=_die_with_parent)
        for signum in pending:
            proc.send_signal(signum)
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def http_ready(url: str) -> Callable[[], bool]:
    """A readiness probe: GET `url` answers 200 (llama-server's /health says 503 while loading)."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, ValueError):
            return False

    return probe


def tcp_ready(host: str, port: int) -> Callable[[], bool]:
    """A readiness probe: something accepts TCP connections on host:port (an RPC worker)."""

    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=2):
                return True
        except OSError:
            return False

    return probe


class ServerError(RuntimeError):
    """A program started by `running` exited or did not get ready in time."""


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@contextlib.contextmanager
def running(
    cmd: Sequence[str], ready: Callable[[], bool], log: Path, *, timeout: float = 120.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `cmd` (output to `log`), wait up to `timeout` seconds until `ready()`, yield the
    process, and stop it on every way out. ServerError (with the log's tail) when it exits
    or is not ready in time."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                what = f"exited with {proc.returncode}" if proc.poll() is not None else "timed out"
                tail = log.read_text(errors="replace")[-4000:]
                raise ServerError(f"{Path(cmd[0]).name} {what} before it was ready:\n{tail}")
            time.sleep(0.1)
        yield proc
    finally:
        stop(proc)


_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def serve_command(
    ctx_: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="Registry name or GGUF path.")] = (
        models.DEFAULT_MODEL
    ),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    ctx: Annotated[
        int, typer.Option("--ctx", help="KV cache size, shared by the parallel slots.")
    ] = 4096,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: llama.cpp's).")] = None,
    parallel: Annotated[int, typer.Option(help="Requests decoded at the same time.")] = 1,
    sparsek: Annotated[
        bool, typer.Option("--sparsek/--no-sparsek", help="SparseK attention.")
    ] = True,
    top_k: Annotated[
        int | None, typer.Option("--sparsek-top-k", help="SparseK keys kept per query.")
    ] = None,
    window: Annotated[
        int | None, typer.Option("--sparsek-window", help="SparseK local window.")
    ] = None,
    stride: Annotated[
        int | None, typer.Option("--sparsek-stride", help="SparseK global stride (0 = none).")
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option("--sparsek-block-size", help="SparseK block size (1 = single keys)."),
    ] = None,
) -> None:
    """Serve a model with llama.cpp's llama-server (OpenAI-style API and chat page) and SparseK.

    Arguments after `--` go to llama-server unchanged (e.g. `-- --rpc HOST:PORT -ngl 99`).
    """
    try:
        settings = from_options(sparsek, top_k, window, stride, block_size)
        for name, value in (("--ctx", ctx), ("--parallel", parallel), ("--threads", threads)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        path = models.resolve(model)
        if not path.is_file():
            raise FileNotFoundError(f"no such model file: {path}")
        cmd = server_command(
            path,
            settings,
            host=host,
            port=port,
            ctx=ctx,
            threads=threads,
            parallel=parallel,
            extra=ctx_.args,
        )
    except (ValueError, FileNotFoundError, models.ModelError) as e:
        raise _fail(str(e)) from None
    raise typer.Exit(run_foreground(cmd))


def rpc_server_cli(
    ctx_: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to listen on (never an open network: no authentication).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 50052,
) -> None:
    """Run llama.cpp's RPC worker: a llama-server elsewhere offloads layers to it with
    `-- --rpc HOST:PORT -ngl 99`. Arguments after `--` go to the worker (e.g. `-t 4`)."""
    try:
        cmd = rpc_server_command(host, port, ctx_.args)
    except FileNotFoundError as e:
        raise _fail(str(e)) from None
    raise typer.Exit(run_foreground(cmd))


def register(app: typer.Typer) -> None:
    """Add `serve` and `rpc-server` to the main command line."""
    app.command("serve", context_settings=_EXTRA)(serve_command)
    app.command("rpc-server", context_settings=_EXTRA)(rpc_server_cli)
