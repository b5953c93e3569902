"""A SparseK query keeps the same keys however the prompt was cut into ubatches.

llama.cpp evaluates a prompt in ubatches; a prefix reused from an earlier call, or the question
after it, is a ubatch of its own. The keys a query keeps must depend only on the query and the
keys, so that the next-token logits after a prompt are the same whether it was evaluated in one
go or as a prefix plus a suffix of a few tokens. (Before patch 0013, a ubatch of fewer than 64
tokens selected single keys instead of blocks: the logits moved by up to 2.5.)

Whether a token drops keys at all depends on the keys it sees, not on its ubatch: a token that sees
fewer keys than SparseK's threshold keeps them all, in a ubatch where the others drop keys too.
(Before patch 0033 the whole ubatch's view decided: a prefix that ended below the threshold put
the next tokens that were still below it in a sparse ubatch.)

A top_k that grows with the keys a query sees (``SparseK.grow_top_k``) grows with the query's own
keys, not with its ubatch's: the rows of one ubatch keep different numbers of blocks.

With block summaries (``SparseK.summaries``) the keys a query keeps depend only on the summaries
of the blocks, which the KV cache rewrites with the keys they summarize: after a prefix in another
ubatch and after a state file that holds no summaries (they are rebuilt from the keys) alike.

A token decoded alone is compared only to float noise: with one row, the CPU weight mat muls
take other kernels (GEMV instead of GEMM) and round differently even dense, by up to 0.8 in a
logit of SmolLM2, so the last 64 tokens decoded one at a time must stay within twice the dense
model's own difference for the same split. So is a suffix of fewer than 16 tokens on a CPU with
AMX: the scores of a ubatch that short stay in F16 (patch 0037), those of the whole prompt are
BF16, and near-ties in the selection can flip.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from llama_sparsek import Llama, SparseK
from llama_sparsek._binding import ffi, lib

# drop keys from 1,601 cells on (1,691 with the stride): the prompt's last ubatch runs the SparseK
# graph
SETTINGS = [
    SparseK(top_k=256, window=64, block_size=8),
    SparseK(top_k=256, window=64, stride=128, block_size=16, sinks=4),
    SparseK(top_k=256, window=64, block_size=8, summaries=1),
    # the same threshold; top_k grows to 136 keys from 1,806 keys on, within the last ubatch
    SparseK(top_k=128, window=192, block_size=8, grow_top_k=1),
    # a mask per K head (SmolLM2: 3 of them)
    SparseK(top_k=256, window=64, block_size=8, per_group=1),
]
N_PROMPT = 2000
# tokens in the last ubatch; after a prefix of 1,400 tokens, the next ubatch holds tokens that keep
# all of their keys (up to 1,600) and tokens that drop keys
SUFFIXES = (63, 16, N_PROMPT - 1400)
# fewer than 16 tokens: on a CPU with AMX their scores are F16, the whole prompt's BF16
# (patch 0037), so they agree like decoded tokens do: within twice the dense model's difference
# with its last 64 tokens decoded one at a time
SHORT_SUFFIXES = (8, 2)
N_ONE_AT_A_TIME = 64
# flash attention off: its CPU kernel rounds ubatches of fewer than 64 rows differently even dense,
# while the soft-max path gives a reused prefix bit-identical logits
OPTS = {"n_ctx": 2048, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2, "flash_attn": False}


def _code_text(n_def: int = 120, n_use: int = 200) -> str:
    """Code-like text whose later lines call functions defined far back (retrieval-like keys)."""
    lines = [f"def f_{i}(x):\n    return x * {i * 7919 % 1000} + {i}\n" for i in range(n_def)]
    lines += [f"y_{i} = f_{(i * 37) % n_def}(y_{i - 1})\n" for i in range(1, n_use)]
    return "".join(lines)


def _setting_id(s: SparseK) -> str:
    flags = "-summaries" * s.summaries + "-grow" * s.grow_top_k + "-group" * s.per_group
    return f"k{s.top_k}-w{s.window}-s{s.stride}-b{s.block_size}{flags}"


def _last_logits(llm: Llama, chunks: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits after the last token, the chunks decoded one after another from an empty context."""
    llm.reset()
    for chunk in chunks:
        llm._decode(chunk, all_logits=False)
    return _logits_now(llm)


def _logits_now(llm: Llama) -> np.ndarray:
    """The logits after the last token decoded."""
    ptr = lib.llama_get_logits_ith(llm._live_ctx(), -1)
    return np.frombuffer(ffi.buffer(ptr, 4 * llm.n_vocab), dtype=np.float32).copy()


