"""Synthetic long-context retrieval and aggregation tasks: passkey, needles, variables, words.

Perplexity averages over every token, most of which a local window predicts; sparse attention is
judged by whether a model still finds one fact far back in its context. These tasks (in the
spirit of the passkey test and RULER's needle, variable-tracking and frequent-word tasks) hide
facts in long filler and ask for them:

- ``passkey``: one 5-digit pass key in real text; "what is the pass key?"
- ``needle``: four key-value needles ("the special magic number for <word> is <7 digits>") in
  real text; asks for one of them, the others are distractors.
- ``needles``: the same four needles; asks for all four values.
- ``vartrack``: a chain of assignments (VAR X = 12345, VAR Y = X, ...) and a distractor chain
  spread through real text; "which variables hold 12345?"
- ``words``: a long numbered list of words; "which 3 words occur most often?"

Every sample is generated deterministically from (task, seed, length, filler) and built with the
model's tokenizer: the text of its messages (system + user, without the chat template's own few
tokens) is as long as possible within ``length`` tokens (at most a few tokens short). The filler
is real text, by default the pinned English prose corpus. An answer is scored by the items it
mentions (numbers, variable names or words) against the expected ones:
``|expected & mentioned| / max(|expected|, |mentioned|)``, so a right answer scores 1, a wrong
or empty one 0, and listing everything is not rewarded.

`compare` runs the samples on any objects with ``chat(messages, max_tokens=...) -> str`` (one per
variant: dense, each SparseK setting) and returns the mean score per task and length.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, str]


class Tokenizer(Protocol):
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...


class ChatModel(Protocol):
    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int = ...) -> str: ...


SYSTEM = "You are a helpful assistant. Answer briefly and exactly."


@dataclass(frozen=True)
class Sample:
    task: str
    seed: int
    length: int  # the requested length in tokens
    n_tokens: int  # the messages' text in tokens (<= length)
    messages: tuple[Message, ...]
    expected: frozenset[str]  # the items a right answer mentions (casefolded)
    pattern: str  # a regex that finds the items an answer mentions

    def mentioned(self, answer: str) -> frozenset[str]:
        return frozenset(m.casefold() for m in re.findall(self.pattern, answer))

    def score(self, answer: str) -> float:
        """1 for exactly the expected items, 0 for none of them, partial credit in between."""
        found = self.mentioned(answer)
        return len(self.expected & found) / max(len(self.expected), len(found))


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _Draft:
    """A sample before it is measured: the user message and what answers it."""

    user: str
    expected: frozenset[str]
    pattern: str


def _fit(
    draft: Callable[[int], _Draft], tok: Tokenizer, length: int, hi: int
) -> tuple[_Draft, int]:
    """The draft of the largest size n in [0, hi] whose messages fit in `length` tokens.

    Token counts grow with n almost monotonically (a join can merge a token or two), so a binary
    search lands within a few tokens of the target; the result is always within it.
    """

    def n_tokens(d: _Draft) -> int:
        return _count(tok, SYSTEM) + _count(tok, d.user)

    lo, best = 0, draft(0)
    if n_tokens(best) > length:
        raise ValueError(f"length {length} is too short for the task's question and needles")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(draft(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    best = draft(lo)
    count = n_tokens(best)
    if count < length - max(16, length // 50):
        raise ValueError(f"the filler text is too short for {length} tokens (got {count})")
    return best, count


def _count(tok: Tokenizer, text: str) -> int:
    return len(tok.tokenize(text, add_special=False))


def _sentence_starts(text: str) -> list[int]:
    """Offsets where a sentence or paragraph starts: where a needle can go without cutting one."""
    return [0, *(m.end() for m in re.finditer(r"(?<=[.!?])\s+|\n\s*\n", text))]


def _hide(filler: str, needles: Sequence[str], depths: Sequence[float]) -> str:
    """`filler` with each needle inserted at the sentence start nearest its relative depth."""
    starts = _sentence_starts(filler)

    def nearest(depth: float) -> int:
        return min(starts, key=lambda s: abs(s - depth * len(filler)))

    cuts = sorted((nearest(d), i) for i, d in enumerate(depths))
    parts, last = [], 0
    for cut, i in cuts:
        parts += [filler[last:cut], needles[i] + " "]
        last = cut
    parts.append(filler[last:])
    return "".join(parts).strip()


def _filler_from(text: str, rng: random.Random) -> str:
    """Real text from a random paragraph start on, long enough for any prompt (wraps around)."""
    starts = [0, *(m.end() for m in re.finditer(r"\n\s*\n", text))]
    start = rng.choice(starts[: max(1, len(starts) // 2)])
    return text[start:] + "\n\n" + text[:start]


def _haystack_task(
    tok: Tokenizer,
    rng: random.Random,
    length: int,
    filler: str,
    *,
    needles: Sequence[str],
    depths: Sequence[float],
    header: str,
    question: str,
    expected: frozenset[str],
    pattern: str,
) -> tuple[_Draft, int]:
    text = _filler_from(filler, rng)

    def draft(n: int) -> _Draft:
        body = _hide(text[:n], needles, depths)
        return _Draft(f"{header}\n\n{body}\n\n{question}", expected, pattern)

    return _fit(draft, tok, length, hi=min(len(text), 8 * length))


def _passkey(tok: Tokenizer, rng: random.Random, length: int, filler: str) -> tuple[_Draft, int]:
    key = str(rng.randrange(10_000, 100_000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _haystack_task(
        tok,
        rng,
        length,
        filler,
        needles=[needle],
        depths=[rng.random()],
        header="There is a pass key hidden in the following text. Find it and remember it.",
        question="What is the pass key? Answer with the 5-digit number only.",
        expected=frozenset({key}),
        pattern=r"(?<!\d)\d{5}(?!\d)",
    )


# keys of the needles: concrete nouns, none of which occurs in the questions
_NEEDLE_KEYS = (
    "lantern", "harbor", "violin", "glacier", "meadow", "compass", "falcon", "orchard",
    "teapot", "canyon", "anchor", "saddle", "thimble", "beacon", "pebble", "walnut",
)  # fmt: skip
_N_NEEDLES = 4


def _needle_values(rng: random.Random) -> dict[str, str]:
    keys = rng.sample(_NEEDLE_KEYS, _N_NEEDLES)
    values = rng.sample(range(1_000_000, 10_000_000), _N_NEEDLES)
    return {k: str(v) for k, v in zip(keys, values, strict=True)}


def _needle_sentences(values: Mapping[str, str]) -> list[str]:
    return [f"One of the special magic numbers for {k} is: {v}." for k, v in values.items()]


_NEEDLE_HEADER = "Some special magic numbers are hidden in the following text. Remember them."


def _needle(tok: Tokenizer, rng: random.Random, length: int, filler: str) -> tuple[_Draft, int]:
    values = _needle_values(rng)
    asked = rng.choice(list(values))
    return _haystack_task(
        tok,
        rng,
        length,
        filler,
        needles=_needle_sentences(values),
        depths=[rng.random() for _ in values],
        header=_NEEDLE_HEADER,
        question=(
            f"What is the special magic number for {asked}? Answer with the 7-digit number only."
        ),
        expected=frozenset({values[asked]}),
        pattern=r"(?<!\d)\d{7}(?!\d)",
    )


def _needles(tok: Tokenizer, rng: random.Random, length: int, filler: str) -> tuple[_Draft, int]:
    values = _needle_values(rng)
    return _haystack_task(
        tok,
        rng,
        length,
        filler,
        needles=_needle_sentences(values),
        depths=[rng.random() for _ in values],
        header=_NEEDLE_HEADER,
        question=(
            f"What are the special magic numbers for {', '.join(values)}? "
            "Answer with the 7-digit numbers only, separated by commas."
        ),
        expected=frozenset(values.values()),
        pattern=r"(?<!\d)\d{7}(?!\d)",
    )


_CHAIN_HOPS = 4


def _var_names(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
    return sorted(names, key=lambda _: rng.random())


def _vartrack(tok: Tokenizer, rng: random.Random, length: int, filler: str) -> tuple[_Draft, int]:
    value, other = (str(v) for v in rng.sample(range(10_000, 100_000), 2))
    names = _var_names(rng, 2 * (_CHAIN_HOPS + 1))
    chains = [names[: _CHAIN_HOPS + 1], names[_CHAIN_HOPS + 1 :]]
    statements, depths = [], []
    for chain, start in zip(chains, (value, other), strict=True):
        # each chain in order: a statement is placed after the one it refers to
        chain_depths = sorted(rng.random() for _ in chain)
        for i, (name, depth) in enumerate(zip(chain, chain_depths, strict=True)):
            statements.append(f"VAR {name} = {start if i == 0 else chain[i - 1]}.")
            depths.append(depth)
    return _haystack_task(
        tok,
        rng,
        length,
        filler,
        needles=statements,
        depths=depths,
        header=(
            "Memorize and track the chains of variable assignments hidden in the following text."
        ),
        question=(
            f"Which variables are assigned the value {value}, directly or through other "
            "variables? Answer with their names only, separated by commas."
        ),
        expected=frozenset(n.casefold() for n in chains[0]),
        pattern=r"\b(?:" + "|".join(names) + r")\b",
    )


_TOP_WORDS = 3
_RARE_MAX = 3  # a word outside the top appears 1..3 times


def _word_pool(filler: str, rng: random.Random, avoid: str) -> list[str]:
    banned = set(re.findall(r"[a-z]+", avoid.casefold()))
    words = sorted(set(re.findall(r"\b[a-z]{4,10}\b", filler)) - banned)
    if len(words) < 50:
        raise ValueError("the filler text has too few distinct words for the words task")
    rng.shuffle(words)
    return words


def _words(tok: Tokenizer, rng: random.Random, length: int, filler: str) -> tuple[_Draft, int]:
    header = "Below is a numbered list of words. Some of them appear more often than the others."
    question = (
        f"What are the {_TOP_WORDS} most frequent words in the list above? "
        "Answer with the words only, separated by commas."
    )
    pool = _word_pool(filler, rng, header + question)
    top, rare = pool[:_TOP_WORDS], pool[_TOP_WORDS:]
    # about a fifth of the list's ~length/4 entries are the top words, each at least twice as
    # often as any other word
    top_count = max(2 * _RARE_MAX, length // (20 * _TOP_WORDS))
    head = [w for w in top for _ in range(top_count)]
    # the other words in pool order, each 1.._RARE_MAX times: a longer list takes more of them
    tail = [w for w in rare for _ in range(rng.randint(1, _RARE_MAX))]
    order_seed = rng.random()

    def draft(n: int) -> _Draft:
        items = head + tail[:n]
        random.Random(order_seed).shuffle(items)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return _Draft(
            f"{header}\n\n{listing}\n\n{question}",
            frozenset(top),
            r"(?i)\b(?:" + "|".join([*top, *rare]) + r")\b",
        )

    return _fit(draft, tok, length, hi=len(tail))


TaskBuilder = Callable[[Tokenizer, random.Random, int, str], tuple[_Draft, int]]
TASKS: dict[str, TaskBuilder] = {
    "passkey": _passkey,
    "needle": _needle,
    "needles": _needles,
    "vartrack": _vartrack,
    "words": _words,
}
DEFAULT_TASKS = ("passkey", "needle", "vartrack", "words")


def parse_tasks(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or text!r}; known: {', '.join(TASKS)}")
    return names


def make_sample(task: str, seed: int, length: int, tok: Tokenizer, filler: str) -> Sample:
    """One sample of `task`, the same for the same arguments (and tokenizer)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    rng = random.Random(f"{task}:{seed}:{length}")
    draft, n_tokens = TASKS[task](tok, rng, length, filler)
    messages = ({"role": "system", "content": SYSTEM}, {"role": "user", "content": draft.user})
    return Sample(task, seed, length, n_tokens, messages, draft.expected, draft.pattern)


