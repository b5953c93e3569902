#!/usr/bin/env python3
"""A bounded load test of llama-server (as `llama-sparsek serve` runs it).

N clients each send M text-completion requests one after the other, all clients at once, and
every request is accounted for: answered (200), refused with an HTTP status, or lost (no status:
connection error or time-out). Reports throughput, latency p50/p95 and the counts; exits 1 when
a request was lost or the server answered with a 5xx.

    python scripts/load_test.py                          # starts a server: SmolLM2, 4 slots
    python scripts/load_test.py --clients 8 --requests 10 --json results.json
    python scripts/load_test.py --url http://127.0.0.1:8080   # a server already running

Only loopback servers are meant: the test is bounded (request time-out, overall deadline) and
stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llama_sparsek import models
from llama_sparsek.cli_serve import free_port, http_ready, running, server_command
from llama_sparsek.sparsek import recommended

TOPICS = ("the sea", "a city at night", "mountains", "a library", "the first train", "winter")


@dataclass
class Outcome:
    client: int
    index: int
    status: int | None  # None: lost (no HTTP status)
    seconds: float
    tokens: int = 0
    error: str = ""


@dataclass
class Report:
    clients: int
    requests_per_client: int
    sent: int
    answered: int
    refused: dict[str, int]  # HTTP status -> count
    lost: int
    server_errors: int
    wall_seconds: float
    requests_per_second: float
    tokens_per_second: float
    latency_p50: float
    latency_p95: float
    latency_max: float
    errors: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def one_request(url: str, client: int, index: int, max_tokens: int, timeout: float) -> Outcome:
    prompt = f"Client {client}, request {index}: a short poem about {TOPICS[index % len(TOPICS)]}."
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7, "seed": index}
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            answer = json.loads(response.read())
            tokens = int(answer["usage"]["completion_tokens"])
            return Outcome(client, index, response.status, time.monotonic() - start, tokens)
    except urllib.error.HTTPError as e:
        detail = e.read()[:200].decode(errors="replace")
        return Outcome(client, index, e.code, time.monotonic() - start, error=detail)
    except (OSError, ValueError, KeyError) as e:  # no status: lost
        return Outcome(client, index, None, time.monotonic() - start, error=repr(e))


def run_load(
    url: str, clients: int, requests: int, max_tokens: int, timeout: float, deadline: float
) -> Report:
    """All clients at once, each sending its requests one after another until `deadline`
    seconds have passed (requests not yet sent then are not sent, and not counted)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = time.monotonic()

    def client(c: int) -> None:
        for i in range(requests):
            if time.monotonic() - start > deadline:
                return
            outcome = one_request(url, c, i, max_tokens, timeout)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline + timeout + 5)
    wall = time.monotonic() - start
    with lock:
        done = list(outcomes)
    answered = [o for o in done if o.status == 200]
    refused = Counter(str(o.status) for o in done if o.status not in (None, 200))
    latencies = [o.seconds for o in answered]
    return Report(
        clients=clients,
        requests_per_client=requests,
        sent=len(done),
        answered=len(answered),
        refused=dict(refused),
        lost=sum(o.status is None for o in done),
        server_errors=sum(o.status is not None and o.status >= 500 for o in done),
        wall_seconds=wall,
        requests_per_second=len(answered) / wall,
        tokens_per_second=sum(o.tokens for o in answered) / wall,
        latency_p50=percentile(latencies, 50),
        latency_p95=percentile(latencies, 95),
        latency_max=max(latencies, default=math.nan),
        errors=[f"client {o.client} #{o.index}: {o.status} {o.error}" for o in done if o.error],
    )


@contextlib.contextmanager
def local_server(args: argparse.Namespace) -> Iterator[str]:
    """A llama-server started for the test (SmolLM2 by default), stopped afterwards."""
    model = models.resolve(args.model)
    port = free_port()
    settings = recommended() if args.sparsek else None
    cmd = server_command(
        model, settings, port=port, ctx=args.ctx, threads=args.threads, parallel=args.parallel
    )
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "llama-server.log"
        with running(cmd, http_ready(f"{url}/health"), log):
            yield url


def print_report(r: Report) -> None:
    print(f"clients x requests: {r.clients} x {r.requests_per_client} ({r.sent} sent)")
    print(f"answered: {r.answered}  refused: {r.refused or 0}  lost: {r.lost}")
    print(f"server errors (5xx): {r.server_errors}")
    print(
        f"wall: {r.wall_seconds:.1f} s  throughput: {r.requests_per_second:.2f} req/s, "
        f"{r.tokens_per_second:.1f} generated tokens/s"
    )
    print(
        f"latency: p50 {r.latency_p50:.2f} s  p95 {r.latency_p95:.2f} s  max {r.latency_max:.2f} s"
    )
    for line in r.errors[:10]:
        print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="registry name or GGUF")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=5, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=4, help="server slots (own server)")
    parser.add_argument("--ctx", type=int, default=4096, help="server KV cells (own server)")
    parser.add_argument("--threads", type=int, default=None, help="server threads (own server)")
    parser.add_argument("--no-sparsek", dest="sparsek", action="store_false")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--deadline", type=float, default=900.0, help="seconds for all")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop our server on SIGTERM too
    for name in ("clients", "requests", "max_tokens", "parallel", "ctx"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server(args))
        report = run_load(
            url.rstrip("/"),
            args.clients,
            args.requests,
            args.max_tokens,
            args.timeout,
            args.deadline,
        )
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 1 if report.lost or report.server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
