"""SparseK in llama.cpp's graph, checked through the binding against independent references.

References: dense attention (the same model with SparseK off), a numpy recomputation of the mask
from the Q and K that llama.cpp itself captured (tests/sparsek_reference.py), and upstream's
llama-perplexity with one sequence per batch vs several.

No test here skips for a library without the graph patch: the binding refuses a library whose
patch series is not the expected one (`_binding.init`), so a missing patch fails loudly.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import sparsek_reference as ref

from llama_sparsek import Llama, SparseK, _binding, gguf, models, tools
from llama_sparsek._binding import LlamaError

N_KV_PAD = 256  # llama.cpp pads the KV view of a unified cache to a multiple of 256 cells


def _graph_names() -> tuple[set[str], Callable[[str, np.ndarray | None], bool]]:
    """An eval callback that records the name of every graph tensor (and fetches none)."""
    seen: set[str] = set()

    def cb(name: str, array: np.ndarray | None) -> bool:
        seen.add(name)
        return False

    return seen, cb


def _system_info() -> str:
    return _binding.c_string(_binding.lib.llama_print_system_info())


def _tokens(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1, *rng.integers(3, 300, size=n - 1).tolist()]


# ---------------------------------------------------------------- dense equivalence


# unit roundoff of bf16 (2**-8) over that of f16 (2**-11)
BF16_OVER_F16 = 8.0


def assert_close_to_dense(
    got: np.ndarray, want: np.ndarray, path: Path, tokens: list[int], opts: dict[str, object]
) -> None:
    """Without flash attention the sparse mask gives the dense logits up to summation order.

    With it, the kernels differ by rounding, amplified through the layers. The measured unit is how
    far the dense flash-attention result is from the dense non-flash one (f16 rounding, 11-bit
    mantissa); the sparse kernel's GEMMs round to bf16 where the CPU has bf16 dot products (8-bit
    mantissa, 8x the unit roundoff), so the bound is 2 x 8 of those units. The kernel itself is
    checked tightly against upstream's reference path by test-backend-ops (test_backend_ops.py).
    """
    if not opts["flash_attn"]:
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
        return
    with Llama(path, **{**opts, "flash_attn": False, "type_v": "f16"}) as plain:  # type: ignore[arg-type]
        noise = float(np.abs(plain.eval(tokens) - want).max())
    assert float(np.abs(got - want).max()) <= 2.0 * BF16_OVER_F16 * noise + 1e-3
    assert (got.argmax(axis=1) == want.argmax(axis=1)).mean() >= 0.9


# a token that sees up to 160 keys keeps them all, the later ones drop keys: one ubatch holds both
# dense_layers 0: the tests look at the masks of the tiny model's first layers
EVERY_KEY = [
    SparseK(top_k=31, window=0, block_size=1, dense_layers=0),  # and its first key
    SparseK(top_k=24, window=8, block_size=8, dense_layers=0),
    # a mask per K head: attention sees each K head with its group of query heads as a stream
    SparseK(top_k=24, window=8, block_size=8, dense_layers=0, per_group=1),
]
EVERY_KEY_IDS = ["keys", "blocks", "per-group"]
N_EVERY_KEY = 160


@pytest.mark.parametrize("settings", EVERY_KEY, ids=EVERY_KEY_IDS)
@pytest.mark.parametrize("flash_attn", [True, False])
@pytest.mark.parametrize("cache", ["f16", "q8_0"])
def test_keeping_every_allowed_key_equals_dense(
    tiny_model: Path, flash_attn: bool, cache: str, settings: SparseK
) -> None:
    """The tokens that keep every allowed key get the dense logits, next to tokens that drop keys
    in the same ubatch."""
    assert not ref.uses_sparsek(N_EVERY_KEY, settings.top_k, settings.window, settings.stride)
    assert ref.uses_sparsek(N_EVERY_KEY + 1, settings.top_k, settings.window, settings.stride)
    tokens = _tokens(200)
    # llama.cpp quantizes the V cache only with flash attention
    opts = {
        "n_ctx": 512,
        "n_threads": 2,
        "flash_attn": flash_attn,
        "type_k": cache,
        "type_v": cache if flash_attn else "f16",
    }
    with Llama(tiny_model, **opts) as dense:  # type: ignore[arg-type]
        want = dense.eval(tokens)
    seen, cb = _graph_names()
    with Llama(tiny_model, sparsek=settings, cb_eval=cb, **opts) as sparse:  # type: ignore[arg-type]
        got = sparse.eval(tokens)
    assert "sparsek_mask-0" in seen  # the SparseK graph ran
    n = N_EVERY_KEY
    assert_close_to_dense(got[:n], want[:n], tiny_model, tokens[:n], opts)
    assert np.abs(got[n:] - want[n:]).max() > 1e-3  # and the later tokens dropped keys


@pytest.mark.parametrize("settings", EVERY_KEY, ids=EVERY_KEY_IDS)
@pytest.mark.parametrize("flash_attn", [True, False])
def test_smollm2_large_k_equals_dense(
    smollm2_path: Path, flash_attn: bool, settings: SparseK
) -> None:
    opts = {"n_ctx": 1024, "n_threads": 2, "flash_attn": flash_attn}
    with Llama(smollm2_path, **opts) as dense:  # type: ignore[arg-type]
        toks = dense.tokenize("The history of the Roman Empire spans many centuries. " * 40)[:200]
        want = dense.eval(toks)
    with Llama(smollm2_path, sparsek=settings, **opts) as sk:  # type: ignore[arg-type]
        got = sk.eval(toks)
    n = N_EVERY_KEY
    assert_close_to_dense(got[:n], want[:n], smollm2_path, toks[:n], opts)


def test_hybrid_model_sets_its_sparsek_inputs(tiny_hybrid_model: Path) -> None:
    """A hybrid model (recurrent layers next to a KV cache) takes SparseK like any other: before
    patch 0032 its selection read unset inputs (logits 21 off, then a set_rows abort)."""
    settings = EVERY_KEY[1]
    tokens = _tokens(200)
    opts = {"n_ctx": 512, "n_threads": 2, "flash_attn": False}  # bit for bit where all keys stay
    with Llama(tiny_hybrid_model, **opts) as dense:  # type: ignore[arg-type]
        want = dense.eval(tokens)
    seen, cb = _graph_names()
    with Llama(tiny_hybrid_model, sparsek=settings, cb_eval=cb, **opts) as sparse:  # type: ignore[arg-type]
        got = sparse.eval(tokens)
    assert "sparsek_mask-1" in seen  # the attention layer ran the SparseK graph
    n = N_EVERY_KEY
    np.testing.assert_array_equal(got[:n], want[:n])
    assert np.abs(got[n:] - want[n:]).max() > 1e-3


def test_default_leaves_short_contexts_dense(smollm2_path: Path) -> None:
    """Where the default would keep 20% of the keys or more, the graph is the dense one: same
    logits bit for bit, no SparseK tensor, so prompts at small depth pay nothing for SparseK."""
    seen, cb = _graph_names()
    opts = {"n_ctx": 4096, "n_threads": 2}
    with Llama(smollm2_path, **opts) as dense:  # type: ignore[arg-type]
        toks = dense.tokenize("A long and winding road leads to the old mill. " * 200)[:2000]
        want = dense.eval(toks)
    with Llama(smollm2_path, sparsek=SparseK(), cb_eval=cb, **opts) as sk:  # type: ignore[arg-type]
        got = sk.eval(toks)
    assert not any(name.startswith("sparsek_") for name in seen)
    assert any(name.startswith("kq") or name.startswith("Qcur") for name in seen)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- the mask, recomputed in numpy


@pytest.mark.parametrize(
    ("top_k", "window", "stride", "block_size", "summaries", "grow", "per_group"),
    [
        (16, 8, 0, 1, 0, 0, 0),
        (8, 4, 32, 1, 0, 0, 0),
        (1, 0, 0, 1, 0, 0, 0),
        (32, 16, 0, 16, 0, 0, 0),
        (16, 16, 0, 16, 0, 0, 0),
        (32, 8, 0, 8, 0, 0, 0),
        (32, 8, 64, 8, 0, 0, 0),
        (32, 8, 0, 8, 1, 0, 0),
        (32, 16, 0, 16, 1, 0, 0),
        # top_k grows from 80 keys on: 8 to 14 single keys, 8 or 12 in blocks of 4
        (8, 8, 0, 1, 0, 1, 0),
        (8, 8, 0, 4, 0, 1, 0),
        (8, 8, 0, 4, 1, 1, 0),
        # a mask per K head, each from the queries of its group only
        (16, 8, 0, 1, 0, 0, 1),
        (32, 8, 0, 8, 0, 0, 1),
        (8, 8, 0, 4, 0, 1, 1),
    ],
)
def test_mask_matches_numpy_reference(
    tiny_model: Path,
    top_k: int,
    window: int,
    stride: int,
    block_size: int,
    summaries: int,
    grow: int,
    per_group: int,
) -> None:
    captured: dict[str, np.ndarray] = {}
    wanted = {"Qcur-0", "Kcur-0", "sparsek_mask-0", "Qcur-1", "Kcur-1", "sparsek_mask-1"}

    def cb(name: str, array: np.ndarray | None) -> bool:
        if array is None:
            return name in wanted
        captured[name] = array
        return True

    n = 250  # up to 48 keys kept: the last tokens drop keys, and the view stays 256 cells
    tokens = _tokens(n, seed=3)
    settings = SparseK(
        top_k=top_k,
        window=window,
        stride=stride,
        block_size=block_size,
        dense_layers=0,
        summaries=summaries,
        grow_top_k=grow,
        per_group=per_group,
    )
    # one ubatch of 16 tokens or more: BF16 scores on a CPU with AMX (patch 0037)
    info = _system_info()
    amx = "AMX_INT8 = 1" in info and "AVX512_BF16 = 1" in info
    rounding: ref.Rounding = "bf16" if amx else "f16"
    with Llama(tiny_model, n_ctx=512, n_threads=2, sparsek=settings, cb_eval=cb) as llm:
        llm.eval(tokens)
    assert wanted <= captured.keys(), sorted(captured)

    positions = np.arange(N_KV_PAD)
    # causal mask of one sequence starting at 0; cells past the prompt are empty
    base = np.where(positions[None, :] <= positions[:n, None], 0.0, -np.inf).astype(np.float32)
    for il in (0, 1):
        q = captured[f"Qcur-{il}"].reshape(n, -1, captured[f"Qcur-{il}"].shape[-1])
        k_new = captured[f"Kcur-{il}"].reshape(n, -1, captured[f"Kcur-{il}"].shape[-1])
        k = np.zeros((N_KV_PAD, *k_new.shape[1:]), dtype=np.float32)
        k[:n] = k_new
        # one mask for all heads, or per K head one from the queries of its group (the reference
        # with that K head alone)
        n_head_kv = k.shape[1]
        n_group = q.shape[1] // n_head_kv
        n_masks = n_head_kv if per_group else 1
        masks = captured[f"sparsek_mask-{il}"].reshape(n_masks, -1, N_KV_PAD)
        assert masks.shape[1] >= n
        for g in range(n_masks):
            heads = slice(g * n_group, (g + 1) * n_group) if per_group else slice(None)
            k_heads = slice(g, g + 1) if per_group else slice(None)
            _check_mask(
                masks[g, :n],
                q[:, heads],
                k[:, k_heads],
                base,
                settings,
                rounding,
                f"layer {il}, mask {g}",
            )


def _check_mask(
    mask: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    base: np.ndarray,
    s: SparseK,
    rounding: ref.Rounding,
    where: str,
) -> None:
    """One captured mask of a prompt that fills the first cells of the view against the numpy
    reference for the queries q and keys k that score it."""
    n = mask.shape[0]
    positions = np.arange(mask.shape[1])
    grow = bool(s.grow_top_k)
    expected = ref.sparsek_mask(
        q,
        k,
        base,
        positions[:n],
        positions,
        s.top_k,
        s.window,
        s.stride,
        rounding,
        s.block_size,
        bool(s.summaries),
        grow,
    )
    scores = ref.block_scores(q, k, s.block_size, rounding, bool(s.summaries))
    forced = ref.sparsek_forced(base, positions[:n], positions, s.window, s.stride)
    cand = ref.candidate_blocks(base, forced, s.block_size)
    allowed = np.arange(1, n + 1)
    budget = np.array(
        [ref.top_k_at(int(a), s.top_k, s.window, s.block_size, grow) for a in allowed]
    )
    # with grow the rows of one ubatch keep more or fewer keys
    assert (len(set(budget)) > 1) == grow
    n_top = budget // s.block_size
    bad = ref.compare_kept(mask, expected, scores, cand, n_top, s.block_size, tol=1e-2)
    assert bad == [], f"{where}: {len(bad)} keys differ, first {bad[:5]}"
    # a row that drops keys keeps at most the n_kv_max hint of its own top_k, any other all
    kept = np.isfinite(mask).sum(axis=1)
    sparse = np.array([ref.uses_sparsek(int(a), s.top_k, s.window, s.stride) for a in allowed])
    assert sparse.any() and not sparse.all()  # the ubatch holds both kinds of rows
    np.testing.assert_array_equal(kept[~sparse], allowed[~sparse])
    hint = [ref.n_kv_max(mask.shape[1], int(b), s.window, s.stride) for b in budget]
    assert (kept[sparse] <= np.array(hint)[sparse]).all()
    assert (kept >= 1).all()  # every query keeps at least one key


# ---------------------------------------------------------------- behaviour on the real model


def test_small_k_changes_output_deterministically(smollm2_path: Path) -> None:
    prompt = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 40
    with Llama(smollm2_path, n_ctx=2048, n_threads=2) as dense:
        toks = dense.tokenize(prompt)
        assert len(toks) > 2 * N_KV_PAD
        want = dense.eval(toks)
    runs = []
    for _ in range(2):
        with Llama(
            smollm2_path, n_ctx=2048, n_threads=2, sparsek=SparseK(top_k=16, window=8, block_size=8)
        ) as sk:
            runs.append(sk.eval(toks))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - want).max() > 1e-2


@pytest.mark.parametrize(("summaries", "grow"), [(0, 0), (1, 0), (0, 1)])
def test_gguf_set_file_is_picked_up(
    smollm2_path: Path, tmp_path: Path, summaries: int, grow: int
) -> None:
    """Settings injected into the file act exactly like the same kv_overrides (with grow, top_k
    grows from 32 to 40 keys in the last of the prompt's tokens)."""
    edited = tmp_path / "smollm2-sparsek.gguf"
    values = {"top_k": 32, "window": 16, "stride": 0, "block_size": 8, "dense_layers": 1}
    values |= {"summaries": summaries, "grow_top_k": grow}
    gguf.set_sparsek(smollm2_path, **values, enable=True, out=edited)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    settings = SparseK(**values)
    with Llama(edited, n_ctx=1024, n_threads=2) as from_file:
        assert from_file.sparsek == settings
        toks = from_file.tokenize(text)
        got = from_file.eval(toks)
    with Llama(smollm2_path, n_ctx=1024, n_threads=2, sparsek=settings) as overridden:
        want = overridden.eval(toks)
    with Llama(smollm2_path, n_ctx=1024, n_threads=2) as dense:
        dense_logits = dense.eval(toks)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - dense_logits).max() > 1e-2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"llama.sparsek.enable": True, "llama.sparsek.top_k": 0}, "top_k 0"),
        ({"llama.sparsek.enable": True, "llama.sparsek.top_k": -5}, "top_k 4294967291"),
        (
            {"llama.sparsek.enable": True, "llama.sparsek.top_k": 8, "llama.sparsek.block_size": 0},
            "block_size 0",
        ),
        (
            {
                "llama.sparsek.enable": True,
                "llama.sparsek.top_k": 24,
                "llama.sparsek.block_size": 16,
            },
            "block_size 16",
        ),
        (
            {
                "llama.sparsek.enable": True,
                "llama.sparsek.top_k": 32,
                "llama.sparsek.window": 8,
                "llama.sparsek.block_size": 16,
            },
            "window 8",
        ),
        (
            {
                "llama.sparsek.enable": True,
                "llama.sparsek.top_k": 32,
                "llama.sparsek.window": 8,
                "llama.sparsek.block_size": 8,
                "llama.sparsek.summaries": 2,
            },
            "summaries 2",
        ),
        (
            {
                "llama.sparsek.enable": True,
                "llama.sparsek.top_k": 32,
                "llama.sparsek.block_size": 1,
                "llama.sparsek.summaries": 1,
            },
            "summaries",
        ),
        (
            {
                "llama.sparsek.enable": True,
                "llama.sparsek.top_k": 32,
                "llama.sparsek.window": 8,
                "llama.sparsek.block_size": 8,
                "llama.sparsek.grow_top_k": 2,
            },
            "grow_top_k 2",
        ),
        (
            {
                "llama.sparsek.enable": True,
                "llama.sparsek.top_k": 32,
                "llama.sparsek.window": 8,
                "llama.sparsek.block_size": 8,
                "llama.sparsek.per_group": 2,
            },
            "per_group 2",
        ),
        (
            {
                "llama.sparsek.enable": True,
                "llama.sparsek.top_k": 32,
                "llama.sparsek.window": 8,
                "llama.sparsek.block_size": 8,
                "llama.sparsek.summaries": 1,
                "llama.sparsek.per_group": 1,
            },
            "per_group with summaries",
        ),
    ],
)
def test_invalid_model_values_fail_the_context(
    tiny_model: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(LlamaError, match=f"could not create a context.*invalid SparseK {message}"):
        Llama(tiny_model, n_ctx=64, n_threads=1, kv_overrides=overrides)  # type: ignore[arg-type]
    # forced off, the same file loads and runs dense
    with Llama(tiny_model, n_ctx=64, n_threads=1, kv_overrides=overrides, sparsek=False) as llm:  # type: ignore[arg-type]
        assert llm.sparsek is None


def _unchecked(**values: int) -> SparseK:
    """SparseK settings that skip the Python checks: what llama.cpp itself refuses."""
    settings = SparseK()
    for name, value in values.items():
        object.__setattr__(settings, name, value)
    return settings


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"top_k": 0}, "top_k 0"),
        ({"top_k": -5}, "top_k -5"),
        ({"window": -2}, "window -2"),
        ({"top_k": 24, "block_size": 16}, "block_size 16"),
        ({"top_k": 32, "window": 8, "block_size": 16}, "window 8"),
        ({"block_size": 0}, "block_size 0"),
        ({"summaries": 3}, "summaries 3"),
        ({"summaries": 1, "block_size": 1}, "summaries"),
        ({"per_group": 2}, "per_group 2"),
        ({"summaries": 1, "per_group": 1}, "per_group with summaries"),
    ],
)
def test_invalid_context_params_fail_the_context(
    tiny_model: Path, values: dict[str, int], message: str
) -> None:
    """llama.cpp checks the context parameters itself, with its reason in the LlamaError."""
    settings = _unchecked(**values)
    with pytest.raises(LlamaError, match=f"could not create a context.*invalid SparseK {message}"):
        Llama(tiny_model, n_ctx=64, n_threads=1, sparsek=settings)


