"""Time to first token of a long prompt of real text: what a user waits for before any output.

Engines, each fed the same token ids (the bundled corpus, tokenized once), 2 threads, flash
attention on:

- `upstream`: a pristine build of the pinned llama.cpp (`upstream_build`), not our binary;
- `dense` and `sparsek`: this project's bundled tools, dense and with the recommended SparseK;
- `openvino` and `openvino-xattention`: the CPU peer (`peer_openvino`), when installed.

The llama.cpp engines run the same driver, `llama-completion -f PROMPT -n 1` (batches of 2048,
ubatches of 512, as llama-bench), and report the "prompt eval time" it prints: the wall time from
the prompt's first `llama_decode` to its logits, after the model is loaded and warmed up. Unlike
llama-bench (random token ids) it evaluates real text, and unlike llama-perplexity it computes
the logits of the last token only, as a chat does. With `--verbose-prompt` it lists the ids it
evaluated: a run that did not evaluate exactly the prompt's ids fails.

Runs are interleaved (every engine once per round, the order rotated each round) and each
engine's best of N is reported, next to the upstream build's: these machines are shared.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from llama_sparsek.prefill_profile import (
    ACTIVATIONS,
    ATTENTION,
    MATMUL_OTHER,
    MATMUL_PREFIX,
    REST,
    SELECTION,
    WAIT,
    Profile,
    check_perf,
    record,
    symbols_warning,
    unstripped_builds,
)
from llama_sparsek.sparsek import tool_flags

if TYPE_CHECKING:
    from llama_sparsek.peer_openvino import PeerEngine

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TOKENS = (7680,)
DEFAULT_REPETITIONS = 3
DEFAULT_THREADS = 2
N_BATCH, N_UBATCH = 2048, 512
MIN_TOKENS = 16
MAX_CUT_SHIFT = 64  # how far fit_prompt looks for a cut that round-trips
UPSTREAM, DENSE, SPARSEK = "upstream", "dense", "sparsek"
PEER_DENSE, PEER_SPARSE = "openvino", "openvino-xattention"
ENGINES = (UPSTREAM, DENSE, SPARSEK, PEER_DENSE, PEER_SPARSE)
LLAMA_CPP_ENGINES = (UPSTREAM, DENSE, SPARSEK)


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says which and why."""


# --------------------------------------------------------------------------- arguments


def parse_tokens(text: str) -> tuple[int, ...]:
    """`--tokens 2048,4096`: distinct prompt lengths of at least MIN_TOKENS, in the given order."""
    values: list[int] = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"--tokens: {item!r} is not an integer") from None
        if value < MIN_TOKENS:
            raise ValueError(f"--tokens: {value} is too short (at least {MIN_TOKENS})")
        if value in values:
            raise ValueError(f"--tokens: {value} is given twice")
        values.append(value)
    return tuple(values)


