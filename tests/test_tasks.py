"""The synthetic long-context tasks: deterministic generation, lengths, needles, scoring, runner."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from llama_sparsek import tasks


class WordTokenizer:
    """A stand-in tokenizer: one token per word, number or punctuation mark."""

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return [hash(t) % 50_000 for t in re.findall(r"\w+|[^\w\s]", text)]


def _filler(seed: int = 0, n_words: int = 30_000) -> str:
    """Pseudo-prose: sentences of words from a fixed vocabulary of 1000, paragraphs of 5."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = sorted({"".join(rng.choices(letters, k=rng.randint(4, 9))) for _ in range(1000)})
    sentences, words = [], 0
    while words < n_words:
        n = rng.randint(6, 16)
        sentences.append(" ".join(rng.choices(vocab, k=n)).capitalize() + ".")
        words += n
    return "\n\n".join(" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5))


FILLER = _filler()
TOK = WordTokenizer()


def _user(sample: tasks.Sample) -> str:
    assert [m["role"] for m in sample.messages] == ["system", "user"]
    return sample.messages[1]["content"]


@pytest.mark.parametrize("task", list(tasks.TASKS))
@pytest.mark.parametrize("length", [600, 2000])
def test_sample_has_the_requested_length_and_is_deterministic(task: str, length: int) -> None:
    a = tasks.make_sample(task, 3, length, TOK, FILLER)
    b = tasks.make_sample(task, 3, length, TOK, FILLER)
    assert a == b
    counted = sum(len(TOK.tokenize(m["content"], add_special=False)) for m in a.messages)
    assert counted == a.n_tokens
    assert length - 16 <= a.n_tokens <= length
    other = tasks.make_sample(task, 4, length, TOK, FILLER)
    assert other.messages != a.messages


def test_passkey_is_hidden_in_real_text_and_scored() -> None:
    s = tasks.make_sample("passkey", 0, 1500, TOK, FILLER)
    (key,) = s.expected
    assert re.fullmatch(r"\d{5}", key)
    user = _user(s)
    assert f"The pass key is {key}." in user
    needle_at = user.index(f"The pass key is {key}")
    assert 0 < needle_at < len(user)
    # the text around the needle is the filler's
    assert any(sentence in FILLER for sentence in user[needle_at:].split(". ")[2:4])
    assert s.score(f"The pass key is {key}.") == 1.0
    assert s.score(key) == 1.0
    wrong = f"{(int(key) + 1) % 100_000:05d}"
    assert s.score(wrong) == 0.0
    assert s.score("") == 0.0
    assert s.score(f"{key} or {wrong}") == 0.5
    assert s.score(f"1{key}") == 0.0  # a 6-digit number is not the key


def test_needles_are_all_present_and_one_is_asked() -> None:
    s = tasks.make_sample("needle", 1, 2000, TOK, FILLER)
    user = _user(s)
    found = dict(re.findall(r"special magic numbers for (\w+) is: (\d{7})\.", user))
    assert len(found) == 4
    (value,) = s.expected
    asked = re.search(r"What is the special magic number for (\w+)\?", user)
    assert asked is not None and found[asked.group(1)] == value
    assert s.score(f"The number is {value}.") == 1.0
    others = [v for v in found.values() if v != value]
    assert s.score(others[0]) == 0.0
    assert s.score(", ".join(found.values())) == 0.25  # a list of everything is not an answer


def test_all_needles_task_expects_every_value() -> None:
    s = tasks.make_sample("needles", 2, 2000, TOK, FILLER)
    found = re.findall(r"special magic numbers for \w+ is: (\d{7})\.", _user(s))
    assert set(found) == s.expected and len(found) == 4
    assert s.score(", ".join(found)) == 1.0
    assert s.score(", ".join(found[:2])) == 0.5


def test_vartrack_chain_resolves_to_the_asked_value() -> None:
    s = tasks.make_sample("vartrack", 5, 2000, TOK, FILLER)
    user = _user(s)
    assignments = re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", user)
    assert len(assignments) == 10
    value = re.search(r"assigned the value (\d{5})", user)
    assert value is not None
    # an independent resolver: follow the assignments in text order
    env: dict[str, str] = {}
    for name, rhs in assignments:
        env[name] = env.get(rhs, rhs)
    holders = {n.casefold() for n, v in env.items() if v == value.group(1)}
    assert holders == s.expected and len(holders) == 5
    names = [n for n, _ in assignments if n.casefold() in holders]
    assert s.score(", ".join(names)) == 1.0
    assert s.score(", ".join(n for n, _ in assignments)) == 0.5  # distractor chain named too
    assert s.score(value.group(1)) == 0.0


def test_words_top_three_are_the_most_frequent() -> None:
    s = tasks.make_sample("words", 7, 3000, TOK, FILLER)
    listing = re.findall(r"^\d+\. (\w+)$", _user(s), flags=re.M)
    assert len(listing) > 500
    counts = Counter(listing).most_common()
    top = {w for w, _ in counts[:3]}
    assert top == s.expected
    assert counts[2][1] >= 2 * counts[3][1]  # the top three stand out
    assert s.score(", ".join(sorted(top)).upper()) == 1.0
    assert s.score(", ".join(w for w, _ in counts[3:6])) == 0.0
    assert s.score("The most frequent words are: " + ", ".join(sorted(top))) == 1.0


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_sample("ruler", 0, 1000, TOK, FILLER)
    with pytest.raises(ValueError, match="too short for the task"):
        tasks.make_sample("needles", 0, 20, TOK, FILLER)
    with pytest.raises(ValueError, match="filler text is too short"):
        tasks.make_sample("passkey", 0, 5000, TOK, FILLER[:2000])
    with pytest.raises(ValueError, match="unknown task"):
        tasks.parse_tasks("passkey,rulers")
    assert tasks.parse_tasks("passkey, words") == ("passkey", "words")


class FakeModel:
    """Answers from the prompt itself: right for the passkey, a fixed wrong number otherwise."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, str]], int]] = []

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int = 64) -> str:
        self.calls.append(([dict(m) for m in messages], max_tokens))
        key = re.search(r"The pass key is (\d{5})", messages[-1]["content"])
        return key.group(1) if key else "1234567"


def test_compare_scores_each_variant_per_task_and_length() -> None:
    samples = tasks.make_samples(["passkey", "needle"], [600, 1200], 2, TOK, FILLER)
    assert len(samples) == 8
    models: dict[str, FakeModel] = {}
    closed: list[str] = []

    def opener(name: str):  # type: ignore[no-untyped-def]
        @contextmanager
        def open_model() -> Iterator[FakeModel]:
            models[name] = FakeModel()
            yield models[name]
            closed.append(name)

        return open_model

    seen: list[str] = []
    report = tasks.compare(
        {"dense": opener("dense"), "k1280": opener("k1280")},
        samples,
        max_tokens=24,
        on_done=lambda v, o: seen.append(v),
    )
    assert closed == ["dense", "k1280"] and seen == ["dense"] * 8 + ["k1280"] * 8
    assert models["dense"].calls[0] == ([dict(m) for m in samples[0].messages], 24)
    assert report.accuracy("dense") == {
        ("passkey", 600): 1.0,
        ("passkey", 1200): 1.0,
        ("needle", 600): 0.0,
        ("needle", 1200): 0.0,
    }
    table = report.table()
    assert "| dense | 1.00 | 1.00 | 0.00 | 0.00 |" in table
    assert "passkey@600" in table
    js = report.to_json()
    assert js["accuracy"]["k1280"]["passkey@1200"] == 1.0
    assert len(js["outcomes"]["dense"]) == 8


def test_lengths_with_a_real_tokenizer(tiny_model: Path) -> None:
    from llama_sparsek.llama import Llama

    with Llama(tiny_model, n_ctx=256) as llm:
        for task in tasks.TASKS:
            s = tasks.make_sample(task, 0, 1024, llm, FILLER)
            counted = sum(len(llm.tokenize(m["content"], add_special=False)) for m in s.messages)
            assert counted == s.n_tokens
            assert 1024 - 20 <= s.n_tokens <= 1024


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "passkey,ruler"], "unknown task"),
        (["--task-lengths", "4k"], "--task-lengths"),
        (["--task-samples", "0"], "must be positive"),
        (["--grid", "12:x"], "grid item"),
    ],
)
def test_eval_tasks_bad_input_is_exit_2(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from llama_sparsek.cli import app

    result = CliRunner().invoke(app, ["eval-tasks", *args])
    assert result.exit_code == 2
    assert message in result.output
