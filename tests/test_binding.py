"""The cffi binding and the Llama API on a tiny random-weight model."""

from __future__ import annotations

import gc
import logging
import resource
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import llama_sparsek
from llama_sparsek import Llama, SparseK
from llama_sparsek import _ffi_build as ffi_build
from llama_sparsek._binding import LlamaError

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor" / "llama.cpp"


# ---------------------------------------------------------------- declarations vs llama.h


def _compile_checks(tmp_path: Path, functions: str) -> subprocess.CompletedProcess[str]:
    """Compile the signature checks of `functions` against the vendored headers."""
    saved = ffi_build.FUNCTIONS
    ffi_build.FUNCTIONS = functions
    try:
        source = '#include "llama.h"\n#include "ggml-backend.h"\n' + ffi_build.signature_checks()
    finally:
        ffi_build.FUNCTIONS = saved
    c_file = tmp_path / "check.c"
    c_file.write_text(source + "\n")
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None
    cmd = [
        cc,
        "-fsyntax-only",
        f"-I{VENDOR / 'include'}",
        f"-I{VENDOR / 'ggml' / 'include'}",
        str(c_file),
    ]
    return subprocess.run(cmd, text=True, capture_output=True)


@pytest.mark.skipif(not (VENDOR / "include" / "llama.h").exists(), reason="no vendored tree")
def test_declarations_match_vendored_header(tmp_path: Path) -> None:
    proc = _compile_checks(tmp_path, ffi_build.FUNCTIONS)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not (VENDOR / "include" / "llama.h").exists(), reason="no vendored tree")
@pytest.mark.parametrize(
    ("original", "drifted"),
    [
        (
            "int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);",
            "int64_t llama_decode(struct llama_context * ctx, struct llama_batch batch);",
        ),
        (
            "struct llama_sampler * llama_sampler_init_top_k(int32_t k);",
            "struct llama_sampler * llama_sampler_init_top_k(int64_t k);",
        ),
        (
            "void llama_memory_clear(llama_memory_t mem, bool data);",
            "void llama_memory_clear(llama_memory_t mem);",
        ),
    ],
)
def test_signature_drift_fails_the_build(tmp_path: Path, original: str, drifted: str) -> None:
    assert original in ffi_build.FUNCTIONS
    proc = _compile_checks(tmp_path, ffi_build.FUNCTIONS.replace(original, drifted))
    assert proc.returncode != 0
    # the signature check itself fails, not some other error in the generated C
    assert "declaration differs from llama.h" in proc.stderr, proc.stderr


def test_every_declared_function_is_exported() -> None:
    from llama_sparsek._binding import lib

    for name in ffi_build.function_names():
        assert callable(getattr(lib, name)), name


# ---------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Llama:
    with Llama(tiny_model, n_ctx=512, n_threads=2, seed=1) as model:
        yield model


def test_tokenize_detokenize_round_trip(llm: Llama) -> None:
    text = "hello, the world is a test."
    tokens = llm.tokenize(text)
    assert tokens[0] == 1  # BOS added
    assert all(0 <= t < llm.n_vocab for t in tokens)
    assert llm.detokenize(tokens[1:]).strip() == text


def test_logprobs_are_log_softmax_of_eval(llm: Llama) -> None:
    tokens = llm.tokenize("the quick brown fox")
    logits = llm.eval(tokens).astype(np.float64)
    assert logits.shape == (len(tokens), llm.n_vocab)
    lp = llm.logprobs(tokens)
    z = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
    ref = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(lp, ref[np.arange(len(tokens) - 1), tokens[1:]], rtol=1e-6)


def test_eval_in_chunks_matches_one_batch(tiny_model: Path) -> None:
    tokens = list(range(3, 3 + 100))
    with (
        Llama(tiny_model, n_ctx=256, n_batch=128, n_threads=2) as one,
        Llama(tiny_model, n_ctx=256, n_batch=32, n_ubatch=32, n_threads=2) as chunked,
    ):
        # different batch shapes take different matmul paths (f16 rounding): a chunking bug (wrong
        # positions, lost KV) would move logits by O(1), far beyond this tolerance
        a, b = one.eval(tokens), chunked.eval(tokens)
        np.testing.assert_allclose(a, b, atol=0.05)
        assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() > 0.95


def test_greedy_generation_follows_argmax(llm: Llama) -> None:
    """Greedy stream == repeatedly taking the argmax of a full re-evaluation (independent path)."""
    prompt = "the and of"
    text = llm.generate(prompt, 12, temperature=0.0)
    tokens = llm.tokenize(prompt)
    generated: list[int] = []
    for _ in range(12):
        nxt = int(np.argmax(llm.eval(tokens + generated)[-1]))
        if nxt == 2:  # EOS
            break
        generated.append(nxt)
    expected = b"".join(llm.token_bytes(t) for t in generated).decode("utf-8", errors="replace")
    assert text == expected


