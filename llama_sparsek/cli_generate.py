"""`llama-sparsek generate` and `llama-sparsek chat`: run a model on a prompt, a file, a chat."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llama_sparsek import models
from llama_sparsek.sampling import Sampling
from llama_sparsek.sparsek import SparseK, from_options

if TYPE_CHECKING:
    from llama_sparsek.llama import Llama

PREFILL_BAR_BATCHES = 4  # a progress bar for prefills of more than this many batches

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registry name or GGUF path.")]
FileOpt = Annotated[
    str | None, typer.Option("--file", "-f", help="Read the prompt from a file ('-': stdin).")
]
CtxOpt = Annotated[
    int | None,
    typer.Option(
        "--ctx",
        help="Context size [default: the model's trained context, capped so that the KV cache "
        "fits min(8 GiB, 1/4 of RAM)].",
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads (default: all).")]
SparseKOpt = Annotated[bool, typer.Option("--sparsek/--no-sparsek", help="SparseK attention.")]
SkTopKOpt = Annotated[
    int | None, typer.Option("--sparsek-top-k", help="SparseK: keys kept per query.")
]
SkWindowOpt = Annotated[int | None, typer.Option("--sparsek-window", help="SparseK: local window.")]
SkStrideOpt = Annotated[
    int | None, typer.Option("--sparsek-stride", help="SparseK: global stride (0 = none).")
]
SkBlockOpt = Annotated[
    int | None, typer.Option("--sparsek-block-size", help="SparseK: block size (1 = single keys).")
]
_D = Sampling()  # the defaults, shown in the help
TempOpt = Annotated[
    float | None, typer.Option("--temp", help=f"Temperature (0 = greedy) [{_D.temperature}].")
]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help=f"Top-k (0 = off) [{_D.top_k}].")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help=f"Top-p (1 = off) [{_D.top_p}].")]
MinPOpt = Annotated[float | None, typer.Option("--min-p", help=f"Min-p (0 = off) [{_D.min_p}].")]
RepeatOpt = Annotated[
    float | None,
    typer.Option("--repeat-penalty", help=f"Repeat penalty (1 = off) [{_D.repeat_penalty}]."),
]
RepeatLastOpt = Annotated[
    int | None,
    typer.Option("--repeat-last-n", help=f"Tokens the repeat penalty sees [{_D.penalty_last_n}]."),
]
SeedOpt = Annotated[int | None, typer.Option(help="Sampling seed.")]
StopOpt = Annotated[
    list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")
]
TimingsOpt = Annotated[
    bool, typer.Option("--timings", help="Print tokens, reuse, prefill/decode speed to stderr.")
]
ProgressOpt = Annotated[
    bool, typer.Option("--progress/--no-progress", help="A progress bar for long prefills.")
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def sampling_settings(**options: Any) -> Sampling:
    """Sampling() (the one place with the defaults) with the options the user gave."""
    stop = options.pop("stop", None)
    return Sampling().with_options(stop=tuple(stop) if stop else None, **options)


def read_prompt(file: str | None, prompt: str | None) -> str:
    """The file's text (or stdin's for '-') followed by the prompt argument."""
    if file is None and prompt is None:
        raise ValueError("give a PROMPT, a --file, or both (the prompt is appended to the file)")
    text = ""
    if file == "-":
        text = sys.stdin.read()
    elif file is not None:
        text = Path(file).read_text(encoding="utf-8")
    return text + (prompt or "")


class PrefillBar:
    """A progress callback that shows a tqdm bar on stderr once a prefill is long."""

    def __init__(self, min_tokens: int) -> None:
        self.min_tokens = min_tokens
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if total <= self.min_tokens:
                return
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tok", desc="prefill", leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def open_llama(
    model: str, ctx: int | None, threads: int | None, sparsek: SparseK | None
) -> Iterator[Llama]:
    """The model with the context the memory rule (or --ctx, checked) gives."""
    from llama_sparsek import memory
    from llama_sparsek.llama import Llama

    path = models.resolve(model)
    plan = memory.plan(path, ctx)
    # --no-sparsek: dense even where the model file enables SparseK
    dense_or = False if sparsek is None else sparsek
    with Llama(path, n_ctx=plan.n_ctx, n_threads=threads, sparsek=dense_or) as llm:
        yield llm


def _errors() -> tuple[type[BaseException], ...]:
    from llama_sparsek._binding import LlamaError

    return (ValueError, OSError, LlamaError, models.ModelError)


def generate_command(
    prompt: Annotated[str | None, typer.Argument(help="The prompt (after --file's text).")] = None,
    file: FileOpt = None,
    model: ModelOpt = models.DEFAULT_MODEL,
    n: Annotated[int, typer.Option("-n", "--max-tokens", help="Tokens to generate.")] = 128,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    sparsek: SparseKOpt = True,
    sparsek_top_k: SkTopKOpt = None,
    sparsek_window: SkWindowOpt = None,
    sparsek_stride: SkStrideOpt = None,
    sparsek_block_size: SkBlockOpt = None,
    temp: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatOpt = None,
    repeat_last_n: RepeatLastOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    timings: TimingsOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Generate text, streaming it to stdout (a long --file: a progress bar, then the text)."""
    try:
        settings = from_options(
            sparsek, sparsek_top_k, sparsek_window, sparsek_stride, sparsek_block_size
        )
        sampling = sampling_settings(
            temperature=temp,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            penalty_last_n=repeat_last_n,
            seed=seed,
            stop=stop,
        )
        text = read_prompt(file, prompt)
        with open_llama(model, ctx, threads, settings) as llm:
            bar = PrefillBar(PREFILL_BAR_BATCHES * llm.n_batch) if progress else None
            try:
                for piece in llm.stream(text, n, sampling=sampling, progress=bar):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            finally:
                if bar is not None:
                    bar.close()
            sys.stdout.write("\n")
            if timings and llm.last_timings is not None:
                typer.echo(llm.last_timings.summary(), err=True)
    except _errors() as e:
        raise _fail(str(e)) from None


