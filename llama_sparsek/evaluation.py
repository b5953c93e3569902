"""Dense vs SparseK on real models and real long text: perplexity, greedy agreement and speed.

Every grid setting is measured side by side with dense attention in one run, on the same tokens
and the same machine, so the report can state each setting's cost (perplexity increase, lost
agreement) next to its gain (prefill and decode speed-up):

- perplexity: non-overlapping windows of `n_ctx` tokens over the text (BOS first when the model
  adds one); as in `llama-perplexity`, only the second half of each window is scored, so every
  scored token sees at least n_ctx/2 tokens of context: the long-range attention SparseK prunes.
- greedy agreement: greedy continuations of long prompts cut from the text, dense vs SparseK:
  the share of tokens before the first divergence, and of positions with identical tokens.
- speed: `llama-bench` pp<P> and tg<T> at several depths (`-d`), with SparseK set by its
  `--sparsek` flags (context parameters: the model file stays as it is).

This module measures; `eval_report` turns a `Report` into the table, the plot and the files,
and `cli_eval` reads the command line. Importing this module loads neither numpy nor the native
library (the CLI's commands that run no model stay fast); measuring does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_sparsek.sparsek import GRID_FLAGS, SparseK, tool_flags

if TYPE_CHECKING:
    from llama_sparsek.llama import Llama

DENSE = "dense"


class EvalError(RuntimeError):
    """A measurement could not be taken (llama-bench failed, the text is too short, ...)."""


# --------------------------------------------------------------------------- settings


def label(setting: SparseK | None) -> str:
    """`dense`, or the setting as
    `k<top_k>/w<window>/b<block_size>[/s<stride>][/summaries][/grow][/group]`."""
    if setting is None:
        return DENSE
    stride = "" if setting.stride == 0 else f"/s{setting.stride}"
    flags = "".join(f"/{name}" for name, on in GRID_FLAGS.items() if getattr(setting, on))
    return f"k{setting.top_k}/w{setting.window}/b{setting.block_size}{stride}{flags}"


def dense_max(setting: SparseK) -> int | None:
    """The most keys a query can see and still keep them all (llama.cpp's
    `llama_sparsek_cparams::n_dense_max`, a closed form of `sparsek_applies` with a fixed top_k);
    None where no query drops keys (a stride of 5 or less keeps 20% of the keys or more)."""
    fixed = setting.top_k + max(1, setting.window + setting.sinks)
    if setting.stride == 0:
        return 5 * fixed
    if setting.stride <= 5:
        return None
    return 5 * (fixed + 1) * setting.stride // (setting.stride - 5)


def top_k_at(setting: SparseK, n_keys: int) -> int:
    """The keys a query that sees n_keys keys keeps by their scores: top_k, or with grow_top_k
    past `dense_max` n0 top_k * sqrt(n_keys / n0), rounded down to whole blocks (llama.cpp's
    `llama_sparsek_cparams::top_k_at`)."""
    start = dense_max(setting)
    if not setting.grow_top_k or start is None or n_keys <= start:
        return setting.top_k
    grown = setting.top_k * math.sqrt(n_keys / start)
    return int(grown / setting.block_size) * setting.block_size


def kept_keys(setting: SparseK, n_keys: int) -> int:
    """At most how many of n_keys keys a query keeps: `top_k_at` + window + the strided keys +
    the sinks, or `top_k_at` + its first key without any of these (llama.cpp's n_kv_max hint)."""
    strided = -(-n_keys // setting.stride) if setting.stride > 0 else 0
    forced = max(1, setting.window + strided + setting.sinks)
    return min(n_keys, top_k_at(setting, n_keys) + min(n_keys, forced))


def sparsek_applies(setting: SparseK, n_keys: int) -> bool:
    """Whether a query that sees n_keys keys drops some: only where it would keep less than 20%
    of them (per query: its ubatch and the other queries in it play no part)."""
    return 5 * kept_keys(setting, n_keys) < n_keys


def kept_share(setting: SparseK, ctx: int) -> float:
    """The keys a scored token of a perplexity window attends to in a SparseK layer, as a share
    of the keys it sees (mean over the scored second half of a window of ctx tokens; an upper
    bound where the forced keys overlap)."""
    shares = []
    for seen in range(ctx // 2 + 1, ctx + 1):
        kept = kept_keys(setting, seen) if sparsek_applies(setting, seen) else seen
        shares.append(kept / seen)
    return sum(shares) / len(shares)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EvalConfig:
    """What to measure and how much of it; `quick()` is the CI smoke size."""

    # SparseK's default drops keys only past 8,960 keys: the largest context and depth are past it
    contexts: tuple[int, ...] = (4096, 8192, 16384)
    windows: int = 4  # perplexity windows per context, at most (fewer if the text runs out)
    prompts: int = 4  # greedy-agreement prompts, spread evenly over the text
    prompt_tokens: int = 12032  # + gen_tokens = 12288: long prompts
    gen_tokens: int = 256
    depths: tuple[int, ...] = (0, 7168, 15360)
    pp_tokens: int = 512
    tg_tokens: int = 128
    repetitions: int = 3  # llama-bench -r
    threads: int | None = None
    n_batch: int = 512
    speed: bool = True  # run llama-bench

    def __post_init__(self) -> None:
        for name in ("windows", "prompts", "prompt_tokens", "gen_tokens", "repetitions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.contexts or min(self.contexts) < 16:
            raise ValueError(f"contexts must be >= 16 tokens, got {self.contexts}")
        if not self.depths or min(self.depths) < 0:
            raise ValueError(f"depths must be >= 0, got {self.depths}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @classmethod
    def quick(cls, **overrides: Any) -> EvalConfig:
        """Tiny sizes: the whole pipeline in seconds, for smoke tests."""
        sizes: dict[str, Any] = {
            "contexts": (256,),
            "windows": 2,
            "prompts": 2,
            "prompt_tokens": 96,
            "gen_tokens": 16,
            "depths": (0, 128),
            "pp_tokens": 64,
            "tg_tokens": 8,
            "repetitions": 1,
        }
        return cls(**(sizes | overrides))

    @property
    def n_ctx(self) -> int:
        """One context large enough for every perplexity window and prompt + continuation."""
        return max(*self.contexts, self.prompt_tokens + self.gen_tokens)


# --------------------------------------------------------------------------- results


@dataclass
class Perplexity:
    ctx: int
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    scored: int  # tokens scored
    windows: int


@dataclass
class Agreement:
    prefix: float  # % of generated tokens before the first divergence from dense
    overall: float  # % of positions with the same token as dense
    prefixes: list[int]  # tokens before the first divergence, per prompt
    gen_tokens: int


@dataclass
class Speed:
    test: str  # "pp512" or "tg128", llama-bench's names
    depth: int
    tps: float  # tokens per second (llama-bench avg_ts)
    stddev: float


@dataclass
class VariantResult:
    label: str
    setting: SparseK | None
    perplexity: list[Perplexity] = field(default_factory=list)
    agreement: Agreement | None = None
    speed: list[Speed] = field(default_factory=list)

    def ppl_at(self, ctx: int) -> Perplexity | None:
        return next((p for p in self.perplexity if p.ctx == ctx), None)

    def speed_of(self, test: str, depth: int) -> Speed | None:
        return next((s for s in self.speed if s.test == test and s.depth == depth), None)


@dataclass
class ModelResult:
    model: str  # as given: registry name or path
    path: str
    arch: str
    text_tokens: int
    variants: list[VariantResult]

    @property
    def dense(self) -> VariantResult:
        return self.variants[0]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class Report:
    config: EvalConfig
    corpus: str
    models: list[ModelResult]
    command: str = ""
    created: str = field(default_factory=_now)
    build: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """The report that `to_json` wrote (an eval's results.json), e.g. to plot several runs
        together; EvalError if `data` is not one."""
        try:
            config: dict[str, Any] = {
                k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()
            }
            models = [
                ModelResult(
                    m["model"],
                    m["path"],
                    m["arch"],
                    m["text_tokens"],
                    [_variant_from_json(v) for v in m["variants"]],
                )
                for m in data["models"]
            ]
            return cls(
                EvalConfig(**config),
                data["corpus"],
                models,
                data.get("command", ""),
                data.get("created", ""),
                data.get("build", {}),
                data.get("notes", []),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EvalError(f"not the results.json of an eval: {type(e).__name__} {e}") from None


def _variant_from_json(v: dict[str, Any]) -> VariantResult:
    # reports older than the sinks, dense layers, summaries, growth and groups ran without them
    older = {"sinks": 0, "dense_layers": 0, "summaries": 0, "grow_top_k": 0, "per_group": 0}
    setting = v["setting"]
    return VariantResult(
        v["label"],
        None if setting is None else SparseK(**(older | setting)),
        [Perplexity(**p) for p in v["perplexity"]],
        None if v["agreement"] is None else Agreement(**v["agreement"]),
        [Speed(**s) for s in v["speed"]],
    )


# --------------------------------------------------------------------------- perplexity


def bos_tokens(llm: Llama) -> list[int]:
    """[BOS] when the model's tokenizer adds one, else []: what every window starts with."""
    return llm.tokenize("", add_special=True)


def windows(tokens: Sequence[int], bos: Sequence[int], n_ctx: int, limit: int) -> list[list[int]]:
    """Up to `limit` non-overlapping windows of exactly n_ctx tokens (BOS + text tokens)."""
    step = n_ctx - len(bos)
    count = min(limit, len(tokens) // step)
    if count == 0:
        raise EvalError(
            f"the text has {len(tokens)} tokens: too short for one {n_ctx}-token window"
        )
    return [[*bos, *tokens[i * step : (i + 1) * step]] for i in range(count)]


def perplexity(
    llm: Llama,
    tokens: Sequence[int],
    n_ctx: int,
    limit: int,
    on_window: Callable[[], None] = lambda: None,
) -> Perplexity:
    """Perplexity over windows of n_ctx tokens, second half of each scored (llama-perplexity)."""
    chunks = windows(tokens, bos_tokens(llm), n_ctx, limit)
    nll_sum, scored = 0.0, 0
    for chunk in chunks:
        logprobs = llm.logprobs(chunk, start=n_ctx // 2 + 1)
        nll_sum -= float(logprobs.sum())
        scored += len(logprobs)
        on_window()
    nll = nll_sum / scored
    return Perplexity(n_ctx, math.exp(nll), nll, scored, len(chunks))


# --------------------------------------------------------------------------- greedy agreement


def prompts(tokens: Sequence[int], bos: Sequence[int], length: int, count: int) -> list[list[int]]:
    """`count` prompts of `length` tokens (BOS included) starting at evenly spaced offsets."""
    body = length - len(bos)
    span = len(tokens) - body
    if body < 1 or span < 0:
        raise EvalError(f"the text has {len(tokens)} tokens: too short for {length}-token prompts")
    import numpy as np

    offsets = np.linspace(0, span, count).astype(int).tolist() if count > 1 else [0]
    return [[*bos, *tokens[o : o + body]] for o in offsets]


def greedy(llm: Llama, prompt: Sequence[int], n: int) -> list[int]:
    """n greedy tokens after prompt; end-of-generation does not stop it, so that every
    continuation has the same length and positions compare one to one."""
    return list(llm.generate_tokens(prompt, n, stop_at_eog=False))


def agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> Agreement:
    """How much of `candidate` matches `reference`, per prompt and over all prompts."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError("agreement needs the same, non-zero number of continuations")
    prefixes, same, total = [], 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        if len(ref) != len(cand):
            raise ValueError("continuations to compare must have the same length")
        equal = [a == b for a, b in zip(ref, cand, strict=True)]
        prefixes.append(equal.index(False) if False in equal else len(equal))
        same += sum(equal)
        total += len(equal)
    return Agreement(
        100.0 * sum(prefixes) / total, 100.0 * same / total, prefixes, len(reference[0])
    )


# --------------------------------------------------------------------------- speed (llama-bench)


def bench_command(model: Path, setting: SparseK | None, config: EvalConfig) -> list[str]:
    from llama_sparsek import tools

    depths = ",".join(str(d) for d in config.depths)
    cmd = [str(tools.tool_path("llama-bench")), "-m", str(model), "-fa", "1", "-o", "json"]
    cmd += ["-p", str(config.pp_tokens), "-n", str(config.tg_tokens), "-d", depths]
    cmd += ["-r", str(config.repetitions), "-ub", str(config.n_batch)]
    cmd += tool_flags(setting)
    if config.threads is not None:
        cmd += ["-t", str(config.threads)]
    return cmd


def parse_bench(output: str, setting: SparseK | None = None) -> list[Speed]:
    """llama-bench `-o json` records as Speeds (pp<N> for prompt tests, tg<N> for generation).

    Each record carries the SparseK settings its context resolved: they must be `setting`
    (dense for None), or the measurement is not what it claims to be.
    """
    try:
        records = json.loads(output)
    except json.JSONDecodeError as e:
        raise EvalError(f"llama-bench printed no JSON: {e}") from None
    speeds = []
    for r in records:
        if "sparsek" not in r:
            raise EvalError("llama-bench reports no SparseK settings: a build without patch 0014?")
        got = (
            SparseK(
                r["sparsek_top_k"],
                r["sparsek_window"],
                r["sparsek_stride"],
                r["sparsek_block_size"],
                r.get("sparsek_sinks", 0),
                r.get("sparsek_dense_layers", 0),
                r.get("sparsek_summaries", 0),
                r.get("sparsek_grow_top_k", 0),
                r.get("sparsek_per_group", 0),
            )
            if r["sparsek"]
            else None
        )
        if got != setting:
            raise EvalError(f"llama-bench ran SparseK {got}, expected {setting}")
        test = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
        speeds.append(Speed(test, int(r["n_depth"]), float(r["avg_ts"]), float(r["stddev_ts"])))
    return speeds


def bench(model: Path, setting: SparseK | None, config: EvalConfig) -> list[Speed]:
    """llama-bench on the model with this SparseK setting (dense for None)."""
    proc = subprocess.run(bench_command(model, setting, config), text=True, capture_output=True)
    if proc.returncode != 0:
        raise EvalError(f"llama-bench failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return parse_bench(proc.stdout, setting)


# --------------------------------------------------------------------------- the run


class _Progress:
    """One tqdm bar over every unit of work: a perplexity window, a prompt, a llama-bench run.

    Each model adds its units once its text is tokenized, since windows depend on the count.
    """

    def __init__(self, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="step", disable=not enabled, dynamic_ncols=True)

    def add(self, units: int) -> None:
        self.bar.total += units
        self.bar.refresh()

    def stage(self, text: str) -> None:
        self.bar.set_description(text)

    def step(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _units(config: EvalConfig, text_tokens: int, n_variants: int) -> int:
    ppl = sum(min(config.windows, max(1, text_tokens // c)) for c in config.contexts)
    return n_variants * (ppl + config.prompts + int(config.speed))


def _open(path: Path, config: EvalConfig, setting: SparseK | None) -> Llama:
    """A Llama with this SparseK setting, or dense (SparseK off, whatever the file says)."""
    from llama_sparsek.llama import Llama

    return Llama(
        path,
        n_ctx=config.n_ctx,
        n_threads=config.threads,
        n_batch=config.n_batch,
        n_ubatch=config.n_batch,
        flash_attn=True,
        sparsek=False if setting is None else setting,
    )


def _continuations(
    llm: Llama, tokens: Sequence[int], config: EvalConfig, progress: _Progress
) -> list[list[int]]:
    out = []
    for prompt in prompts(tokens, bos_tokens(llm), config.prompt_tokens, config.prompts):
        out.append(greedy(llm, prompt, config.gen_tokens))
        progress.step()
    return out


def evaluate_model(
    model: str,
    path: Path,
    text: str,
    grid: Sequence[SparseK],
    config: EvalConfig,
    progress: _Progress,
) -> ModelResult:
    """Dense first (the reference for agreement), then each setting, one Llama each."""
    arch = ""
    tokens: list[int] = []
    reference: list[list[int]] = []
    variants = []
    for setting in (None, *grid):
        name = label(setting)
        variant = VariantResult(name, setting)
        with _open(path, config, setting) as llm:
            arch = llm.arch
            if not tokens:
                tokens = llm.tokenize(text, add_special=False)
                progress.add(_units(config, len(tokens), 1 + len(grid)))
            for ctx in config.contexts:
                progress.stage(f"{model} {name} ppl@{ctx}")
                variant.perplexity.append(
                    perplexity(llm, tokens, ctx, config.windows, progress.step)
                )
            progress.stage(f"{model} {name} greedy")
            continuations = _continuations(llm, tokens, config, progress)
        if setting is None:
            reference = continuations
        else:
            variant.agreement = agreement(reference, continuations)
        if config.speed:
            progress.stage(f"{model} {name} llama-bench")
            variant.speed = bench(path, setting, config)
            progress.step()
        variants.append(variant)
    return ModelResult(model, str(path), arch, len(tokens), variants)


def evaluate(
    models: Sequence[tuple[str, Path]],
    text: str,
    grid: Sequence[SparseK],
    config: EvalConfig,
    *,
    corpus: str = "",
    command: str = "",
    progress: bool = True,
) -> Report:
    """Measure dense and every grid setting on every model; see the module docstring."""
    bar = _Progress(progress)
    try:
        results = [evaluate_model(m, p, text, grid, config, bar) for m, p in models]
    finally:
        bar.close()
    report = Report(config, corpus, results, command=command, build=_build_info())
    report.notes.extend(_notes(report))
    return report


def _build_info() -> dict[str, Any]:
    from llama_sparsek import tools

    try:
        info = tools.build_info()
    except (OSError, ValueError):
        return {}
    return {k: info.get(k) for k in ("llama_cpp_commit", "patches", "build_type", "cmake_args")}


def _notes(report: Report) -> Iterator[str]:
    """Warnings a reader must see next to the numbers.

    A setting runs dense by design at a context whose keys it would keep 20% of or more, for
    every query of the window (`sparsek_applies`): its perplexity there is the dense one, which
    says nothing about the build. Only where SparseK should have dropped keys does the dense
    perplexity mean that the build does not apply it.
    """
    for m in report.models:
        idle: list[str] = []  # label@ctx that ran dense by design
        active: list[tuple[Perplexity, Perplexity | None]] = []  # (SparseK, dense) where it runs
        for v in m.variants[1:]:
            if v.setting is None:
                continue
            off = []
            for p in v.perplexity:
                if sparsek_applies(v.setting, p.ctx):
                    active.append((p, m.dense.ppl_at(p.ctx)))
                else:
                    off.append(str(p.ctx))
            if off:
                idle.append(f"{v.label} at ctx {', '.join(off)}")
        if idle:
            yield (
                f"{m.model}: SparseK stays off by design where it would keep 20% of the keys or "
                f"more, so these rows are dense: {'; '.join(idle)}"
            )
        if active and all(p == dense for p, dense in active):
            yield (
                f"{m.model}: every SparseK setting gave exactly the dense perplexity where it "
                "should have dropped keys: this build does not apply SparseK (is the graph patch "
                "installed?)"
            )


__all__ = [
    "DENSE",
    "Agreement",
    "EvalConfig",
    "EvalError",
    "ModelResult",
    "Perplexity",
    "Report",
    "Speed",
    "VariantResult",
    "agreement",
    "bench",
    "evaluate",
    "greedy",
    "kept_keys",
    "kept_share",
    "label",
    "parse_bench",
    "perplexity",
    "sparsek_applies",
]
