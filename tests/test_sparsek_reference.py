"""Tests of the numpy SparseK mask reference on small hand-made inputs (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
from sparsek_reference import (
    block_scores,
    candidate_blocks,
    compare_kept,
    n_forced_max,
    n_kv_max,
    sparsek_forced,
    sparsek_mask,
    sparsek_scores,
    uses_sparsek,
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
    n_kv = 16
    base = np.zeros((1, n_kv), dtype=np.float32)
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 1.0
    k = one_hot_keys(n_kv)
    k[2, 0, 0] = 100.0  # key 2 scores best
    m = sparsek_mask(q, k, base, np.array([15]), np.arange(n_kv), top_k=2, window=0, stride=0)
    assert kept(m, 0) == [0, 2, 15]  # the first key stands in for the forced ones


def test_negative_scores_and_head_sharing():
    # two heads attend to the same KV head, they disagree: the sum decides
    n_kv = 11
    base = np.zeros((1, n_kv), dtype=np.float32)
    q = np.zeros((1, 2, 2), dtype=np.float32)
    q[0, 0] = [1.0, 0.0]
    q[0, 1] = [0.0, 1.0]
    k = np.zeros((n_kv, 1, 2), dtype=np.float32)
    k[:2, 0, 0] = [5, -1]
    k[:2, 0, 1] = [-6, 3]  # key 0: 5 - 6 = -1, key 1: -1 + 3 = 2, others 0
    m = sparsek_mask(q, k, base, np.array([10]), np.arange(n_kv), top_k=1, window=0, stride=0)
    assert kept(m, 0) == [0, 1]  # key 0 as the first key, key 1 as the best of the others


def test_window_and_top_k_union():
    base, pq, pk = causal(2, 32)
    q = np.zeros((2, 1, 4), dtype=np.float32)
    q[:, 0, 0] = -1.0  # earlier keys score higher
    k = one_hot_keys(32)
    m = sparsek_mask(q, k, base, pq, pk, top_k=3, window=2, stride=0)
    # token 0 at position 30: window 29, 30; top 3 of the rest: 0, 1, 2
    assert kept(m, 0) == [0, 1, 2, 29, 30]
    # token 1 at position 31: window 30, 31
    assert kept(m, 1) == [0, 1, 2, 30, 31]


def test_window_keys_are_not_counted_in_top_k():
    base, pq, pk = causal(1, 32)
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 1.0  # later keys score higher: the window keys would win the top-k
    k = one_hot_keys(32)
    m = sparsek_mask(q, k, base, pq, pk, top_k=2, window=3, stride=0)
    assert kept(m, 0) == [27, 28, 29, 30, 31]


def test_stride_keys():
    base, pq, pk = causal(1, 32)
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 1.0
    k = one_hot_keys(32)
    m = sparsek_mask(q, k, base, pq, pk, top_k=1, window=1, stride=8)
    # strided 0, 8, 16, 24; window 31; best remaining: 30
    assert kept(m, 0) == [0, 8, 16, 24, 30, 31]


def test_base_mask_is_never_unmasked():
    # two sequences in one stream: cells 0..63 belong to seq A, 64..127 to seq B (positions 0..63
    # each), cells 128..159 are empty; each token sees 64 keys, of which it keeps at most 12
    n_kv = 160
    pk = np.concatenate([np.arange(64), np.arange(64), np.arange(32)])
    base = np.full((2, n_kv), NEG, dtype=np.float32)
    base[0, :64] = 0.0  # token of seq A at position 63
    base[1, 64:128] = 0.0  # token of seq B at position 63
    pq = np.array([63, 63])
    q = np.zeros((2, 1, 4), dtype=np.float32)
    q[:, 0, 0] = 1.0
    k = one_hot_keys(n_kv)  # seq B's keys score higher than all of seq A's
    assert uses_sparsek(64, 3, 1, 8)
    m = sparsek_mask(q, k, base, pq, pk, top_k=3, window=1, stride=8)
    # strided positions 0, 8, ..., 56, window position 63, top 3 of the rest by score
    strided = list(range(0, 64, 8))
    assert kept(m, 0) == [*strided, 60, 61, 62, 63]
    assert kept(m, 1) == [64 + j for j in [*strided, 60, 61, 62, 63]]
    assert np.all(np.isneginf(m[0, 64:])) and np.all(np.isneginf(m[1, :64]))


def test_fewer_candidates_than_top_k():
    base, pq, pk = causal(4, 64)
    base[:, 10:] = NEG  # only keys 0..9 visible
    q = np.ones((4, 1, 4), dtype=np.float32)
    k = one_hot_keys(64)
    m = sparsek_mask(q, k, base, pq, pk, top_k=12, window=2, stride=0)
    for i in range(4):
        assert kept(m, i) == list(range(10))


def test_skip_unless_most_keys_are_dropped():
    base, pq, pk = causal(3, 16)
    q = np.ones((3, 1, 4), dtype=np.float32)
    k = one_hot_keys(16)
    # up to top_k + window = 5 of 14-16 keys kept: not less than 20%, the base mask stays
    assert not uses_sparsek(16, 3, 2, 0)
    m = sparsek_mask(q, k, base, pq, pk, top_k=3, window=2, stride=0)
    np.testing.assert_array_equal(m, base)
    assert uses_sparsek(14, 1, 1, 0)
    m = sparsek_mask(q, k, base, pq, pk, top_k=1, window=1, stride=0)
    assert not np.array_equal(np.isfinite(m), np.isfinite(base))
    # strided keys count: with stride 2, 16 of 32 cells are forced
    assert uses_sparsek(32, 4, 2, 0)
    assert not uses_sparsek(32, 4, 2, 2)


def test_kept_entries_keep_the_base_value():
    # ALiBi-style finite base values survive
    n_kv = 16
    base = -np.abs(np.arange(n_kv, dtype=np.float32) - 15)[None, :]
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 1.0
    k = one_hot_keys(n_kv)
    m = sparsek_mask(q, k, base, np.array([15]), np.arange(n_kv), top_k=2, window=1, stride=0)
    assert kept(m, 0) == [13, 14, 15]
    np.testing.assert_array_equal(m[0, [13, 14, 15]], base[0, [13, 14, 15]])


def test_ties_prefer_lower_index():
    n_kv = 24
    base = np.zeros((1, n_kv), dtype=np.float32)
    q = np.ones((1, 1, 4), dtype=np.float32)
    k = np.ones((n_kv, 1, 4), dtype=np.float32)
    m = sparsek_mask(q, k, base, np.array([23]), np.arange(n_kv), top_k=3, window=1, stride=0)
    assert kept(m, 0) == [0, 1, 2, 23]


def test_forced_cap_with_position_gaps():
    # 64 cells holding positions 0, 8, 16, ..., 504 (gaps): all strided for stride 8,
    # but the cap is window + ceil(64/8) = 1 + 8 = 9, counted in cell order
    n_kv = 64
    pk = np.arange(0, 512, 8)
    base = np.zeros((1, n_kv), dtype=np.float32)
    forced = sparsek_forced(base, np.array([504]), pk, window=1, stride=8)
    assert n_forced_max(n_kv, 1, 8) == 9
    assert list(np.nonzero(forced[0])[0]) == list(range(9))
    assert n_kv_max(n_kv, 2, 1, 8) == 11
    q = np.zeros((1, 1, 4), dtype=np.float32)
    q[0, 0, 0] = 1.0
    k = one_hot_keys(n_kv)
    m = sparsek_mask(q, k, base, np.array([504]), pk, top_k=2, window=1, stride=8)
    # the window key (cell 63) is past the cap and competes in the top-k, where it wins
    assert kept(m, 0) == [*range(9), 62, 63]
    assert len(kept(m, 0)) <= n_kv_max(n_kv, 2, 1, 8)


def _check_rows(m: np.ndarray, base: np.ndarray, top_k: int, window: int, stride: int) -> None:
    """A row that would keep 20% of its keys or more is its base row; the others keep at most
    the n_kv_max hint of the view."""
    for row, base_row in zip(m, base, strict=True):
        if uses_sparsek(int(np.isfinite(base_row).sum()), top_k, window, stride):
            assert np.isfinite(row).sum() <= n_kv_max(len(row), top_k, window, stride)
        else:
            np.testing.assert_array_equal(row, base_row)


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
        _check_rows(m, base, int(top_k), int(window), int(stride))
        # never more than the base allows, and every row with an allowed key keeps one
        assert not np.any(np.isfinite(m) & ~np.isfinite(base))
        assert np.all(np.isfinite(m).any(axis=1) == np.isfinite(base).any(axis=1))


def test_compare_kept_tolerates_boundary_ties_only():
    n_kv = 16
    base = np.zeros((1, n_kv), dtype=np.float32)
    q = np.ones((1, 1, 4), dtype=np.float32)
    k = np.ones((n_kv, 1, 4), dtype=np.float32)
    k[0] *= 2.0  # key 0 clearly best, keys 1..14 tie, key 15 forced by the window
    pq, pk = np.array([15]), np.arange(n_kv)
    ref = sparsek_mask(q, k, base, pq, pk, top_k=2, window=1, stride=0)
    assert kept(ref, 0) == [0, 1, 15]
    scores = sparsek_scores(q, k)
    cand = candidate_blocks(base, sparsek_forced(base, pq, pk, 1, 0), 1)
    other = ref.copy()
    other[0, 1], other[0, 5] = NEG, 0.0  # another key of the tie
    assert compare_kept(other, ref, scores, cand, 2, 1, tol=1e-3) == []
    other = ref.copy()
    other[0, 0], other[0, 5] = NEG, 0.0  # drops the clear winner
    assert compare_kept(other, ref, scores, cand, 2, 1, tol=1e-3) == [(0, 0)]


# ---------------------------------------------------------------- blocks


def test_block_score_is_the_best_key_score():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((5, 4, 8)).astype(np.float32)
    k = rng.standard_normal((70, 2, 8)).astype(np.float32)
    keys = sparsek_scores(q, k)
    np.testing.assert_allclose(block_scores(q, k, 1), keys)
    blocks = block_scores(q, k, 16)
    assert blocks.shape == (5, 4)  # 70 // 16: the last 6 cells are in no block
    for b in range(4):
        np.testing.assert_allclose(blocks[:, b], keys[:, 16 * b : 16 * b + 16].max(axis=1))


def test_block_score_by_hand():
    # q = (1, -1): the keys score 3 and -6 + ... : (-2, 4) -> -6, (3, 1) -> 2
    q = np.array([[[1.0, -1.0]]], dtype=np.float32)
    k = np.array([[[-2.0, 4.0]], [[3.0, 1.0]]], dtype=np.float32)
    np.testing.assert_allclose(block_scores(q, k, 2), [[2.0]])


def test_candidate_blocks_are_fully_allowed_and_add_a_key():
    base, pq, pk = causal(1, 16)  # token at position 15: every cell allowed
    base[0, 5] = NEG  # block 1 (cells 4..7) is partly masked
    forced = sparsek_forced(base, pq, pk, window=4, stride=0)  # cells 12..15: block 3
    assert candidate_blocks(base, forced, 4).tolist() == [[True, False, True, False]]


def test_blocks_are_selected_whole():
    n_kv, block = 128, 4
    base, pq, pk = causal(64, n_kv)
    q = np.zeros((64, 1, 4), dtype=np.float32)
    q[:, 0, 0] = 1.0
    k = np.zeros((n_kv, 1, 4), dtype=np.float32)
    k[9, 0, 0] = 50.0  # block 2 (cells 8..11) has the best key
    k[20, 0, 0] = 40.0  # block 5 (cells 20..23) the second best
    m = sparsek_mask(q, k, base, pq, pk, top_k=8, window=4, stride=0, block_size=block)
    assert kept(m, 63) == [8, 9, 10, 11, 20, 21, 22, 23, 124, 125, 126, 127]


def test_blocks_never_unmask():
    # the diagonal block of a causal mask is partly in the future: never selected, the window
    # keeps its allowed keys
    base, pq, pk = causal(4, 32)
    pq = pq - 2  # tokens at positions 26..29: cells 30, 31 are future for all
    base = np.where(pk[None, :] <= pq[:, None], 0.0, NEG).astype(np.float32)
    rng = np.random.default_rng(4)
    q = rng.standard_normal((4, 2, 4)).astype(np.float32)
    k = rng.standard_normal((32, 1, 4)).astype(np.float32)
    k[28:] *= 100.0  # the diagonal block scores best
    m = sparsek_mask(q, k, base, pq, pk, top_k=8, window=2, stride=0, block_size=4)
    assert not np.any(np.isfinite(m) & ~np.isfinite(base))
    assert [kept(m, i)[-2:] for i in range(4)] == [[25, 26], [26, 27], [27, 28], [28, 29]]


def test_row_without_forced_keys_keeps_its_first_allowed_key():
    # stride 8 but the allowed cells 9..15 hold no multiple of 8 and the window is 0
    base, pq, pk = causal(1, 16)
    base[0, :9] = NEG
    forced = sparsek_forced(base, pq, pk, window=0, stride=8)
    assert np.nonzero(forced[0])[0].tolist() == [9]
    # so does a row with neither window nor stride
    forced = sparsek_forced(base, pq, pk, window=0, stride=0)
    assert np.nonzero(forced[0])[0].tolist() == [9]


def test_n_kv_max_bounds_random_block_masks():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n_tokens, n_kv = 8, 96
        block = int(rng.choice([2, 4, 8, 16]))
        top_k = block * int(rng.integers(1, 4))
        window, stride = int(rng.integers(0, 8)), int(rng.integers(0, 9))
        base, pq, pk = causal(n_tokens, n_kv)
        base[rng.random(base.shape) < 0.05] = NEG
        q = rng.standard_normal((n_tokens, 4, 8)).astype(np.float32)
        k = rng.standard_normal((n_kv, 2, 8)).astype(np.float32)
        m = sparsek_mask(q, k, base, pq, pk, top_k, window, stride, block_size=block)
        _check_rows(m, base, top_k, window, stride)
        assert not np.any(np.isfinite(m) & ~np.isfinite(base))
        if window > 0 or stride > 0:
            assert np.all(np.isfinite(m).any(axis=1) == np.isfinite(base).any(axis=1))


def test_selection_does_not_depend_on_the_ubatch():
    """A row decoded alone keeps the same keys as inside a 64-token ubatch."""
    n_kv = 256
    base, pq, pk = causal(64, n_kv)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((64, 2, 8)).astype(np.float32)
    k = rng.standard_normal((n_kv, 1, 8)).astype(np.float32)
    batch = sparsek_mask(q, k, base, pq, pk, 32, 16, 0, block_size=16)
    for i in (0, 31, 63):
        alone = sparsek_mask(
            q[i : i + 1], k, base[i : i + 1], pq[i : i + 1], pk, 32, 16, 0, block_size=16
        )
        np.testing.assert_array_equal(alone[0], batch[i])
    starts = np.nonzero(np.isfinite(batch[-1, : n_kv - 16]))[0]
    assert len(starts) == 32 and np.all(starts.reshape(2, 16) % 16 == np.arange(16))


def test_block_size_must_divide_top_k():
    base = np.zeros((1, 8), dtype=np.float32)
    with pytest.raises(ValueError):
        sparsek_mask(
            np.zeros((1, 1, 4)),
            np.zeros((8, 1, 4)),
            base,
            np.arange(1),
            np.arange(8),
            6,
            1,
            0,
            block_size=4,
        )


def test_shape_errors():
    base = np.zeros((2, 8), dtype=np.float32)
    with pytest.raises(ValueError):
        sparsek_mask(
            np.zeros((3, 1, 4)), np.zeros((8, 1, 4)), base, np.arange(2), np.arange(8), 2, 1, 0
        )
    with pytest.raises(ValueError):
        sparsek_scores(np.zeros((2, 3, 4)), np.zeros((8, 2, 4)))