@pytest.mark.parametrize(
    "overrides",
    [
        {"llama.sparsek.enable": 1},
        {"llama.sparsek.top_k": True},
        {"llama.sparsek.window": 1.5},
        {"llama.sparsek.block_size": "8"},
        {"llama.sparsek.topk": 8},
    ],
)
def test_wrong_override_types_are_refused(tiny_model: Path, overrides: dict[str, object]) -> None:
    """llama.cpp would ignore them with a warning and read the file's value instead."""
    with pytest.raises(ValueError, match=r"kv_overrides\[|unknown SparseK key"):
        Llama(tiny_model, n_ctx=64, n_threads=1, kv_overrides=overrides)  # type: ignore[arg-type]


# ---------------------------------------------------------------- context parameters vs the file


def _sparsek_tensors(path: Path, tokens: list[int], **opts: object) -> tuple[np.ndarray, set[str]]:
    """The logits of `tokens` and the SparseK tensors of the graph that computed them."""
    seen, cb = _graph_names()
    with Llama(path, n_ctx=512, n_threads=2, cb_eval=cb, **opts) as llm:  # type: ignore[arg-type]
        logits = llm.eval(tokens)
    return logits, {name for name in seen if name.startswith("sparsek_")}


SMALL = SparseK(top_k=16, window=8, block_size=8, dense_layers=0)