def make_samples(
    tasks: Sequence[str], lengths: Sequence[int], n: int, tok: Tokenizer, filler: str
) -> list[Sample]:
    """`n` samples (seeds 0..n-1) of every task at every length."""
    return [
        make_sample(task, seed, length, tok, filler)
        for task in tasks
        for length in lengths
        for seed in range(n)
    ]


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Outcome:
    sample: Sample
    answer: str
    score: float


@dataclass
class TaskReport:
    """Mean score per variant, task and length."""

    variants: list[str] = field(default_factory=list)
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)

    def accuracy(self, variant: str) -> dict[tuple[str, int], float]:
        groups: dict[tuple[str, int], list[float]] = {}
        for o in self.outcomes[variant]:
            groups.setdefault((o.sample.task, o.sample.length), []).append(o.score)
        return {k: sum(v) / len(v) for k, v in groups.items()}

    def table(self) -> str:
        """A markdown table: one row per variant, one column per task and length."""
        if not self.variants:
            return ""
        columns = list(self.accuracy(self.variants[0]))
        lines = [
            "| variant | " + " | ".join(f"{t}@{n}" for t, n in columns) + " |",
            "| --- |" + " --- |" * len(columns),
        ]
        for v in self.variants:
            acc = self.accuracy(v)
            lines.append(f"| {v} | " + " | ".join(f"{acc[c]:.2f}" for c in columns) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": {
                v: {f"{t}@{n}": a for (t, n), a in self.accuracy(v).items()} for v in self.variants
            },
            "outcomes": {
                v: [
                    {
                        "task": o.sample.task,
                        "length": o.sample.length,
                        "seed": o.sample.seed,
                        "n_tokens": o.sample.n_tokens,
                        "expected": sorted(o.sample.expected),
                        "answer": o.answer,
                        "score": o.score,
                    }
                    for o in outs
                ]
                for v, outs in self.outcomes.items()
            },
        }


def run(
    model: ChatModel,
    samples: Sequence[Sample],
    *,
    max_tokens: int = 48,
    on_done: Callable[[Outcome], None] | None = None,
) -> Iterator[Outcome]:
    """Ask `model` every sample (greedy answers are the model's business) and score the answers."""
    for sample in samples:
        answer = model.chat(list(sample.messages), max_tokens=max_tokens)
        outcome = Outcome(sample, answer, sample.score(answer))
        if on_done is not None:
            on_done(outcome)
        yield outcome


def compare(
    variants: Mapping[str, Callable[[], AbstractContextManager[ChatModel]]],
    samples: Sequence[Sample],
    *,
    max_tokens: int = 48,
    on_done: Callable[[str, Outcome], None] | None = None,
) -> TaskReport:
    """Every sample on every variant (each opened in turn, e.g. dense then SparseK)."""
    report = TaskReport()
    for name, open_model in variants.items():
        with open_model() as model:

            def done(o: Outcome, name: str = name) -> None:
                if on_done is not None:
                    on_done(name, o)

            report.outcomes[name] = list(run(model, samples, max_tokens=max_tokens, on_done=done))
        report.variants.append(name)
    return report
