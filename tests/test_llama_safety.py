"""Bad arguments and failing callbacks give a clear Python error, never a wrong result or a
crash: cb_eval exceptions, token ids, batch and context sizes, a full context, bad hparams."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from llama_sparsek import Llama, memory
from llama_sparsek.llama import ContextFullWarning

pytestmark = pytest.mark.filterwarnings("error::llama_sparsek.llama.ContextFullWarning")

TOKENS = [1, 300, 301, 302, 303, 304, 305, 306]


class Boom(Exception):
    pass


@pytest.mark.parametrize("when", ["ask", "deliver"])
def test_cb_eval_exception_is_raised_from_the_call(tiny_model: Path, when: str) -> None:
    seen: list[str] = []

    def callback(name: str, array: np.ndarray | None) -> bool:
        seen.append(name)
        if (array is None) == (when == "ask") and name.startswith("attn_norm"):
            raise Boom(name)
        return True

    with Llama(tiny_model, n_ctx=64, n_threads=1) as reference:
        expected = reference.eval(TOKENS)
    with Llama(tiny_model, n_ctx=64, n_threads=1, cb_eval=callback) as llm:
        with pytest.raises(Boom):
            llm.eval(TOKENS)
        n_calls = len(seen)
        with pytest.raises(Boom):  # and again: the failure is not remembered across calls
            llm.eval(TOKENS)
        assert len(seen) == 2 * n_calls  # nothing more was asked after the failure
    ok: list[str] = []

    def record(name: str, array: np.ndarray | None) -> bool:
        ok.append(name)
        return True

    with Llama(tiny_model, n_ctx=64, n_threads=1, cb_eval=record) as llm:
        np.testing.assert_array_equal(llm.eval(TOKENS), expected)
    assert len(ok) > n_calls


def test_context_is_usable_after_a_callback_failure(tiny_model: Path) -> None:
    fail = [True]

    def callback(name: str, array: np.ndarray | None) -> bool:
        if fail[0] and array is not None:
            raise Boom(name)
        return True

    with Llama(tiny_model, n_ctx=64, n_threads=1) as reference:
        expected = reference.logprobs(TOKENS)
    with Llama(tiny_model, n_ctx=64, n_threads=1, cb_eval=callback) as llm:
        with pytest.raises(Boom):
            llm.logprobs(TOKENS)
        fail[0] = False
        np.testing.assert_allclose(llm.logprobs(TOKENS), expected, rtol=1e-5)


@pytest.mark.parametrize("bad", [-1, TINY["n_vocab"], 2**40])
def test_logprobs_checks_the_last_token(tiny_model: Path, bad: int) -> None:
    with Llama(tiny_model, n_ctx=64, n_threads=1) as llm:
        with pytest.raises(ValueError, match="out of range"):
            llm.logprobs([1, bad])
        with pytest.raises(ValueError, match="out of range"):
            llm.logprobs([1, 300, bad], start=2)


def test_huge_n_batch_is_capped_at_n_ctx(tiny_model: Path) -> None:
    with Llama(tiny_model, n_ctx=64, n_threads=1) as llm:
        expected = llm.eval(TOKENS)
    with Llama(tiny_model, n_ctx=64, n_threads=1, n_batch=2**31 - 1, n_ubatch=2**31 - 1) as llm:
        assert llm.n_batch == 64
        np.testing.assert_array_equal(llm.eval(TOKENS), expected)


@pytest.mark.parametrize("name", ["n_ctx", "n_batch", "n_ubatch", "n_threads"])
def test_sizes_beyond_int32_are_value_errors(tiny_model: Path, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Llama(tiny_model, **{name: 2**31})  # type: ignore[arg-type]


def test_huge_context_is_refused_before_allocating(tiny_model: Path) -> None:
    code = (
        "import resource, sys\n"
        "from llama_sparsek import Llama\n"
        "try:\n"
        f"    Llama({str(tiny_model)!r}, n_ctx=10**9)\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
        "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    run = subprocess.run  # in the model's directory: the installed package, not the source tree
    out = run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tiny_model.parent)
    assert out.returncode == 0, out.stderr
    assert "refused: n_ctx=1000000000" in out.stdout and "GiB" in out.stdout, out
    assert int(out.stdout.split("maxrss_kb")[1]) < 1_000_000  # nothing near 512 GB was touched


def test_the_kv_estimate_counts_layers_heads_and_types() -> None:
    head = TINY["n_embd"] // TINY["n_head"]
    per_cell = TINY["n_layer"] * TINY["n_head_kv"] * head * (2 + 2)  # f16 K and V
    assert memory.kv_bytes_per_cell(TINY["n_layer"], TINY["n_head_kv"], head, head) == per_cell
    q8 = TINY["n_layer"] * TINY["n_head_kv"] * head * (34 / 32 + 2)
    got = memory.kv_bytes_per_cell(TINY["n_layer"], TINY["n_head_kv"], head, head, "q8_0")
    assert got == int(q8)
    logits = 4 * 16 * TINY["n_vocab"]
    assert memory.context_bytes(per_cell, 512, 16, TINY["n_vocab"]) == 512 * per_cell + logits
    assert memory.context_bytes(per_cell, 500, 16, TINY["n_vocab"]) == 512 * per_cell + logits


def test_generate_says_when_the_context_ends_it(tiny_model: Path) -> None:
    with Llama(tiny_model, n_ctx=64, n_threads=1) as llm:
        n_ctx = llm.n_ctx
        prompt = [1] + [260 + i % 60 for i in range(n_ctx - 6)]  # 5 cells left
        with pytest.warns(ContextFullWarning, match="6 of 10 tokens"):
            got = list(llm.generate_tokens(prompt, 10, stop_at_eog=False))
        assert len(got) == 6  # the last one is sampled from the full context, not decoded
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len(list(llm.generate_tokens(prompt, 6, stop_at_eog=False))) == 6


def test_an_edited_bad_model_is_a_cli_error(tiny_model: Path, tmp_path: Path) -> None:
    """The issue's `gguf set --kv llama.block_count=u32:0` then `generate` (was exit 134)."""
    from typer.testing import CliRunner

    from llama_sparsek.cli import app

    bad = tmp_path / "bc0.gguf"
    args = ["gguf", "set", str(tiny_model), "--kv", "llama.block_count=u32:0", "-o", str(bad)]
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(app, ["generate", "the", "-m", str(bad), "-n", "2"])
    assert result.exit_code == 2
    assert "block_count = 0" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("env", "expected"), [({}, "1"), ({"LLAMA_SPARSEK_BACKTRACE": "1"}, "-")])
def test_ggml_backtraces_are_off_unless_asked(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    """ggml's fork-a-debugger backtrace can deadlock when two threads assert at once."""
    import os

    code = "import os, llama_sparsek._binding; print(os.environ.get('GGML_NO_BACKTRACE', '-'))"
    clean = {k: v for k, v in os.environ.items() if k != "GGML_NO_BACKTRACE"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == expected, out.stderr