def parse_engines(text: str) -> tuple[str, ...]:
    """`--engines upstream,sparsek`: known engine names, in the canonical order."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(names - set(ENGINES))
    if unknown:
        raise ValueError(f"--engines: unknown {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    if not names:
        raise ValueError("--engines: name at least one engine")
    return tuple(e for e in ENGINES if e in names)


@dataclass(frozen=True)
class BenchConfig:
    model: str = DEFAULT_MODEL
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    repetitions: int = DEFAULT_REPETITIONS
    threads: int = DEFAULT_THREADS
    engines: tuple[str, ...] = ENGINES
    profile: bool = False
    upstream_source: Path | None = None  # vendor/llama.cpp (tag `upstream`); None: found

    def __post_init__(self) -> None:
        if self.repetitions < 1:
            raise ValueError(f"repetitions must be >= 1, got {self.repetitions}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not self.tokens or min(self.tokens) < MIN_TOKENS:
            raise ValueError(f"prompt lengths must be >= {MIN_TOKENS}, got {self.tokens}")
        parse_engines(",".join(self.engines))


# --------------------------------------------------------------------------- the prompt


@dataclass(frozen=True)
class Prompt:
    """Text whose tokenization (with the model's special tokens, e.g. BOS) is `tokens`."""

    text: str
    tokens: tuple[int, ...]


def fit_prompt(
    ids: Sequence[int],
    n: int,
    detokenize: Callable[[Sequence[int]], str],
    tokenize: Callable[[str], list[int]],
) -> Prompt:
    """A prefix of the text `ids` encode that tokenizes back to exactly `n` tokens.

    Cutting a tokenization and detokenizing does not always round-trip at the cut (a word split
    in two tokens, BOS added on the way back), so cuts near `n` are tried, nearest first.
    The text never ends with a newline: llama.cpp's `-f` drops one.
    """
    if n > len(ids):
        raise BenchError(f"the text has {len(ids)} tokens, too few for a {n}-token prompt")
    for step in range(2 * MAX_CUT_SHIFT + 1):
        cut = n + (step + 1) // 2 * (1 if step % 2 else -1)  # n, n+1, n-1, n+2, ...
        if not 0 <= cut <= len(ids):
            continue
        text = detokenize(ids[:cut]).rstrip("\n")
        tokens = tokenize(text)
        if len(tokens) == n:
            return Prompt(text, tuple(tokens))
    raise BenchError(f"no prefix of the text tokenizes to exactly {n} tokens")


def load_prompts(model: Path, sizes: Sequence[int], text: str) -> dict[int, Prompt]:
    """One prompt per size, cut from `text` with the model's own tokenizer."""
    from llama_sparsek.llama import Llama

    with Llama(model, n_ctx=256, n_threads=1) as llm:
        ids = llm.tokenize(text, add_special=False, parse_special=False)
        # what llama-completion does with the prompt: special tokens added and parsed
        return {n: fit_prompt(ids, n, llm.detokenize, llm.tokenize) for n in sizes}


# --------------------------------------------------------------------------- llama.cpp engines


def context_size(n_tokens: int) -> int:
    """A context that holds the prompt (llama-completion wants 4 cells to spare), in 256s."""
    return -(-(n_tokens + 4) // 256) * 256


@dataclass(frozen=True)
class LlamaCppEngine:
    """One llama-completion binary with engine-specific arguments."""

    name: str
    exe: Path
    extra: tuple[str, ...] = ()

    def command(self, model: Path, prompt_file: Path, n_tokens: int, threads: int) -> list[str]:
        return [
            str(self.exe),
            *("-m", str(model), "-f", str(prompt_file), "-n", "1"),
            *("-c", str(context_size(n_tokens)), "-b", str(N_BATCH), "-ub", str(N_UBATCH)),
            *("-t", str(threads), "-tb", str(threads), "-fa", "on"),
            *("-no-cnv", "--no-display-prompt", "--verbose-prompt", "--temp", "0", "--seed", "1"),
            *self.extra,
        ]


# `--verbose-prompt` lines: `<id> -> '<piece>'`, after the log's time stamp and level when
# the output is not a terminal (`0.16.131.897 I `)
_TOKEN_LINE = re.compile(r"^(?:[0-9.]+ [A-Z] )?\s*(\d+) -> '", re.MULTILINE)
_PROMPT_EVAL = re.compile(r"prompt eval time =\s*([0-9.]+) ms /\s*(\d+) tokens")


def parse_completion(output: str, expected: Sequence[int]) -> float:
    """Seconds of prompt evaluation in llama-completion's output (`--verbose-prompt`), after
    checking that it evaluated exactly the token ids `expected`."""
    ids = [int(t) for t in _TOKEN_LINE.findall(output)]
    if ids != list(expected):
        where = next(
            (i for i, (a, b) in enumerate(zip(ids, expected, strict=False)) if a != b),
            min(len(ids), len(expected)),
        )
        raise BenchError(
            f"the tool evaluated {len(ids)} token ids, the prompt has {len(expected)}; "
            f"first difference at position {where}"
        )
    found = _PROMPT_EVAL.search(output)
    if found is None:
        raise BenchError("no 'prompt eval time' in the tool's output")
    ms, n = float(found.group(1)), int(found.group(2))
    if n != len(expected):
        raise BenchError(f"the tool timed {n} prompt tokens, the prompt has {len(expected)}")
    return ms / 1000.0


def run_tool(cmd: Sequence[str]) -> str:
    """Run a llama.cpp tool; its stdout and stderr, or BenchError with their tail."""
    proc = subprocess.run(
        list(cmd), stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace"
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise BenchError(f"{Path(cmd[0]).name} exited with {proc.returncode}:\n{tail}")
    return output


# --------------------------------------------------------------------------- measuring


class Timer(Protocol):
    """Times one prompt: `repetition` lets an engine vary its input between runs."""

    def __call__(self, prompt: Prompt, repetition: int) -> float: ...


@dataclass
class Result:
    tokens: int
    engine: str
    label: str
    times: list[float] = field(default_factory=list)
    profile: Profile | None = None
    profiled_time: float | None = None  # the TTFT of the run under perf

    @property
    def best(self) -> float:
        return min(self.times)


@dataclass
class Report:
    model: str
    results: list[Result]
    notes: list[str]

    def result(self, tokens: int, engine: str) -> Result | None:
        return next((r for r in self.results if (r.tokens, r.engine) == (tokens, engine)), None)


def rotated(items: Sequence[str], k: int) -> list[str]:
    """`items` starting at position k mod len: round k's order."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def measure(
    timers: Mapping[str, Timer],
    prompts: Mapping[int, Prompt],
    repetitions: int,
    results: Mapping[tuple[int, str], Result],
    log: Callable[[str], None],
) -> None:
    """Every engine once per round and prompt, rounds rotated, times appended to `results`."""
    names = list(timers)
    for rep in range(repetitions):
        for n, prompt in prompts.items():
            for name in rotated(names, rep):
                seconds = timers[name](prompt, rep)
                results[n, name].times.append(seconds)
                log(f"[{rep + 1}/{repetitions}] {n} tokens, {name}: {seconds:.3f} s")


# --------------------------------------------------------------------------- tables


def _ratio(baseline: Result | None, result: Result) -> str:
    if baseline is None or not baseline.times or not result.times:
        return "-"
    return f"{baseline.best / result.best:.2f}x"


def table(report: Report) -> str:
    """TTFT, prompt tokens per second and speed relative to the pristine upstream build."""
    lines = [
        "| tokens | engine | TTFT s | prompt t/s | vs upstream | runs s |",
        "| ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in report.results:
        if not r.times:
            continue
        runs = ", ".join(f"{t:.2f}" for t in r.times)
        lines.append(
            f"| {r.tokens} | {r.label} | {r.best:.2f} | {r.tokens / r.best:.1f} | "
            f"{_ratio(report.result(r.tokens, UPSTREAM), r)} | {runs} |"
        )
    return "\n".join(lines)


def profile_columns(profiles: Sequence[Profile]) -> list[str]:
    """Weight mat muls by type (sorted), then the fixed categories."""
    types = sorted(
        {c for p in profiles for c in p.counts if c.startswith(MATMUL_PREFIX)}
        - {ACTIVATIONS, MATMUL_OTHER}
    )
    return [*types, ACTIVATIONS, MATMUL_OTHER, ATTENTION, SELECTION, WAIT, REST]


def profile_table(report: Report) -> str:
    """Share of the decode's CPU samples per category, one row per profiled llama.cpp engine."""
    rows = [r for r in report.results if r.profile is not None]
    if not rows:
        return ""
    profiles = [r.profile for r in rows if r.profile is not None]
    columns = profile_columns(profiles)
    head = ["tokens", "engine", "profiled TTFT s", "weight mat muls", *columns, "samples"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for r in rows:
        p = r.profile
        assert p is not None
        ttft = "-" if r.profiled_time is None else f"{r.profiled_time:.2f}"
        shares = [f"{100 * p.share(c):.1f}%" for c in columns]
        cells = [str(r.tokens), r.label, ttft, f"{100 * p.matmul_share:.1f}%", *shares]
        lines.append("| " + " | ".join([*cells, f"{p.decode_samples}/{p.samples}"]) + " |")
    return "\n".join(lines)


def render(report: Report) -> str:
    parts = [f"**{report.model}**, time to first token (best of the runs)", "", table(report)]
    profile = profile_table(report)
    if profile:
        parts += ["", "Profile (share of the prefill's CPU samples, `perf record`):", "", profile]
    if report.notes:
        parts += ["", *[f"- {note}" for note in report.notes]]
    return "\n".join(parts)


# --------------------------------------------------------------------------- the benchmark


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(config: BenchConfig, log: Callable[[str], None] = _stderr) -> Report:
    """Build what is missing, measure, profile; the report."""
    from llama_sparsek import corpus, models, tools, upstream_build
    from llama_sparsek.evaluation import label
    from llama_sparsek.gguf import read_metadata
    from llama_sparsek.sparsek import recommended

    path = models.resolve(config.model)
    arch = read_metadata(path).require_arch()
    settings = recommended(arch)
    notes: list[str] = []
    perf = check_perf() if config.profile else None  # fail before measuring, not after
    engines: list[LlamaCppEngine] = []
    baseline = "pristine"
    if UPSTREAM in config.engines:
        log("building (or reusing) the pristine upstream llama-completion ...")
        exe = upstream_build.build("llama-completion", source=config.upstream_source)
        engines.append(LlamaCppEngine(UPSTREAM, exe))
        baseline = upstream_build.describe(config.upstream_source)
    ours = tools.tool_path("llama-completion")
    if DENSE in config.engines:
        engines.append(LlamaCppEngine(DENSE, ours))
    if SPARSEK in config.engines:
        engines.append(LlamaCppEngine(SPARSEK, ours, tuple(tool_flags(settings))))
    labels = {
        UPSTREAM: f"upstream llama.cpp {tools.build_info()['llama_cpp_commit'][:7]} ({baseline})",
        DENSE: "llama-sparsek dense",
        SPARSEK: f"llama-sparsek SparseK {label(settings)}",
        PEER_DENSE: "OpenVINO GenAI dense",
        PEER_SPARSE: "OpenVINO GenAI XAttention 0.8",
    }

    log(f"tokenizing the corpus with {path.name} ...")
    prompts = load_prompts(path, config.tokens, corpus.load_text())
    timers: dict[str, Timer] = {}
    with tempfile.TemporaryDirectory(prefix="prefill-bench-") as tmp:
        files: dict[int, Path] = {}
        for n, prompt in prompts.items():
            files[n] = Path(tmp) / f"prompt-{n}.txt"
            files[n].write_text(prompt.text, encoding="utf-8")
        for engine in engines:
            timers[engine.name] = _llama_cpp_timer(engine, path, files, config.threads)
        peers = [e for e in (PEER_DENSE, PEER_SPARSE) if e in config.engines]
        if peers:
            warmup = prompts[config.tokens[0]].tokens[:64]
            peer = _peer_timers(peers, path, max(config.tokens), config.threads, warmup, notes)
            timers.update(peer)
        results = {(n, e): Result(n, e, labels[e]) for n in config.tokens for e in timers}
        load_before = os.getloadavg()[0]
        measure(timers, prompts, config.repetitions, results, log)
        notes.append(
            f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the "
            f"timed runs, on {os.cpu_count()} CPUs"
        )
        if perf is not None:
            _profile(perf, engines, path, files, prompts, config.threads, results, log)
    return Report(path.stem, list(results.values()), notes)


def _llama_cpp_timer(
    engine: LlamaCppEngine, model: Path, files: Mapping[int, Path], threads: int
) -> Timer:
    def timer(prompt: Prompt, repetition: int) -> float:
        del repetition  # every run is a fresh process: nothing to reuse
        n = len(prompt.tokens)
        output = run_tool(engine.command(model, files[n], n, threads))
        try:
            return parse_completion(output, prompt.tokens)
        except BenchError as e:
            raise BenchError(f"{engine.name}: {e}") from None

    return timer


def _peer_timers(
    names: Sequence[str],
    model: Path,
    max_tokens: int,
    threads: int,
    warmup: Sequence[int],
    notes: list[str],
) -> dict[str, Timer]:
    """Timers for the peer's pipelines, loaded once; none (and a note) when it cannot run."""
    from llama_sparsek import peer_openvino

    if not peer_openvino.available():
        notes.append("OpenVINO GenAI not installed (`pip install '.[peer]'`): no peer rows")
        return {}
    unsupported = peer_openvino.unsupported_types(model)
    if unsupported:
        notes.append(
            f"OpenVINO GenAI cannot load {model.name}: its GGUF reader lacks "
            f"{', '.join(unsupported)} tensors"
        )
        return {}
    if os.cpu_count() != threads:
        notes.append(f"OpenVINO GenAI uses all {os.cpu_count()} CPUs, not {threads} threads")
    timers: dict[str, Timer] = {}
    for name in names:
        engine = peer_openvino.PeerEngine(
            name, model, xattention=name == PEER_SPARSE, max_tokens=max_tokens, warmup=warmup
        )
        timers[name] = _peer_timer(engine)
    return timers


def _peer_timer(engine: PeerEngine) -> Timer:
    def timer(prompt: Prompt, repetition: int) -> float:
        return engine.ttft(prompt.tokens, repetition)

    return timer


def _profile(
    perf: str,
    engines: Sequence[LlamaCppEngine],
    model: Path,
    files: Mapping[int, Path],
    prompts: Mapping[int, Prompt],
    threads: int,
    results: Mapping[tuple[int, str], Result],
    log: Callable[[str], None],
) -> None:
    # the installed libraries are stripped: a source checkout's build tree has them unstripped
    symbols = unstripped_builds({Path(__file__).resolve().parent.parent, Path.cwd()})
    warning = symbols_warning(symbols)
    if warning:
        log(f"warning: {warning}")
    for n, prompt in prompts.items():
        for engine in engines:
            log(f"profiling {n} tokens, {engine.name} ...")
            command = engine.command(model, files[n], n, threads)
            profile, output = record(perf, command, symbols)
            result = results[n, engine.name]
            result.profile = profile
            result.profiled_time = parse_completion(output, prompt.tokens)