@pytest.fixture(scope="module")
def edited_tiny(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with SMALL written into its file."""
    out = tmp_path_factory.mktemp("edited") / "tiny-sparsek.gguf"
    gguf.set_sparsek(tiny_model, enable=True, **dataclasses.asdict(SMALL), out=out)
    return out


def test_context_params_reach_the_graph(tiny_model: Path) -> None:
    tokens = _tokens(200)
    dense, dense_names = _sparsek_tensors(tiny_model, tokens)
    sparse, sparse_names = _sparsek_tensors(tiny_model, tokens, sparsek=SMALL)
    assert dense_names == set()
    assert {"sparsek_mask-0", "sparsek_mask-1", "sparsek_top_k-0"} <= sparse_names
    assert np.abs(sparse - dense).max() > 1e-2


@pytest.mark.parametrize("cache", ["q8_0", "q4_0"])
def test_quantized_kv_cache(tiny_model: Path, smollm2_path: Path, cache: str) -> None:
    """The mask casts a quantized K to F32: SparseK still drops keys there, and a deep model's graph
    has room for the extra nodes (SmolLM2's 30 layers used to abort the process while the context
    reserved its graph)."""
    tokens = _tokens(200)
    opts = {"type_k": cache, "type_v": cache}
    dense, _ = _sparsek_tensors(tiny_model, tokens, **opts)
    sparse, names = _sparsek_tensors(tiny_model, tokens, sparsek=SMALL, **opts)
    assert {"sparsek_mask-0", "sparsek_mask-1"} <= names
    assert np.isfinite(sparse).all()
    assert np.abs(sparse - dense).max() > 1e-2
    with Llama(smollm2_path, n_ctx=8192, n_threads=2, sparsek=SparseK(), **opts) as llm:  # type: ignore[arg-type]
        assert np.isfinite(llm.eval(list(range(100, 164)))).all()


def test_settings_in_effect(tiny_model: Path, edited_tiny: Path) -> None:
    """Llama.sparsek reports what llama.cpp resolved: the file's keys unless the context
    parameters say otherwise; SparseK() and llama.cpp's defaults are one setting."""
    other = SparseK(top_k=32, window=16, stride=64, block_size=1)
    grown = SparseK(top_k=32, window=16, block_size=8, grow_top_k=1)
    cases = [
        (tiny_model, None, None),
        (tiny_model, True, SparseK()),
        (tiny_model, other, other),
        (tiny_model, grown, grown),
        (edited_tiny, None, SMALL),
        (edited_tiny, True, SMALL),
        (edited_tiny, False, None),
        (edited_tiny, other, other),
    ]
    for path, option, want in cases:
        with Llama(path, n_ctx=64, n_threads=1, sparsek=option) as llm:
            assert llm.sparsek == want, (path.name, option)
            assert llm.arch == "llama"


def test_forced_off_on_an_enabled_file_is_dense(tiny_model: Path, edited_tiny: Path) -> None:
    tokens = _tokens(200)
    want, _ = _sparsek_tensors(tiny_model, tokens)
    from_file, file_names = _sparsek_tensors(edited_tiny, tokens)
    got, names = _sparsek_tensors(edited_tiny, tokens, sparsek=False)
    assert "sparsek_mask-0" in file_names  # the file alone turns it on
    assert names == set()
    np.testing.assert_array_equal(got, want)
    assert np.abs(from_file - want).max() > 1e-2


def test_forced_on_equals_kv_overrides_and_the_edited_file(
    tiny_model: Path, edited_tiny: Path
) -> None:
    """Three ways to the same settings: context parameters, kv_overrides, keys in the file."""
    tokens = _tokens(200)
    by_params, names = _sparsek_tensors(tiny_model, tokens, sparsek=SMALL)
    by_overrides, _ = _sparsek_tensors(tiny_model, tokens, kv_overrides=SMALL.kv_overrides("llama"))
    by_file, _ = _sparsek_tensors(edited_tiny, tokens)
    assert "sparsek_mask-0" in names
    np.testing.assert_array_equal(by_params, by_overrides)
    np.testing.assert_array_equal(by_params, by_file)


@pytest.mark.parametrize("name", list(models.REGISTRY))
def test_registry_model_generates_with_sparsek(registry_model, name: str) -> None:  # type: ignore[no-untyped-def]
    path = registry_model(name)
    prompt = "Write a short story about a robot who learns to paint. " * 50
    settings = SparseK(top_k=32, window=32, block_size=16)
    with Llama(path, n_ctx=2048, n_threads=2, sparsek=settings) as llm:
        assert len(llm.tokenize(prompt)) > 2 * N_KV_PAD  # SparseK really drops keys
        text = llm.generate(prompt, 8)
    assert text.strip()


def _perplexity(model: Path, text: Path, *args: str) -> str:
    """llama-perplexity's final estimate, as printed."""
    cmd = [str(tools.tool_path("llama-perplexity")), "-m", str(model), "-f", str(text)]
    cmd += ["-t", "2", "-fa", "on", *args]  # a later -fa in args wins
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    assert found, proc.stderr[-2000:]
    return found.group(1)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text(
        " ".join(f"Sentence number {i} talks about topic {i % 17}." for i in range(700))
    )
    return text


@pytest.mark.parametrize("block_size", [1, 16])
def test_sequences_in_one_batch_stay_apart(
    smollm2_path: Path, sentences: Path, block_size: int
) -> None:
    """llama-perplexity packs several sequences per batch: the result must not depend on it.

    Exactly so without flash attention. With it, a ubatch that holds tokens that keep all of
    their keys may run the dense kernel where another packing runs the sparse one for the same
    token (the kernels round differently), so the estimates agree to rounding there."""
    sk = ["--sparsek", "on", "--sparsek-window", "16", "--sparsek-top-k", "32"]
    sk += ["--sparsek-block-size", str(block_size)]
    for fa in ("off", "on"):
        common = ["-c", "512", "--chunks", "4", "-fa", fa, *sk]
        one = float(_perplexity(smollm2_path, sentences, "-b", "512", *common))
        four = float(_perplexity(smollm2_path, sentences, "-b", "2048", *common))
        assert four == one if fa == "off" else four == pytest.approx(one, rel=5e-3)


def test_tool_flags_equal_override_kv(smollm2_path: Path, sentences: Path) -> None:
    """--sparsek flags on an unedited file = the same settings as --override-kv; --sparsek off
    on top of overrides that enable it = dense."""
    common = ["-c", "512", "--chunks", "2"]
    flags = ["--sparsek", "on", "--sparsek-top-k", "32", "--sparsek-window", "16"]
    flags += ["--sparsek-stride", "0", "--sparsek-block-size", "8"]
    overrides = []
    for key, value in SparseK(top_k=32, window=16, block_size=8).kv_overrides("llama").items():
        typed = f"bool:{str(value).lower()}" if isinstance(value, bool) else f"int:{value}"
        overrides += ["--override-kv", f"{key}={typed}"]
    dense = _perplexity(smollm2_path, sentences, *common)
    by_flags = _perplexity(smollm2_path, sentences, *common, *flags)
    assert by_flags == _perplexity(smollm2_path, sentences, *common, *overrides)
    assert by_flags != dense
    assert _perplexity(smollm2_path, sentences, *common, *overrides, "--sparsek", "off") == dense


def test_llama_bench_grid_of_sparsek_settings(tiny_model: Path) -> None:
    """llama-bench --sparsek 0,1 runs both, and reports the settings each context resolved."""
    cmd = [str(tools.tool_path("llama-bench")), "-m", str(tiny_model), "-p", "64", "-n", "0"]
    cmd += ["-r", "1", "-t", "2", "--sparsek", "0,1", "--sparsek-top-k", "16,32"]
    cmd += ["--sparsek-window", "8", "--sparsek-block-size", "8"]
    proc = subprocess.run([*cmd, "-o", "json"], text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [
        (r["sparsek"], r["sparsek_top_k"], r["sparsek_window"], r["sparsek_block_size"])
        for r in json.loads(proc.stdout)
    ]
    assert got == [(False, 0, 0, 0), (False, 0, 0, 0), (True, 16, 8, 8), (True, 32, 8, 8)]
    proc = subprocess.run([*cmd, "-o", "md"], text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header = next(line for line in proc.stdout.splitlines() if "t/s" in line)
    assert [c.strip() for c in header.split("|")][-7:-3] == [
        "sk",
        "sk_top_k",
        "sk_window",
        "sk_block",
    ]


def test_tools_refuse_invalid_settings(tiny_model: Path, sentences: Path) -> None:
    cmd = [str(tools.tool_path("llama-perplexity")), "-m", str(tiny_model), "-f", str(sentences)]
    cmd += ["-c", "128", "--chunks", "1", "--sparsek", "on", "--sparsek-top-k", "24"]
    cmd += ["--sparsek-block-size", "16"]
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=300)
    assert proc.returncode != 0
    assert "invalid SparseK block_size 16" in proc.stderr
    proc = subprocess.run([*cmd[:5], "--sparsek", "maybe"], text=True, capture_output=True)
    assert proc.returncode != 0
    assert "--sparsek" in proc.stderr