def _one_at_a_time(llm: Llama, tokens: Sequence[int]) -> np.ndarray:
    """Last logits with the last N_ONE_AT_A_TIME tokens decoded one at a time."""
    last = tokens[-N_ONE_AT_A_TIME:]
    return _last_logits(llm, [tokens[:-N_ONE_AT_A_TIME], *([t] for t in last)])


def _spread(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def dense_noise(smollm2_path: Path) -> float:
    """The dense model's own difference between the whole prompt and its last tokens decoded one
    at a time (GEMV instead of GEMM): the float noise the comparisons allow."""
    with Llama(smollm2_path, **OPTS) as llm:  # type: ignore[arg-type]
        tokens = llm.tokenize(_code_text())[:N_PROMPT]
        whole = _last_logits(llm, [tokens])
        one_by_one = _one_at_a_time(llm, tokens)
    assert one_by_one.argmax() == whole.argmax()
    noise = _spread(one_by_one, whole)
    assert noise > 0.0  # the noise that the comparisons allow is real
    return noise


@pytest.mark.slow
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: _setting_id(s))
def test_logits_do_not_depend_on_the_split(
    smollm2_path: Path, settings: SparseK, dense_noise: float
) -> None:
    with Llama(smollm2_path, sparsek=settings, **OPTS) as llm:  # type: ignore[arg-type]
        tokens = llm.tokenize(_code_text())[:N_PROMPT]
        assert len(tokens) == N_PROMPT
        whole = _last_logits(llm, [tokens])
        for n in SUFFIXES:
            split = _last_logits(llm, [tokens[:-n], tokens[-n:]])
            np.testing.assert_allclose(split, whole, atol=1e-4, rtol=0, err_msg=f"suffix {n}")
        for n in SHORT_SUFFIXES:
            split = _last_logits(llm, [tokens[:-n], tokens[-n:]])
            assert split.argmax() == whole.argmax(), f"suffix {n}"
            assert _spread(split, whole) <= 2.0 * dense_noise, (n, dense_noise)


@pytest.mark.slow
def test_default_logits_do_not_depend_on_a_prefix_below_the_threshold(smollm2_path: Path) -> None:
    # the default keeps all keys of a token that sees up to 8,960: a reused prefix of 8,650 tokens
    # puts tokens 8,650-8,959 first in a ubatch with tokens that drop keys, while evaluated at once
    # they are in the ubatches of tokens 8,192-8,703 and 8,704-9,215 (the suffix's last ubatch
    # holds 54 tokens: 16 or more, so its scores are rounded like the whole prompt's)
    opts = {"n_ctx": 9472, "n_batch": 9472, "n_ubatch": 512, "n_threads": 2, "flash_attn": False}
    with Llama(smollm2_path, sparsek=SparseK(), **opts) as llm:  # type: ignore[arg-type]
        tokens = llm.tokenize(_code_text(360, 600))[:9216]
        assert len(tokens) == 9216
        whole = _last_logits(llm, [tokens])
        split = _last_logits(llm, [tokens[:8650], tokens[8650:]])
        np.testing.assert_allclose(split, whole, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: _setting_id(s))
def test_tokens_decoded_one_at_a_time_stay_within_dense_noise(
    smollm2_path: Path, settings: SparseK, dense_noise: float
) -> None:
    with Llama(smollm2_path, sparsek=settings, **OPTS) as llm:  # type: ignore[arg-type]
        tokens = llm.tokenize(_code_text())[:N_PROMPT]
        whole = _last_logits(llm, [tokens])
        one_by_one = _one_at_a_time(llm, tokens)
    assert one_by_one.argmax() == whole.argmax()
    spread = _spread(one_by_one, whole)
    assert spread <= 2.0 * dense_noise, (spread, dense_noise)


@pytest.mark.slow
def test_summaries_are_rebuilt_after_a_state_load(smollm2_path: Path, tmp_path: Path) -> None:
    # a state file holds the keys, not their summaries: a fresh context that loads it rebuilds
    # them all, and the suffix then keeps the keys it keeps after the whole prompt
    settings = next(s for s in SETTINGS if s.summaries)
    with Llama(smollm2_path, sparsek=settings, **OPTS) as llm:  # type: ignore[arg-type]
        tokens = llm.tokenize(_code_text())[:N_PROMPT]
        whole = _last_logits(llm, [tokens])
        _last_logits(llm, [tokens[:-63]])
        llm.save_state(tmp_path / "prefix.state")
    with Llama(smollm2_path, sparsek=settings, **OPTS) as llm:  # type: ignore[arg-type]
        llm.load_state(tmp_path / "prefix.state")
        llm._decode(tokens[-63:], all_logits=False)
        loaded = _logits_now(llm)
    np.testing.assert_allclose(loaded, whole, atol=1e-4, rtol=0)