def test_sampling_is_reproducible_with_a_seed(llm: Llama) -> None:
    a = llm.generate("the", 16, temperature=1.0, seed=7)
    b = llm.generate("the", 16, temperature=1.0, seed=7)
    assert a == b


def test_stream_pieces_join_to_generate(llm: Llama) -> None:
    pieces = list(llm.stream("it is", 10))
    assert "".join(pieces) == llm.generate("it is", 10)


def test_stop_string_truncates(llm: Llama) -> None:
    full = llm.generate("the", 20)
    assert len(full) >= 4, full  # the model is fixed: enough text to cut, or a real failure
    stop = full[2:4]
    cut = llm.generate("the", 20, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_cb_eval_captures_tensors(tiny_model: Path) -> None:
    seen: dict[str, np.ndarray] = {}

    def cb(name: str, array: np.ndarray | None) -> bool:
        if array is None:
            return name == "attn_norm-0"
        seen[name] = array
        return True

    with Llama(tiny_model, n_ctx=128, n_threads=2, cb_eval=cb) as model:
        tokens = model.tokenize("the and")
        model.eval(tokens)
    assert seen["attn_norm-0"].shape[-2:] == (len(tokens), 128)
    assert np.isfinite(seen["attn_norm-0"]).all()


def test_log_goes_through_python_logging(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="llama_sparsek.llama_cpp"),
        Llama(tiny_model, n_ctx=128, n_threads=1),
    ):
        pass
    assert any("llama" in r.getMessage() for r in caplog.records)


