"""Tests of the numpy SparseK mask reference on small hand-made inputs (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
from sparsek_reference import (
    compare_kept,
    n_forced_max,
    n_kv_max,
    sparsek_forced,
    sparsek_mask,
    sparsek_scores,
)

NEG = -np.inf


def causal(n_tokens: int, n_kv: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Base mask of one sequence: cell j at position j, token i at position n_kv - n_tokens + i."""
    pq = np.arange(n_kv - n_tokens, n_kv)
    pk = np.arange(n_kv)
    return np.where(pk[None, :] <= pq[:, None], 0.0, NEG).astype(np.float32), pq, pk


def one_hot_keys(n_kv: int, head_dim: int = 4) -> np.ndarray:
    """k[j] = j * e0, so that with q = e0 the score of key j is j (later keys score higher)."""
    k = np.zeros((n_kv, 1, head_dim), dtype=np.float32)
    k[:, 0, 0] = np.arange(n_kv)
    return k


def kept(mask: np.ndarray, row: int) -> list[int]:
    return [int(j) for j in np.nonzero(np.isfinite(mask[row]))[0]]


def test_scores_sum_over_heads_of_a_group():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 4, 8)).astype(np.float32)  # 4 heads
    k = rng.standard_normal((5, 2, 8)).astype(np.float32)  # 2 KV heads -> n_gqa = 2
    expected = np.zeros((3, 5))
    for i in range(3):
        for j in range(5):
            for h in range(4):
                expected[i, j] += float(q[i, h] @ k[j, h // 2])
    np.testing.assert_allclose(sparsek_scores(q, k), expected, rtol=1e-5, atol=1e-5)


def test_top_k_only():
    n_kv = 8
    base = np.zeros((1, n_kv), dtype=np.float32)
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 1.0
    k = one_hot_keys(n_kv)
    k[2, 0, 0] = 100.0  # key 2 scores best
    m = sparsek_mask(q, k, base, np.array([7]), np.arange(n_kv), top_k=2, window=0, stride=0)
    assert kept(m, 0) == [2, 7]


def test_negative_scores_and_head_sharing():
    # two heads attend to the same KV head, they disagree: the sum decides
    n_kv = 6
    base = np.zeros((1, n_kv), dtype=np.float32)
    q = np.zeros((1, 2, 2), dtype=np.float32)
    q[0, 0] = [1.0, 0.0]
    q[0, 1] = [0.0, 1.0]
    k = np.zeros((n_kv, 1, 2), dtype=np.float32)
    k[:, 0, 0] = [5, -1, 0, 0, 0, 0]
    k[:, 0, 1] = [-6, 3, 0, 0, 0, 0]  # key 0: 5 - 6 = -1, key 1: -1 + 3 = 2, others 0
    m = sparsek_mask(q, k, base, np.array([5]), np.arange(n_kv), top_k=1, window=0, stride=0)
    assert kept(m, 0) == [1]


def test_window_and_top_k_union():
    base, pq, pk = causal(2, 16)
    q = np.zeros((2, 1, 4), dtype=np.float32)
    q[:, 0, 0] = -1.0  # earlier keys score higher
    k = one_hot_keys(16)
    m = sparsek_mask(q, k, base, pq, pk, top_k=3, window=2, stride=0)
    # token 0 at position 14: window 13, 14; top 3 of the rest: 0, 1, 2
    assert kept(m, 0) == [0, 1, 2, 13, 14]
    # token 1 at position 15: window 14, 15
    assert kept(m, 1) == [0, 1, 2, 14, 15]


def test_window_keys_are_not_counted_in_top_k():
    base, pq, pk = causal(1, 16)
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 1.0  # later keys score higher: the window keys would win the top-k
    k = one_hot_keys(16)
    m = sparsek_mask(q, k, base, pq, pk, top_k=2, window=3, stride=0)
    assert kept(m, 0) == [11, 12, 13, 14, 15]


def test_stride_keys():
    base, pq, pk = causal(1, 32)
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 1.0
    k = one_hot_keys(32)
    m = sparsek_mask(q, k, base, pq, pk, top_k=1, window=1, stride=8)
    # strided 0, 8, 16, 24; window 31; best remaining: 30
    assert kept(m, 0) == [0, 8, 16, 24, 30, 31]


def test_base_mask_is_never_unmasked():
    # two sequences in one stream: cells 0..7 belong to seq A, 8..15 to seq B (positions 0..7 each)
    n_kv = 16
    pk = np.concatenate([np.arange(8), np.arange(8)])
    base = np.full((2, n_kv), NEG, dtype=np.float32)
    base[0, :8] = 0.0  # token of seq A at position 7
    base[1, 8:] = 0.0  # token of seq B at position 7
    pq = np.array([7, 7])
    q = np.zeros((2, 1, 4), dtype=np.float32)
    q[:, 0, 0] = 1.0
    k = one_hot_keys(n_kv)  # seq B's keys score higher than all of seq A's
    m = sparsek_mask(q, k, base, pq, pk, top_k=3, window=1, stride=4)
    # strided positions 0, 4, window position 7, top 3 of the rest by score
    assert kept(m, 0) == [0, 3, 4, 5, 6, 7]
    assert kept(m, 1) == [8, 11, 12, 13, 14, 15]
    assert np.all(np.isneginf(m[0, 8:])) and np.all(np.isneginf(m[1, :8]))


def test_fewer_candidates_than_top_k():
    base, pq, pk = causal(4, 16)
    base[:, 10:] = NEG  # only keys 0..9 visible
    q = np.ones((4, 1, 4), dtype=np.float32)
    k = one_hot_keys(16)
    m = sparsek_mask(q, k, base, pq, pk, top_k=12, window=2, stride=0)
    for i in range(4):
        assert kept(m, i) == list(range(10))


def test_skip_when_nothing_to_drop():
    base, pq, pk = causal(3, 8)
    q = np.ones((3, 1, 4), dtype=np.float32)
    k = one_hot_keys(8)
    m = sparsek_mask(q, k, base, pq, pk, top_k=6, window=2, stride=0)
    np.testing.assert_array_equal(m, base)
    m = sparsek_mask(q, k, base, pq, pk, top_k=6, window=1, stride=0)
    assert not np.array_equal(np.isfinite(m), np.isfinite(base))


def test_kept_entries_keep_the_base_value():
    # ALiBi-style finite base values survive
    n_kv = 8
    base = -np.abs(np.arange(n_kv, dtype=np.float32) - 7)[None, :]
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 1.0
    k = one_hot_keys(n_kv)
    m = sparsek_mask(q, k, base, np.array([7]), np.arange(n_kv), top_k=2, window=1, stride=0)
    assert kept(m, 0) == [5, 6, 7]
    np.testing.assert_array_equal(m[0, [5, 6, 7]], base[0, [5, 6, 7]])


def test_ties_prefer_lower_index():
    n_kv = 8
    base = np.zeros((1, n_kv), dtype=np.float32)
    q = np.ones((1, 1, 4), dtype=np.float32)
    k = np.ones((n_kv, 1, 4), dtype=np.float32)
    m = sparsek_mask(q, k, base, np.array([7]), np.arange(n_kv), top_k=3, window=1, stride=0)
    assert kept(m, 0) == [0, 1, 2, 7]


def test_forced_cap_with_position_gaps():
    # 8 cells holding positions 0, 4, 8, ..., 28 (gaps): all strided for stride 4,
    # but the cap is window + ceil(8/4) = 1 + 2 = 3, counted in cell order
    n_kv = 8
    pk = np.arange(0, 32, 4)
    base = np.zeros((1, n_kv), dtype=np.float32)
    forced = sparsek_forced(base, np.array([28]), pk, window=1, stride=4)
    assert n_forced_max(n_kv, 1, 4) == 3
    assert list(np.nonzero(forced[0])[0]) == [0, 1, 2]
    assert n_kv_max(n_kv, 2, 1, 4) == 5
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 1.0
    k = one_hot_keys(n_kv)
    m = sparsek_mask(q, k, base, np.array([28]), pk, top_k=2, window=1, stride=4)
    # the window key (cell 7) is past the cap and competes in the top-k, where it wins
    assert kept(m, 0) == [0, 1, 2, 6, 7]
    assert len(kept(m, 0)) <= n_kv_max(n_kv, 2, 1, 4)


def test_n_kv_max_bounds_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n_tokens, n_kv = 8, 64
        top_k, window, stride = rng.integers(1, 8), rng.integers(0, 8), rng.integers(0, 9)
        base, pq, pk = causal(n_tokens, n_kv)
        base[rng.random(base.shape) < 0.2] = NEG
        q = rng.standard_normal((n_tokens, 4, 8)).astype(np.float32)
        k = rng.standard_normal((n_kv, 2, 8)).astype(np.float32)
        m = sparsek_mask(q, k, base, pq, pk, int(top_k), int(window), int(stride))
        assert np.all(
            np.isfinite(m).sum(axis=1) <= n_kv_max(n_kv, int(top_k), int(window), int(stride))
        )
        # never more than the base allows, and every row with an allowed key keeps one
        assert not np.any(np.isfinite(m) & ~np.isfinite(base))
        assert np.all(np.isfinite(m).any(axis=1) == np.isfinite(base).any(axis=1))


def test_compare_kept_tolerates_boundary_ties_only():
    n_kv = 8
    base = np.zeros((1, n_kv), dtype=np.float32)
    q = np.ones((1, 1, 4), dtype=np.float32)
    k = np.ones((n_kv, 1, 4), dtype=np.float32)
    k[0] *= 2.0  # key 0 clearly best, keys 1..6 tie, key 7 forced by the window
    pq, pk = np.array([7]), np.arange(n_kv)
    ref = sparsek_mask(q, k, base, pq, pk, top_k=2, window=1, stride=0)
    assert kept(ref, 0) == [0, 1, 7]
    scores = sparsek_scores(q, k)
    forced = sparsek_forced(base, pq, pk, 1, 0)
    other = ref.copy()
    other[0, 1], other[0, 5] = NEG, 0.0  # another key of the tie
    assert compare_kept(other, ref, scores, base, forced, top_k=2, tol=1e-3) == []
    other = ref.copy()
    other[0, 0], other[0, 5] = NEG, 0.0  # drops the clear winner
    assert compare_kept(other, ref, scores, base, forced, top_k=2, tol=1e-3) == [(0, 0)]


def test_shape_errors():
    base = np.zeros((2, 8), dtype=np.float32)
    with pytest.raises(ValueError):
        sparsek_mask(
            np.zeros((3, 1, 4)), np.zeros((8, 1, 4)), base, np.arange(2), np.arange(8), 2, 1, 0
        )
    with pytest.raises(ValueError):
        sparsek_scores(np.zeros((2, 3, 4)), np.zeros((8, 2, 4)))
