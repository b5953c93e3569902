"""Pure-numpy reference of the SparseK KQ mask that the patched llama.cpp builds for one layer.

It mirrors ``llm_graph_context::build_sparsek_mask`` (src/llama-graph.cpp) together with
``llama_kv_cache::set_input_kq_mask_sparsek`` (src/llama-kv-cache.cpp), for one KV stream.

Shapes are the ggml shapes reversed (numpy row-major order):

    q          (n_tokens, n_head, head_dim)      ggml "Qcur-<il>"  [head_dim, n_head, n_tokens]
    k          (n_kv, n_head_kv, head_dim)       ggml K cache view [head_dim, n_head_kv, n_kv]
    base_mask  (n_tokens, n_kv)                  ggml KQ mask      [n_kv, n_tokens] (0 / -inf)
    positions_q (n_tokens,)                      position of each query token
    positions_k (n_kv,)                          position of each KV cell (unused where base -inf)

Semantics. For the query token at position p the kept keys are the keys its base mask allows
(finite entries) that are in the union of

* the local window: positions p-window+1 .. p,
* the strided keys (stride > 0): positions divisible by stride,
* block_size 1: the ``top_k`` best-scoring remaining keys (allowed and not already forced);
  block_size B > 1: the keys of the ``top_k // B`` best-scoring candidate blocks of B consecutive
  cells (see ``block_scores`` and ``candidate_blocks``), for every ubatch size: a row's selection
  depends only on its query and the keys, not on how many tokens its ubatch holds.

Forced (window/stride) keys are counted per row in cell order and capped at
``n_forced_max = min(n_kv, max(1, window + ceil(n_kv/stride)))`` (no strided term if stride == 0);
the cap only binds with position gaps or repeated positions in a sequence and keeps the
flash-attention ``n_kv_max`` hint (``min(n_kv, top_k + n_forced_max)``) a true bound. Keys past
the cap are ordinary top-k candidates.

The score of key j for query token i is shared by all heads:

    score[i, j] = sum_h q[i, h] . k[j, h // n_gqa]        (n_gqa = n_head // n_head_kv)

computed in the graph as (group-summed q) . k, one mat mul over head_dim*n_head_kv.

A row drops keys only if it could keep less than 20% of the keys its base mask allows
(``uses_sparsek(n_allowed, ...)``, per row since patch 0033); any other row keeps its base mask
row, also in a ubatch whose other rows drop keys. The forced cap and the blocks follow the width
of the graph's KV view (padded to a multiple of 256 by llama.cpp), so pass the whole captured
mask / cache view, not just the used cells.

The returned mask is ``base_mask`` where kept and -inf elsewhere (float32), so a kept key keeps its
base value (0, or the ALiBi bias).

A row without any forced key keeps its first allowed key: llama.cpp pads each row's list of
forced cells with a kept cell (since patch 0033 also with neither window nor stride, as the tokens
that keep all of their keys need the list).

Ties. The graph selects with ggml_top_k (CPU: std::partial_sort, no defined order among equal
scores); this reference breaks ties by the lower cell index. Besides exact ties, the graph's scores
differ from exact ones by rounding: the K cache is f16 (or quantized) and for an f16 cache the CPU
mat mul rounds the group-summed q to f16 too, or both to bf16 on a CPU with AMX, for ubatches of 16
tokens or more (see ``rounding``). A test that compares the kept
sets should therefore only accept differences at the top-k boundary: use ``compare_kept``, which
ignores candidates whose score lies within ``tol`` of the top_k-th best candidate score of the row.

Capturing the inputs from llama.cpp with the eval callback (per layer il, KV-cache models):

* ``Qcur-<il>``: Q after RoPE, f32 [head_dim, n_head, n_tokens] (models name it before build_attn;
  a KV cache with Hadamard rotation (quantized K) rotates q and k by the same orthogonal matrix,
  which leaves the scores unchanged up to rounding).
* ``Kcur-<il>``: K after RoPE for the tokens of the current ubatch; the keys of earlier ubatches
  are the ones captured before (the K cache holds them at cell = position for a single sequence
  started at position 0).
* ``sparsek_q-<il>``: the group-summed q, f32 [head_dim*n_head_kv, n_tokens/n_stream, n_stream].
* ``sparsek_scores-<il>``: the scores, f32 [n_blk, n_tokens/n_stream, 1, n_stream] (n_blk = n_kv
  with block_size 1), -inf at blocks that are not candidates; its src[1] is the candidate input
  ``attn_inp_kq_mask_sk_cand``.
* ``sparsek_top_k-<il>``: the selected blocks, i32
  [top_k/block_size, n_tokens/n_stream, 1, n_stream].
* ``sparsek_mask-<il>``: the final mask (f16 with flash attention, f32 without), same shape as the
  KQ mask.

The SWA layers of iSWA models (e.g. gemma3) keep their own mask and have no sparsek_* tensors.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

# how the CPU mat mul rounds the scores' operands (see sparsek_scores); None: exact
Rounding = Literal["f16", "bf16"] | None


def n_forced_max(n_kv: int, window: int, stride: int) -> int:
    n_strided = (n_kv + stride - 1) // stride if stride > 0 else 0
    return min(n_kv, max(1, window + n_strided))


def n_kv_max(n_kv: int, top_k: int, window: int, stride: int) -> int:
    """The flash-attention hint: an upper bound of the finite entries in every mask row."""
    return min(n_kv, top_k + n_forced_max(n_kv, window, stride))


def uses_sparsek(n_allowed: int, top_k: int, window: int, stride: int) -> bool:
    """False where llama.cpp keeps a row's base mask: it could keep 20% of its keys or more.

    This also leaves more blocks than selected ones (top_k is a multiple of the block size)."""
    return 5 * n_kv_max(n_allowed, top_k, window, stride) < n_allowed


def top_k_at(n_allowed: int, top_k: int, window: int, block_size: int, grow: bool) -> int:
    """The keys a row that allows n_allowed keys keeps by their scores (stride 0): ``top_k``, or
    with ``grow`` past n0 = 5 * (top_k + max(1, window)), the most keys a row keeps all of,
    ``top_k * sqrt(n_allowed / n0)`` rounded down to whole blocks (``SparseK.grow_top_k``)."""
    n0 = 5 * (top_k + max(1, window))
    if not grow or n_allowed <= n0:
        return top_k
    return int(top_k * np.sqrt(n_allowed / n0) / block_size) * block_size


def sparsek_forced(
    base_mask: np.ndarray,
    positions_q: np.ndarray,
    positions_k: np.ndarray,
    window: int,
    stride: int,
) -> np.ndarray:
    """Boolean (n_tokens, n_kv): the window/stride keys each query keeps (within its base mask).

    A row with no such key keeps its first allowed key: llama.cpp pads every row of its forced-key
    list with a kept key.
    """
    allowed = np.isfinite(base_mask)
    p1 = np.asarray(positions_q, dtype=np.int64)[:, None]
    p0 = np.asarray(positions_k, dtype=np.int64)[None, :]
    forced = (p0 <= p1) & (p1 - p0 < window)
    if stride > 0:
        forced = forced | (p0 % stride == 0)
    forced = forced & allowed
    # the per-row cap, counted in cell order
    cap = n_forced_max(base_mask.shape[1], window, stride)
    over = np.cumsum(forced, axis=1) > cap
    res: np.ndarray = forced & ~over
    empty = ~res.any(axis=1) & allowed.any(axis=1)
    res[empty, np.argmax(allowed[empty], axis=1)] = True
    return res


def _group_summed_q(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    n_tokens, n_head, head_dim = q.shape
    _, n_head_kv, head_dim_k = k.shape
    if head_dim != head_dim_k or n_head % n_head_kv != 0:
        raise ValueError(f"incompatible q {q.shape} and k {k.shape}")
    n_gqa = n_head // n_head_kv
    res: np.ndarray = (
        q.astype(np.float32)
        .reshape(n_tokens, n_head_kv, n_gqa, head_dim)
        .sum(axis=2, dtype=np.float32)
        .reshape(n_tokens, n_head_kv * head_dim)
    )
    return res


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even), as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    res: np.ndarray = rounded.view(np.float32)
    return res


def sparsek_scores(
    q: np.ndarray,
    k: np.ndarray,
    rounding: Rounding = None,
) -> np.ndarray:
    """(n_tokens, n_kv) float64 scores sum_h q_h . k_{h // n_gqa}, before any masking.

    rounding: "f16" rounds the group-summed q and k to float16 first, as the CPU mat mul does with
    an f16 K cache; "bf16" rounds k to float16 (the cache) and then both to bfloat16, as a CPU
    with AMX does for 16 tokens or more (the closest emulations of the graph; it still sums
    in a different order).
    """
    qs = _group_summed_q(q, k)
    ks = k.astype(np.float32).reshape(k.shape[0], -1)
    if rounding == "f16":
        qs = qs.astype(np.float16)
        ks = ks.astype(np.float16)
    elif rounding == "bf16":
        qs = to_bf16(qs)
        ks = to_bf16(ks.astype(np.float16).astype(np.float32))
    res: np.ndarray = qs.astype(np.float64) @ ks.astype(np.float64).T
    return res


def summary_scores(
    q: np.ndarray,
    k: np.ndarray,
    block_size: int,
    rounding: Rounding = None,
) -> np.ndarray:
    """(n_tokens, n_kv // block_size) float64 bounds of the block scores from the block
    summaries (``SparseK.summaries``): sum over the channels of the group-summed q of
    max(q_c * max_c, q_c * min_c), max_c and min_c over the keys of the block (as in Quest).

    rounding: "f16" rounds q and the keys to float16 (summaries of an f16 cache are exact);
    "bf16" rounds the keys to float16 (the cache), then the summaries and q to bfloat16, as the
    cache keeps them and the mat mul takes q on a CPU with AMX."""
    qs = _group_summed_q(q, k)
    n_blk = k.shape[0] // block_size
    ks = k.astype(np.float32).reshape(k.shape[0], -1)[: n_blk * block_size]
    ks = ks.astype(np.float16).astype(np.float32) if rounding else ks
    blocks = ks.reshape(n_blk, block_size, -1)
    hi, lo = blocks.max(axis=1), blocks.min(axis=1)
    if rounding == "f16":
        qs = qs.astype(np.float16).astype(np.float32)
    elif rounding == "bf16":
        qs, hi, lo = to_bf16(qs), to_bf16(hi), to_bf16(lo)
    q64 = qs.astype(np.float64)
    res: np.ndarray = (
        np.maximum(q64, 0) @ hi.astype(np.float64).T + np.minimum(q64, 0) @ lo.astype(np.float64).T
    )
    return res


def block_scores(
    q: np.ndarray,
    k: np.ndarray,
    block_size: int,
    rounding: Rounding = None,
    summaries: bool = False,
) -> np.ndarray:
    """(n_tokens, n_kv // block_size) float64 block scores: the best key score of each block of
    block_size consecutive cells (``sparsek_scores`` for block_size 1), or with ``summaries``
    the bound of ``summary_scores``; the cells past the last whole block are in none."""
    if summaries:
        return summary_scores(q, k, block_size, rounding)
    scores = sparsek_scores(q, k, rounding)
    if block_size == 1:
        return scores
    n_blk = k.shape[0] // block_size
    res: np.ndarray = (
        scores[:, : n_blk * block_size].reshape(scores.shape[0], n_blk, block_size).max(axis=2)
    )
    return res


def candidate_blocks(base_mask: np.ndarray, forced: np.ndarray, block_size: int) -> np.ndarray:
    """Boolean (n_tokens, n_blk): the blocks whose keys the base mask all allows and that add at
    least one key to the forced ones (selecting them never unmasks a key)."""
    n_tokens, n_kv = base_mask.shape
    n_blk = n_kv // block_size
    shape = (n_tokens, n_blk, block_size)
    allowed = np.isfinite(base_mask)[:, : n_blk * block_size].reshape(shape)
    new = ~forced[:, : n_blk * block_size].reshape(shape)
    res: np.ndarray = allowed.all(axis=2) & new.any(axis=2)
    return res


def sparsek_mask(
    q: np.ndarray,
    k: np.ndarray,
    base_mask: np.ndarray,
    positions_q: np.ndarray,
    positions_k: np.ndarray,
    top_k: int,
    window: int,
    stride: int,
    rounding: Rounding = None,
    block_size: int = 1,
    summaries: bool = False,
    grow: bool = False,
) -> np.ndarray:
    """The SparseK mask (n_tokens, n_kv) float32 of one layer; see the module doc for shapes.
    With ``grow`` (stride 0 only) each row keeps its own ``top_k_at`` of keys by score."""
    base_mask = np.asarray(base_mask, dtype=np.float32)
    n_tokens, n_kv = base_mask.shape
    if q.shape[0] != n_tokens or k.shape[0] != n_kv:
        raise ValueError(f"q {q.shape} / k {k.shape} do not match base_mask {base_mask.shape}")
    if len(positions_q) != n_tokens or len(positions_k) != n_kv:
        raise ValueError("positions do not match base_mask")
    if top_k <= 0 or block_size <= 0 or top_k % block_size != 0:
        raise ValueError("top_k must be > 0 and a multiple of block_size")

    if grow and stride != 0:
        raise ValueError("the reference grows top_k with stride 0 only")

    allowed = np.isfinite(base_mask).sum(axis=1)
    budget = np.array([top_k_at(int(n), top_k, window, block_size, grow) for n in allowed])
    pairs = zip(allowed, budget, strict=True)
    sparse = np.array([uses_sparsek(int(n), int(b), window, stride) for n, b in pairs], dtype=bool)
    if not sparse.any():
        return base_mask.copy()

    forced = sparsek_forced(base_mask, positions_q, positions_k, window, stride)
    cand = candidate_blocks(base_mask, forced, block_size)
    scores = np.where(cand, block_scores(q, k, block_size, rounding, summaries), -np.inf)

    # the budget / block_size best candidate blocks per row; ties -> lower block index
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :], axis=1)
    picked = rank < (budget // block_size)[:, None]
    # picks beyond the number of candidates land on non-candidates, which keep nothing
    picked &= cand

    kept = forced.copy()
    n_blk = cand.shape[1]
    kept[:, : n_blk * block_size] |= np.repeat(picked, block_size, axis=1)
    kept[~sparse] = True
    return np.where(kept, base_mask, np.float32(-np.inf)).astype(np.float32)


def compare_kept(
    mask: np.ndarray,
    mask_ref: np.ndarray,
    scores: np.ndarray,
    cand: np.ndarray,
    n_top: int | np.ndarray,
    block_size: int,
    tol: float,
) -> list[tuple[int, int]]:
    """(row, key) pairs where two SparseK masks keep different keys and the difference is not a
    selection boundary tie: a mismatch is tolerated only for a key of a candidate block whose score
    is within ``tol`` of the row's n_top-th best candidate score (``scores`` and ``cand`` as from
    ``block_scores`` and ``candidate_blocks``, n_top = top_k // block_size, or per row)."""
    kept = np.isfinite(np.asarray(mask, dtype=np.float32))
    kept_ref = np.isfinite(np.asarray(mask_ref, dtype=np.float32))
    masked = np.where(cand, scores, -np.inf)
    n_tops = np.broadcast_to(n_top, (len(masked),))
    bad = []
    for i, j in zip(*np.nonzero(kept != kept_ref), strict=True):
        b = j // block_size
        row = masked[i]
        n = int(n_tops[i])
        if b < len(row) and np.isfinite(row[b]) and int(np.isfinite(row).sum()) > n:
            kth = np.sort(row)[::-1][n - 1]
            if abs(row[b] - kth) <= tol:
                continue
        bad.append((int(i), int(j)))
    return bad
