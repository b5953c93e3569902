"""The long-context workflow on SmolLM2-135M: a ~4,000-token document, two questions, state
files and chat through the model's own template (slow: real model, long prefills)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_sparsek import Llama, SparseK
from llama_sparsek.state import StateFileError

pytestmark = pytest.mark.slow

CITIES = ["Arden", "Belmont", "Corvale", "Dunmore", "Eastwick", "Fairhaven", "Glenrock"]


def long_document(n_entries: int = 112) -> str:
    """A ~4,000-token register of made-up facts (deterministic)."""
    lines = ["The registry of the northern district lists the following entries."]
    for i in range(n_entries):
        city = CITIES[i % len(CITIES)]
        lines.append(
            f"Entry {i}: the archive of {city} holds box {i * 7 % 101}, sealed in year "
            f"{1800 + i * 3 % 200}, and its keeper is number {i * 13 % 97}."
        )
    return "\n".join(lines)


DOC = long_document()
Q1 = DOC + "\n\nQuestion: which box does entry 12 hold?\nAnswer:"
Q2 = DOC + "\n\nQuestion: who is the keeper of entry 40?\nAnswer:"


def open_model(path: Path, sparsek: SparseK | None) -> Llama:
    return Llama(path, n_ctx=8192, n_threads=2, sparsek=sparsek)


def test_document_is_long_enough_for_sparsek(smollm2_path: Path) -> None:
    with Llama(smollm2_path, n_ctx=512, n_threads=1) as llm:
        assert 3500 < len(llm.tokenize(Q1)) < 4600


def test_second_question_with_sparsek_evaluates_only_the_question(smollm2_path: Path) -> None:
    with open_model(smollm2_path, SparseK()) as llm:
        llm.generate(Q1, 8)
        first = llm.last_timings
        llm.generate(Q2, 8)
        second = llm.last_timings
    assert first is not None and second is not None
    assert first.reused_tokens == 0
    assert second.prefill_tokens < 25 < second.reused_tokens
    assert second.reused_tokens + second.prefill_tokens == second.prompt_tokens
    print(f"\nfirst question: {first.summary()}\nsecond question: {second.summary()}")


def test_dense_reused_answer_equals_a_fresh_context(smollm2_path: Path) -> None:
    """Flash attention off: bit-identical logits, so the same greedy answer as a fresh context
    that evaluates the whole prompt."""
    with (
        Llama(smollm2_path, n_ctx=8192, n_threads=2, flash_attn=False) as reused,
        Llama(smollm2_path, n_ctx=8192, n_threads=2, flash_attn=False) as fresh,
    ):
        reused.generate(Q1, 8)
        got = list(reused.generate_tokens(reused.tokenize(Q2), 24))
        assert reused.last_timings is not None and reused.last_timings.prefill_tokens < 25
        want = list(fresh.generate_tokens(fresh.tokenize(Q2), 24))
        assert fresh.last_timings is not None and fresh.last_timings.reused_tokens == 0
    assert got == want


def test_flash_attention_reused_answer_equals_a_fresh_context_with_its_batches(
    smollm2_path: Path,
) -> None:
    """Flash attention on: llama.cpp's CPU kernel rounds differently for batches of fewer than
    64 queries (a question after a reused document) than for larger ones, so the reference is
    a fresh context (no removed tail, no reused cells) fed the same two batches."""
    with open_model(smollm2_path, None) as reused, open_model(smollm2_path, None) as fresh:
        reused.generate(Q1, 8)
        question = reused.tokenize(Q2)
        got = list(reused.generate_tokens(question, 24))
        assert reused.last_timings is not None
        shared = reused.last_timings.reused_tokens
        assert reused.last_timings.prefill_tokens < 25
        list(fresh.generate_tokens(question[:shared], 1))  # the document, in fresh cells
        want = list(fresh.generate_tokens(question, 24))
        assert fresh.last_timings is not None and fresh.last_timings.reused_tokens == shared
    assert got == want


def test_state_file_replays_the_reused_context(smollm2_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "doc.state"
    with open_model(smollm2_path, SparseK()) as first:
        first.generate(Q1, 8)
        first.save_state(path)
        want = list(first.generate_tokens(first.tokenize(Q2), 24))
    with open_model(smollm2_path, SparseK()) as loaded:
        loaded.load_state(path)
        got = list(loaded.generate_tokens(loaded.tokenize(Q2), 24))
        assert loaded.last_timings is not None and loaded.last_timings.prefill_tokens < 25
    assert got == want
    other = SparseK(top_k=1024, window=256, block_size=8)
    with open_model(smollm2_path, other) as refusing:
        with pytest.raises(StateFileError, match="SparseK"):
            refusing.load_state(path)
        assert refusing.tokens == []


def test_chat_knows_the_capital_of_france(smollm2_path: Path) -> None:
    with Llama(smollm2_path, n_ctx=2048, n_threads=2) as llm:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        answer = llm.chat(messages, 32)
        assert "Paris" in answer
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And of Germany?"},
        ]
        first_prompt = llm.last_timings
        second = llm.chat(messages, 32)
        assert "Berlin" in second
        assert first_prompt is not None and llm.last_timings is not None
        assert llm.last_timings.reused_tokens >= first_prompt.prompt_tokens