def chat_command(
    file: Annotated[
        str | None,
        typer.Option("--file", "-f", help="A system message or document to chat about."),
    ] = None,
    model: ModelOpt = models.DEFAULT_MODEL,
    n: Annotated[int, typer.Option("-n", "--max-tokens", help="Tokens per answer at most.")] = 512,
    template: Annotated[
        str | None,
        typer.Option(help="Chat template: a llama.cpp built-in name [the model's own]."),
    ] = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    sparsek: SparseKOpt = True,
    sparsek_top_k: SkTopKOpt = None,
    sparsek_window: SkWindowOpt = None,
    sparsek_stride: SkStrideOpt = None,
    sparsek_block_size: SkBlockOpt = None,
    temp: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatOpt = None,
    repeat_last_n: RepeatLastOpt = None,
    seed: SeedOpt = None,
    timings: TimingsOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Chat in the terminal: one line per question, answers streamed (Ctrl-D or EOF ends it,
    Ctrl-C cuts an answer short; at the prompt it ends the chat)."""
    try:
        settings = from_options(
            sparsek, sparsek_top_k, sparsek_window, sparsek_stride, sparsek_block_size
        )
        sampling = sampling_settings(
            temperature=temp,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            penalty_last_n=repeat_last_n,
            seed=seed,
        )
        system = Path(file).read_text(encoding="utf-8") if file else None
        with open_llama(model, ctx, threads, settings) as llm:
            if template is None and llm.chat_template() is None:
                raise ValueError(
                    f"{llm.model_path.name} has no chat template: pass --template, e.g. chatml"
                )
            _chat_loop(llm, system, n, template, sampling, timings=timings, progress=progress)
    except _errors() as e:
        raise _fail(str(e)) from None


def _chat_loop(
    llm: Llama,
    system: str | None,
    max_tokens: int,
    template: str | None,
    sampling: Sampling,
    *,
    timings: bool,
    progress: bool,
) -> None:
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:  # EOF or Ctrl-C at the prompt
            if interactive:
                sys.stderr.write("\n")
            return
        question = line.strip()
        if not question:
            continue
        messages.append({"role": "user", "content": question})
        pieces: list[str] = []
        bar = PrefillBar(PREFILL_BAR_BATCHES * llm.n_batch) if progress else None
        try:
            for piece in llm.stream_chat(
                messages, max_tokens, template=template, sampling=sampling, progress=bar
            ):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stderr.write("\n[answer interrupted]")
        finally:
            if bar is not None:
                bar.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(pieces)})
        if timings and llm.last_timings is not None:
            typer.echo(llm.last_timings.summary(), err=True)
