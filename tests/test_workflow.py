"""The long-context workflow on the tiny model: prefix reuse, state files, chat, guards.

Speed is never asserted: reuse is checked by the number of evaluated tokens (last_timings),
results against a fresh context that evaluates everything.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_llama

from llama_sparsek import Llama, Sampling, SparseK
from llama_sparsek.llama import LlamaBusyError
from llama_sparsek.sampling import split_options
from llama_sparsek.state import StateFileError

WORDS = ["the", "and", "of", "to", "in", "is", "it"]
SMALL_SPARSEK = SparseK(top_k=16, window=8, block_size=8)  # drops keys from 49 cells on


def document(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words)) + "."


def open_tiny(path: Path, **kwargs: object) -> Llama:
    options: dict[str, object] = {"n_ctx": 1024, "n_threads": 2, "n_batch": 128, "n_ubatch": 128}
    options.update(kwargs)
    return Llama(path, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Llama:
    return open_tiny(tiny_model)


# ---------------------------------------------------------------- prefix reuse


@pytest.mark.parametrize(
    "options",
    [
        {"flash_attn": True},
        {"flash_attn": False},
        {"flash_attn": True, "sparsek": SMALL_SPARSEK},
        {"flash_attn": False, "sparsek": SMALL_SPARSEK},
    ],
    ids=["fa", "no-fa", "fa-sparsek", "no-fa-sparsek"],
)
def test_second_question_evaluates_only_the_question(
    tiny_model: Path, options: dict[str, object]
) -> None:
    doc = document(300)
    with open_tiny(tiny_model, **options) as reused, open_tiny(tiny_model, **options) as fresh:
        first = reused.tokenize(doc + " the and")
        list(reused.generate_tokens(first, 4))
        assert reused.last_timings is not None
        assert reused.last_timings.reused_tokens == 0
        assert reused.last_timings.prefill_tokens == len(first)

        second = reused.tokenize(doc + " of it is")
        shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
        assert shared > 250
        lp = reused.logprobs(second, start=len(second) - 3)
        assert reused.last_timings.reused_tokens == len(second) - 4  # all up to `start - 1`
        ref = fresh.logprobs(second, start=len(second) - 3)
        assert fresh.last_timings is not None and fresh.last_timings.reused_tokens == 0
        # same keys, same queries: only batch shapes differ (a wrong position or a stale cell
        # would move these by O(1))
        np.testing.assert_allclose(lp, ref, atol=2e-3)

        out = list(reused.generate_tokens(second, 6))
        assert reused.last_timings.reused_tokens == len(second) - 1
        assert reused.last_timings.prefill_tokens == 1
        assert len(out) >= 1
        assert reused.tokens[: len(second)] == second


def test_divergent_prompt_drops_the_tail(llm: Llama) -> None:
    a = llm.tokenize(document(120, seed=1))
    b = a[:50] + llm.tokenize(" it is the", add_special=False)
    greedy = list(llm.generate_tokens(a, 3))
    assert llm.tokens[: len(a)] == a
    got = list(llm.generate_tokens(b, 5))
    assert llm.last_timings is not None and llm.last_timings.reused_tokens == 50
    llm.reset()
    assert llm.tokens == []
    assert list(llm.generate_tokens(b, 5)) == got  # a fresh evaluation agrees
    assert llm.last_timings.reused_tokens == 0
    # the same prompt twice: only its last token is evaluated again
    assert list(llm.generate_tokens(a, 3)) == greedy
    assert list(llm.generate_tokens(a, 3)) == greedy
    assert llm.last_timings.prefill_tokens == 1


def test_reuse_survives_an_abandoned_generator(llm: Llama) -> None:
    prompt = llm.tokenize(document(80, seed=2))
    expected = list(llm.generate_tokens(prompt, 8))
    gen = llm.generate_tokens(prompt, 8)
    next(gen)
    gen.close()
    assert list(llm.generate_tokens(prompt, 8)) == expected


def test_eval_clears_then_keeps_its_tokens(llm: Llama) -> None:
    tokens = llm.tokenize(document(40, seed=3))
    llm.eval(tokens)
    assert llm.tokens == tokens
    llm.generate("x", 2)
    logits = llm.eval(tokens)
    assert llm.last_timings is not None and llm.last_timings.reused_tokens == 0
    assert logits.shape == (len(tokens), llm.n_vocab)


def test_progress_reports_the_prefill(llm: Llama) -> None:
    calls: list[tuple[int, int]] = []
    prompt = document(300, seed=4)
    llm.reset()
    llm.generate(prompt, 2, progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert calls[-1][0] == total and len(calls) == -(-total // llm.n_batch)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_timings_add_up(llm: Llama) -> None:
    llm.reset()
    text = llm.generate("the and of", 6, sampling=Sampling(), stop=())
    t = llm.last_timings
    assert t is not None and text is not None
    assert t.prompt_tokens == len(llm.tokenize("the and of"))
    assert t.reused_tokens + t.prefill_tokens == t.prompt_tokens
    assert t.first_token_s is not None and t.first_token_s >= t.prefill_s >= 0
    assert 0 <= t.generated_tokens <= 6
    assert "prompt" in t.summary()


# ---------------------------------------------------------------- state files


def _saved(llm: Llama, tmp_path: Path, text: str) -> tuple[Path, list[int]]:
    tokens = llm.tokenize(text)
    list(llm.generate_tokens(tokens, 2))
    path = tmp_path / "doc.state"
    llm.save_state(path)
    return path, llm.tokens


@pytest.mark.parametrize("sparsek", [None, SMALL_SPARSEK], ids=["dense", "sparsek"])
def test_state_file_round_trip(tiny_model: Path, tmp_path: Path, sparsek: SparseK | None) -> None:
    doc = document(300, seed=5)
    with open_tiny(tiny_model, sparsek=sparsek) as a, open_tiny(tiny_model, sparsek=sparsek) as b:
        path, held = _saved(a, tmp_path, doc + " the")
        b.load_state(path)
        assert b.tokens == held
        question = a.tokenize(doc + " and of it")
        want = list(a.generate_tokens(question, 8))
        got = list(b.generate_tokens(question, 8))
        assert a.last_timings is not None and b.last_timings is not None
        assert b.last_timings.reused_tokens == a.last_timings.reused_tokens > 250
        assert got == want


@pytest.mark.parametrize(
    "other",
    [
        {"sparsek": SMALL_SPARSEK},
        {"sparsek": SparseK(top_k=24, window=8, block_size=8), "base": SMALL_SPARSEK},
        {"type_k": "q8_0"},
        {"type_v": "f32", "flash_attn": True},
        {"flash_attn": False},
    ],
    ids=["sparsek-on", "sparsek-other", "type_k", "type_v", "flash_attn"],
)
def test_state_refused_by_other_settings(
    tiny_model: Path, tmp_path: Path, other: dict[str, object]
) -> None:
    base = other.pop("base", None)
    with open_tiny(tiny_model, sparsek=base) as a, open_tiny(tiny_model, **other) as b:
        path, _ = _saved(a, tmp_path, document(60, seed=6))
        list(b.generate_tokens(b.tokenize("it is the"), 2))
        before = b.tokens
        with pytest.raises(StateFileError, match="other settings"):
            b.load_state(path)
        assert b.tokens == before
        list(b.generate_tokens(before, 1))
        assert b.last_timings is not None and b.last_timings.reused_tokens == len(before) - 1


def test_state_refused_by_another_model(tiny_model: Path, tmp_path: Path) -> None:
    other = write_tiny_llama(tmp_path / "other.gguf", seed=1)
    with open_tiny(tiny_model) as a, open_tiny(other) as b:
        path, _ = _saved(a, tmp_path, document(20))
        with pytest.raises(StateFileError, match="model"):
            b.load_state(path)


def test_bad_state_files_fail_cleanly(llm: Llama, tmp_path: Path) -> None:
    path, _ = _saved(llm, tmp_path, document(50, seed=7))
    data = path.read_bytes()
    llm.generate("it is", 2)
    before = llm.tokens
    cases = {
        "truncated": data[: len(data) - 100],
        "header-only": data[:40],
        "empty": b"",
        "foreign": b"GGUF" + bytes(200),
        "flipped": data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:],
        "longer": data + b"\0",
    }
    for name, raw in cases.items():
        bad = tmp_path / f"{name}.state"
        bad.write_bytes(raw)
        with pytest.raises(StateFileError):
            llm.load_state(bad)
        assert llm.tokens == before, name
    with pytest.raises(FileNotFoundError):
        llm.load_state(tmp_path / "missing.state")
    with pytest.raises(FileNotFoundError):
        llm.load_state(tmp_path)  # a directory


def test_state_too_long_for_a_small_context(tiny_model: Path, tmp_path: Path) -> None:
    with open_tiny(tiny_model) as a, open_tiny(tiny_model, n_ctx=128) as b:
        path, _ = _saved(a, tmp_path, document(200, seed=8))
        with pytest.raises(StateFileError, match="more than this context"):
            b.load_state(path)


def test_state_written_atomically(
    llm: Llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _saved(llm, tmp_path, document(30, seed=9))
    old = path.read_bytes()
    llm.generate(document(60, seed=10), 2)

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        llm.save_state(path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.state"]


# ---------------------------------------------------------------- chat


def test_chat_needs_a_template(llm: Llama) -> None:
    assert llm.chat_template() is None
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}], 4)


def test_chat_with_a_named_template_reuses_the_conversation(llm: Llama) -> None:
    llm.reset()
    messages = [
        {"role": "system", "content": document(100, seed=11)},
        {"role": "user", "content": "the and"},
    ]
    answer = llm.chat(messages, 6, template="chatml")
    first = llm.last_timings
    assert isinstance(answer, str) and first is not None
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "of it"}]
    pieces = list(llm.stream_chat(messages, 6, template="chatml"))
    assert llm.last_timings is not None
    assert llm.last_timings.reused_tokens >= first.prompt_tokens - 1
    assert llm.last_timings.generated_tokens >= len([p for p in pieces if p])


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "", "content": "x"}],
        [{"role": "user", "content": "a\0b"}],
        [("user", "hi")],
    ],
)
def test_chat_bad_messages(llm: Llama, messages: object) -> None:
    with pytest.raises(ValueError):
        llm.chat(messages, 4, template="chatml")  # type: ignore[arg-type]


def test_chat_unknown_template(llm: Llama) -> None:
    with pytest.raises(ValueError, match="chat template"):
        llm.chat([{"role": "user", "content": "hi"}], 4, template="{{ not a known template }}")


# ---------------------------------------------------------------- sampling


def test_sampling_options_and_validation() -> None:
    base = Sampling()
    assert base.with_options(top_k=None, temperature=0.5).temperature == 0.5
    assert base.with_options(stop=["a"]).stop == ("a",)
    with pytest.raises(TypeError, match="unknown sampling option"):
        base.with_options(top_q=1)
    for bad in (
        {"repeat_penalty": 0.0},
        {"repeat_penalty": float("nan")},
        {"penalty_last_n": -1},
        {"stop": [""]},
    ):
        with pytest.raises(ValueError):
            base.with_options(**bad)
    for wrong in (
        {"top_k": 1.5},
        {"penalty_last_n": True},
        {"temperature": "0.5"},
        {"seed": 1.0},
        {"stop": "abc"},
        {"stop": ["a", None]},
    ):
        with pytest.raises(TypeError, match=next(iter(wrong))):
            base.with_options(**wrong)
    numpy_ints = base.with_options(top_k=np.int64(5), seed=np.uint32(3))  # become ints
    assert (numpy_ints.top_k, numpy_ints.seed) == (5, 3) and type(numpy_ints.top_k) is int
    sampling, rest = split_options({"top_p": 0.5, "n_ctx": 64})
    assert sampling == {"top_p": 0.5} and rest == {"n_ctx": 64}


def test_repeat_penalty_matches_a_numpy_reference(llm: Llama) -> None:
    """Each penalized greedy token is the argmax of the full evaluation's logits after
    llama.cpp's repeat penalty (a positive logit divided by it, any other multiplied) on the
    tokens among the last penalty_last_n (prompt included)."""
    prompt = llm.tokenize("aaaa")  # the plain continuation repeats tokens of its window
    penalty, last_n = 1.5, 8
    sampling = Sampling(repeat_penalty=penalty, penalty_last_n=last_n)
    plain = list(llm.generate_tokens(prompt, 16, stop_at_eog=False))
    got = list(llm.generate_tokens(prompt, 16, stop_at_eog=False, sampling=sampling))
    assert got != plain  # the penalty changed the output: the check below can fail
    history = list(prompt)
    for token in got:
        logits = llm.eval(history)[-1].astype(np.float64)
        for seen in set(history[-last_n:]):
            logits[seen] = logits[seen] / penalty if logits[seen] > 0 else logits[seen] * penalty
        assert token == int(np.argmax(logits))
        history.append(token)


# ---------------------------------------------------------------- guards


def test_closed_llama_refuses_every_method(tiny_model: Path, tmp_path: Path) -> None:
    m = open_tiny(tiny_model)
    m.close()
    calls = [
        lambda: m.tokenize("x"),
        lambda: m.token_bytes(5),
        lambda: m.detokenize([5]),
        lambda: m.reset(),
        lambda: m.eval([5]),
        lambda: m.logprobs([5, 6]),
        lambda: m.generate("x", 1),
        lambda: next(m.stream("x", 1)),
        lambda: next(m.generate_tokens([5], 1)),
        lambda: m.chat([{"role": "user", "content": "x"}], 1, template="chatml"),
        lambda: next(m.stream_chat([{"role": "user", "content": "x"}], 1, template="chatml")),
        lambda: m.chat_template(),
        lambda: m.save_state(tmp_path / "s"),
        lambda: m.load_state(tmp_path / "s"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="closed"):
            call()


@pytest.mark.parametrize("offset", [-1, 0, 10**6])
def test_token_bytes_out_of_range(llm: Llama, offset: int) -> None:
    token = -1 if offset < 0 else llm.n_vocab + offset
    with pytest.raises(ValueError, match="out of range"):
        llm.token_bytes(token)


def test_a_running_generator_holds_the_llama(tiny_model: Path) -> None:
    m = open_tiny(tiny_model, flash_attn=False)  # reused prefixes give fresh results bit for bit
    before = m.generate("it is", 2)
    gen = m.stream("the and of", 50)
    next(gen)
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            m.generate("it is", 2)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], LlamaBusyError)
    with pytest.raises(LlamaBusyError):
        m.tokenize("x")  # the same thread, while the generator is suspended
    with pytest.raises(LlamaBusyError, match="close"):
        m.close()
    gen.close()
    assert m.generate("it is", 2) == before  # released, and the context is consistent
    m.close()


def test_threads_never_corrupt_a_llama(tiny_model: Path) -> None:
    """Two threads hammering one Llama: every call either completes with the single-thread
    result or raises LlamaBusyError."""
    # flash attention off: a call that reuses the prompt gives the fresh call's tokens bit for
    # bit (with it on, the one-token batch of a reused prompt rounds differently)
    with open_tiny(tiny_model, flash_attn=False) as m:
        prompt = document(60, seed=12)
        expected = m.generate(prompt, 6)
        results: list[str] = []
        busy = [0]

        def worker() -> None:
            for _ in range(15):
                try:
                    results.append(m.generate(prompt, 6))
                except LlamaBusyError:
                    busy[0] += 1

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) + busy[0] == 30
        assert results  # a call is refused only while another one runs, which completes
        assert all(r == expected for r in results)


def test_prompt_longer_than_the_context(tiny_model: Path) -> None:
    with open_tiny(tiny_model, n_ctx=64, flash_attn=False) as m:
        before = m.generate("the", 2)
        with pytest.raises(ValueError, match="do not fit"):
            m.generate(document(200), 2)
        assert m.generate("the", 2) == before  # the refused call left the context as it was


def test_py_typed_is_installed() -> None:
    import importlib.resources

    assert importlib.resources.files("llama_sparsek").joinpath("py.typed").is_file()