def test_repeated_load_close_does_not_leak(tiny_model: Path) -> None:
    def cycle() -> None:
        with Llama(tiny_model, n_ctx=256, n_threads=1) as m:
            m.generate("the", 4)

    for _ in range(3):
        cycle()
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(15):
        cycle()
    gc.collect()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after - before < 32 * 1024  # KiB: a leaked model or context would be larger


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf"):
        Llama(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model" * 10)
    with pytest.raises(LlamaError, match=r"could not load .*bad\.gguf"):
        Llama(bad)


def test_truncated_gguf_is_an_exception(tiny_model: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = tiny_model.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LlamaError, match="could not load"):
        Llama(cut)


def test_load_reads_no_header_in_python(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp alone reads the file: the Python GGUF reader is not involved in a load."""
    from llama_sparsek import gguf

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Llama() parsed the GGUF header in Python")

    monkeypatch.setattr(gguf, "read_metadata", refuse)
    with Llama(tiny_model, n_ctx=64, n_threads=1, sparsek=SparseK(16, 8, block_size=8)) as llm:
        assert llm.arch == "llama"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_ctx": 0},
        {"n_threads": -1},
        {"n_batch": 0},
        {"type_k": "q9"},
        {"kv_overrides": {"llama.sparsek.enable": 1}},
        {"kv_overrides": {"llama.sparsek.top_k": False}},
        {"kv_overrides": {"x" * 200: 1}},
        {"kv_overrides": {"a.b": [1]}},
        {"seed": -1},
    ],
)
def test_invalid_options_raise_before_loading(tiny_model: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Llama(tiny_model, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 0},
        {"window": -1},
        {"stride": -2},
        {"top_k": 2**29},
        {"summaries": 2},
        {"summaries": -1},
        {"summaries": 1, "block_size": 1},
        {"grow_top_k": 2},
        {"grow_top_k": -1},
        {"per_group": 2},
        {"per_group": -1},
        {"per_group": 1, "summaries": 1},
    ],
)
def test_invalid_sparsek_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SparseK(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"top_k": 1.5}, {"top_k": True}, {"window": "8"}, {"block_size": None}, {"stride": 2.0}],
)
def test_sparsek_values_of_the_wrong_type_are_type_errors(kwargs: dict[str, object]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=f"SparseK {name} must be an int"):
        SparseK(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_ctx": "512"}, "n_ctx"),
        ({"n_ctx": None}, "n_ctx"),
        ({"n_batch": 64.0}, "n_batch"),
        ({"n_threads": True}, "n_threads"),
        ({"type_k": 8}, "type_k"),
        ({"sparsek": 5}, "sparsek"),
        ({"sparsek": "on"}, "sparsek"),
        ({"flash_attn": "yes"}, "flash_attn"),
        ({"seed": "1"}, "seed"),
        ({"cb_eval": 5}, "cb_eval"),
    ],
)
def test_llama_arguments_of_the_wrong_type_are_type_errors(
    tmp_path: Path, kwargs: dict[str, object], name: str
) -> None:
    """Refused before the file is even looked at (it does not exist here)."""
    with pytest.raises(TypeError, match=name):
        Llama(tmp_path / "missing.gguf", **kwargs)  # type: ignore[arg-type]


def test_invalid_generation_options(llm: Llama) -> None:
    for kwargs in ({"temperature": -1.0}, {"top_p": 0.0}, {"min_p": 2.0}, {"stop": [""]}):
        with pytest.raises(ValueError):
            llm.generate("the", 4, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        llm.generate("the", 0)
    with pytest.raises(ValueError):
        llm.detokenize([10**6])


def test_generation_arguments_of_the_wrong_type_are_type_errors(
    llm: Llama, tiny_model: Path
) -> None:
    calls: list[tuple[Callable[..., object], tuple[object, ...], dict[str, object]]] = [
        (llm.generate, (b"the", 4), {}),
        (llm.generate, ("the", "4"), {}),
        (llm.generate, ("the", 4.0), {}),
        (llm.generate, ("the", 4), {"top_k": 1.5}),
        (llm.generate, ("the", 4), {"temperature": "0.5"}),
        (llm.generate, ("the", 4), {"stop": "abc"}),
        (llm.generate, ("the", 4), {"stop": [1]}),
        (llm.generate, ("the", 4), {"sampling": {"top_k": 5}}),
        (llm.tokenize, (None,), {}),
        (llm.eval, (["the"],), {}),
        (llm.eval, ([1, 2.5],), {}),
        (llm.detokenize, ("abc",), {}),
        (llama_sparsek.generate, (5, tiny_model), {"max_tokens": 2}),
        (llama_sparsek.generate, ("the", tiny_model), {"sparsek": "on"}),
    ]
    for function, args, kwargs in calls:
        with pytest.raises(TypeError):
            function(*args, **kwargs)
    assert llm.tokenize("the")  # no refused call left the Llama busy


def test_failed_load_carries_llama_cpp_reason(tiny_model: Path) -> None:
    # 9 layers declared, 2 in the file: llama.cpp fails the load; its reason reaches Python
    with pytest.raises(LlamaError, match=r"could not load.*blk\.2"):
        Llama(tiny_model, kv_overrides={"llama.block_count": 9})


def test_errors_are_per_thread_and_errors_only() -> None:
    """A failure reports the ERROR lines its own thread logged since its call began: not the
    warnings, not another thread's errors, not an earlier call's."""
    from llama_sparsek import _binding
    from llama_sparsek._binding import lib

    def log(level: int, text: str) -> None:
        _binding._log_state.feed(level, text)

    _binding.clear_errors()
    log(lib.GGML_LOG_LEVEL_ERROR, "an earlier call's error\n")
    _binding.clear_errors()  # a new call starts
    log(lib.GGML_LOG_LEVEL_WARN, "just a warning\n")
    log(lib.GGML_LOG_LEVEL_ERROR, "the reason, ")
    log(lib.GGML_LOG_LEVEL_CONT, "in two pieces\n")
    other = threading.Thread(target=log, args=(lib.GGML_LOG_LEVEL_ERROR, "another thread\n"))
    other.start()
    other.join()
    err = _binding.fail("the call failed")
    assert str(err) == "the call failed: the reason, in two pieces"
    assert str(_binding.fail("again")) == "again"  # taken once


def test_concurrent_failures_keep_their_own_reasons(tiny_model: Path) -> None:
    """Two threads fail at once with different reasons; each exception carries its own."""
    messages: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def fail_with(name: str, settings: SparseK) -> None:
        barrier.wait()
        for _ in range(5):
            try:
                Llama(tiny_model, n_ctx=64, n_threads=1, sparsek=settings)
            except LlamaError as e:
                messages[name] = str(e)

    bad_top_k, bad_window = SparseK(), SparseK()
    object.__setattr__(bad_top_k, "top_k", 0)
    object.__setattr__(bad_window, "window", 4)
    threads = [
        threading.Thread(target=fail_with, args=("top_k", bad_top_k)),
        threading.Thread(target=fail_with, args=("window", bad_window)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "invalid SparseK top_k 0" in messages["top_k"]
    assert "invalid SparseK window" not in messages["top_k"]
    assert "invalid SparseK window 4" in messages["window"]
    assert "invalid SparseK top_k" not in messages["window"]


def test_closed_model_refuses_work(tiny_model: Path) -> None:
    m = Llama(tiny_model, n_ctx=128, n_threads=1)
    m.close()
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.generate("the", 2)


def test_dropped_model_is_freed_without_the_cycle_collector(tiny_model: Path) -> None:
    """No reference cycle through the C callback handle: refcounting alone frees a Llama."""
    import weakref

    gc.disable()
    try:
        for cb in (None, lambda name, array: False):
            llm = Llama(tiny_model, n_ctx=64, n_threads=1, cb_eval=cb)
            ref = weakref.ref(llm)
            del llm
            assert ref() is None
    finally:
        gc.enable()
