"""A loaded model with its context: tokenize, evaluate, score and generate."""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import numpy as np

from llama_sparsek import _binding, chat, memory, state
from llama_sparsek._binding import ffi, lib
from llama_sparsek.chat import Message
from llama_sparsek.sampling import Sampling
from llama_sparsek.sparsek import SparseK, check_override
from llama_sparsek.state import StateFileError
from llama_sparsek.timings import Clock, ProgressCallback, Timings

KvValue = bool | int | float | str
# cb_eval(name, None) asks whether the tensor `name` is wanted; cb_eval(name, array) then
# delivers it as float32 (numpy order: ne[3], ne[2], ne[1], ne[0]); returning False stops.
EvalCallback = Callable[[str, np.ndarray | None], bool]
F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Llama", "LlamaBusyError", "StateFileError", "Timings"]


class LlamaBusyError(RuntimeError):
    """A call on a Llama that is already running one (one call at a time per Llama)."""


_CACHE_TYPES = {
    "f32": lib.GGML_TYPE_F32,
    "f16": lib.GGML_TYPE_F16,
    "bf16": lib.GGML_TYPE_BF16,
    "q8_0": lib.GGML_TYPE_Q8_0,
    "q4_0": lib.GGML_TYPE_Q4_0,
    "q4_1": lib.GGML_TYPE_Q4_1,
    "q5_0": lib.GGML_TYPE_Q5_0,
    "q5_1": lib.GGML_TYPE_Q5_1,
}
_KEY_MAX = 128  # sizeof(llama_model_kv_override.key) and .val_str
_INT32_MAX = 2**31 - 1  # the C int32 parameters (n_ctx, n_batch, n_threads ...)


class ContextFullWarning(UserWarning):
    """Generation stopped before max_tokens because the context is full."""


def _kv_overrides(overrides: Mapping[str, KvValue]) -> Any:
    """A NUL-key-terminated llama_model_kv_override array (checked before any C call)."""
    arr = ffi.new("struct llama_model_kv_override[]", len(overrides) + 1)
    for item, (key, value) in zip(arr, overrides.items(), strict=False):
        raw_key = key.encode()
        if not raw_key or len(raw_key) >= _KEY_MAX:
            raise ValueError(f"kv_overrides key must be 1..{_KEY_MAX - 1} bytes: {key!r}")
        item.key = raw_key
        if isinstance(value, bool):
            item.tag, item.val_bool = lib.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise ValueError(f"kv_overrides[{key!r}] does not fit in int64: {value}")
            item.tag, item.val_i64 = lib.LLAMA_KV_OVERRIDE_TYPE_INT, value
        elif isinstance(value, float):
            item.tag, item.val_f64 = lib.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
        elif isinstance(value, str):
            raw = value.encode()
            if len(raw) >= _KEY_MAX:
                raise ValueError(f"kv_overrides[{key!r}] string is too long (max {_KEY_MAX - 1})")
            item.tag, item.val_str = lib.LLAMA_KV_OVERRIDE_TYPE_STR, raw
        else:
            raise ValueError(f"kv_overrides[{key!r}] has unsupported type {type(value).__name__}")
    return arr


def _positive(name: str, value: int | None, *, optional: bool = False) -> None:
    """TypeError unless value is an int (or, if optional, None), ValueError unless it is a
    positive int32."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 1 <= value <= _INT32_MAX:
        raise ValueError(f"{name} must be an int in [1, {_INT32_MAX}], got {value!r}")


class _EvalHook:
    """The user's cb_eval and the first exception it raised during a decode."""

    def __init__(self, callback: EvalCallback) -> None:
        self.callback = callback
        self.error: BaseException | None = None

    def raise_error(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _llama_sparsek_eval(tensor: Any, ask: bool, user_data: Any) -> bool:
    hook: _EvalHook = ffi.from_handle(user_data)
    if hook.error is not None:  # a previous tensor failed: want nothing more of this decode
        return False
    try:
        name = ffi.string(tensor.name).decode()
        if ask:
            return bool(hook.callback(name, None))
        return bool(hook.callback(name, _tensor_to_numpy(tensor)))
    except BaseException as e:  # re-raised by the decode that called us
        hook.error = e
        return False


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    """Copy a (possibly strided) f32/f16/i32 ggml tensor to a float32 numpy array."""
    dtypes = {
        lib.GGML_TYPE_F32: np.float32,
        lib.GGML_TYPE_F16: np.float16,
        lib.GGML_TYPE_I32: np.int32,
    }
    dtype = dtypes.get(tensor.type)
    if dtype is None:
        raise TypeError(
            f"cannot capture tensor of type {_binding.c_string(lib.ggml_type_name(tensor.type))}"
        )
    nbytes = lib.ggml_nbytes(tensor)
    buf = np.empty(nbytes, dtype=np.uint8)
    lib.ggml_backend_tensor_get(tensor, ffi.from_buffer(buf), 0, nbytes)
    shape = tuple(int(tensor.ne[i]) for i in reversed(range(4)))
    strides = tuple(int(tensor.nb[i]) for i in reversed(range(4)))
    view = np.lib.stride_tricks.as_strided(buf.view(dtype), shape=shape, strides=strides)
    return view.astype(np.float32 if dtype != np.int32 else np.int32)


def _exclusive(method: F) -> F:
    """A public method: refused on a closed Llama or while another call runs."""

    @functools.wraps(method)
    def entry(self: Llama, *args: Any, **kwargs: Any) -> Any:
        self._acquire()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._lock.release()

    return cast(F, entry)


def _exclusive_iter(method: F) -> F:
    """A public generator: holds the Llama from its first item until it ends or is closed."""

    @functools.wraps(method)
    def entry(self: Llama, *args: Any, **kwargs: Any) -> Iterator[Any]:
        self._acquire()
        try:
            yield from method(self, *args, **kwargs)
        finally:
            self._lock.release()

    return cast(F, entry)


class Llama:
    """A GGUF model loaded with one context (one sequence). Use as a context manager or close().

    The context remembers the tokens it holds: a call whose prompt starts with them evaluates
    only the rest (a second question about the same long document costs only the question).
    One call at a time: a call made while another runs (another thread, or a started and
    unfinished generator) raises LlamaBusyError.
    """

    last_timings: Timings | None = None  # what the latest call cost
    _identity: dict[str, Any] | None = None  # the model file's fingerprint, for state files

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_ubatch: int = 512,
        flash_attn: bool = True,
        sparsek: SparseK | bool | None = None,
        kv_overrides: Mapping[str, KvValue] | None = None,
        type_k: str = "f16",
        type_v: str = "f16",
        seed: int | None = None,
        cb_eval: EvalCallback | None = None,
    ) -> None:
        path = Path(model_path)
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_ubatch", n_ubatch)):
            _positive(name, value)
        _positive("n_threads", n_threads, optional=True)
        for name, cache in (("type_k", type_k), ("type_v", type_v)):
            if not isinstance(cache, str):
                raise TypeError(f"{name} must be a str, got {type(cache).__name__} {cache!r}")
            if cache not in _CACHE_TYPES:
                raise ValueError(f"{name} must be one of {sorted(_CACHE_TYPES)}, got {cache!r}")
        if sparsek is not None and not isinstance(sparsek, SparseK | bool):
            raise TypeError(f"sparsek must be a SparseK, True, False or None, got {sparsek!r}")
        if not isinstance(flash_attn, bool):
            raise TypeError(f"flash_attn must be a bool, got {type(flash_attn).__name__}")
        if cb_eval is not None and not callable(cb_eval):
            raise TypeError(f"cb_eval must be callable, got {type(cb_eval).__name__}")
        self.seed = seed
        Sampling(seed=seed)  # validates the seed
        # llama.cpp reads the file (a malformed one fails the load with its reason)
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}")
        overrides = dict(kv_overrides or {})
        for key, kv_value in overrides.items():
            check_override(key, kv_value)
        # llama.cpp caps a causal model's batch at n_ctx; so do we (the batch is allocated here)
        n_batch = min(n_batch, n_ctx)
        self._overrides = _kv_overrides(overrides)  # must outlive the load call

        _binding.init()
        _binding.clear_errors()
        mparams = lib.llama_model_default_params()
        mparams.kv_overrides = self._overrides if overrides else ffi.NULL
        model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if model == ffi.NULL:
            raise _binding.fail(f"llama.cpp could not load {path}")
        self._model = ffi.gc(model, lib.llama_model_free)
        try:
            _check_memory(model, n_ctx, n_batch, type_k, type_v)
        except ValueError:
            ffi.release(self._model)
            raise

        # the handle refers to the callback, not to self: no reference cycle through C
        self._eval_hook = None if cb_eval is None else _EvalHook(cb_eval)
        self._cb_eval = None if self._eval_hook is None else ffi.new_handle(self._eval_hook)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_ubatch, n_batch)
        cparams.n_seq_max = 1
        threads = n_threads or os.cpu_count() or 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = (
            lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.type_k = _CACHE_TYPES[type_k]
        cparams.type_v = _CACHE_TYPES[type_v]
        cparams.no_perf = True
        # None: as the model file says; True: on with the file's settings (or llama.cpp's defaults,
        # the same as SparseK()); False: off; a SparseK: on with its settings
        if sparsek is None:
            cparams.sparsek_mode = lib.LLAMA_SPARSEK_MODE_AUTO
        elif sparsek is False:
            cparams.sparsek_mode = lib.LLAMA_SPARSEK_MODE_DISABLED
        else:
            cparams.sparsek_mode = lib.LLAMA_SPARSEK_MODE_ENABLED
        if isinstance(sparsek, SparseK):
            cparams.sparsek_top_k = sparsek.top_k
            cparams.sparsek_window = sparsek.window
            cparams.sparsek_stride = sparsek.stride
            cparams.sparsek_block_size = sparsek.block_size
            cparams.sparsek_sinks = sparsek.sinks
            cparams.sparsek_dense_layers = sparsek.dense_layers
            cparams.sparsek_summaries = sparsek.summaries
            cparams.sparsek_grow_top_k = sparsek.grow_top_k
            cparams.sparsek_per_group = sparsek.per_group
        if self._cb_eval is not None:
            cparams.cb_eval = lib._llama_sparsek_eval
            cparams.cb_eval_user_data = self._cb_eval
        _binding.clear_errors()
        ctx = lib.llama_init_from_model(self._model, cparams)
        if ctx == ffi.NULL:
            ffi.release(self._model)
            raise _binding.fail(f"llama.cpp could not create a context for {path}")
        # the destructor closes over the model so the context is always freed first
        self._ctx = ffi.gc(ctx, lambda c, _m=self._model: lib.llama_free(c))
        resolved = lib.llama_get_sparsek(self._ctx)
        # the settings in effect (None: dense attention), as llama.cpp resolved them
        self.sparsek: SparseK | None = (
            SparseK(
                resolved.top_k,
                resolved.window,
                resolved.stride,
                resolved.block_size,
                resolved.sinks,
                resolved.dense_layers,
                resolved.summaries,
                resolved.grow_top_k,
                resolved.per_group,
            )
            if resolved.enabled
            else None
        )
        arch = ffi.new("char[]", 64)
        n = lib.llama_model_meta_val_str(self._model, b"general.architecture", arch, 64)
        self.arch = ffi.string(arch).decode() if n >= 0 else ""
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_ctx = int(lib.llama_n_ctx(self._ctx))
        self.n_batch = n_batch
        # one batch for the Llama's lifetime: decoding token by token must not allocate per token
        self._batch = ffi.gc(lib.llama_batch_init(n_batch, 0, 1), lib.llama_batch_free)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self.model_path = path
        self.type_k, self.type_v, self.flash_attn = type_k, type_v, flash_attn
        self._tokens: list[int] = []  # what the KV cache holds, position by position
        self._lock = threading.Lock()  # one call at a time (see _acquire)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free the context and the model now (idempotent). Refused while a call is running
        (another thread, or a generator of this Llama that was started and not finished)."""
        if getattr(self, "_ctx", None) is None:
            return
        if not self._lock.acquire(blocking=False):
            raise LlamaBusyError(
                "cannot close this Llama while a call on it is running "
                "(finish or close its stream/generator first)"
            )
        try:
            ffi.release(self._batch)
            ffi.release(self._ctx)
            ffi.release(self._model)
            self._ctx = self._model = self._batch = None
            self._tokens = []
        finally:
            self._lock.release()

    def __enter__(self) -> Llama:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _live_ctx(self) -> Any:
        if self._ctx is None:
            raise ValueError("this Llama is closed")
        return self._ctx

    def _acquire(self) -> None:
        """Enter a public call: the Llama must be open and not in use (one call at a time)."""
        self._live_ctx()
        if not self._lock.acquire(blocking=False):
            raise LlamaBusyError(
                "this Llama is already running a call (from another thread, or a stream/"
                "generator that was started and not finished); a Llama runs one call at a time: "
                "use one Llama per thread, or finish the generator first"
            )

    @property
    def tokens(self) -> list[int]:
        """The tokens the context holds (a copy): what the next call can reuse."""
        return list(self._tokens)

    @property
    def _n_past(self) -> int:
        return len(self._tokens)

    # ------------------------------------------------------------------ text <-> tokens

    @_exclusive
    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        return self._tokenize(text, add_special=add_special, parse_special=parse_special)

    def _tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"the text must be a str, got {type(text).__name__}")
        raw = text.encode()
        n_max = len(raw) + 8
        buf = ffi.new("llama_token[]", n_max)
        n = lib.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, add_special, parse_special)
        if n < 0:  # the buffer was too small: -n tokens are needed
            n_max = -n
            buf = ffi.new("llama_token[]", n_max)
            n = lib.llama_tokenize(
                self._vocab, raw, len(raw), buf, n_max, add_special, parse_special
            )
        if n < 0:
            raise _binding.fail("tokenization failed")
        return list(buf[0:n])

    @_exclusive
    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (control tokens render as nothing, as in llama.cpp's CLI)."""
        self._check_tokens([token])
        return self._token_bytes(token)

    def _token_bytes(self, token: int) -> bytes:
        buf = ffi.new("char[]", 64)
        n = lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return bytes(ffi.buffer(buf, n))

    @_exclusive
    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        self._check_tokens(tokens)
        arr = ffi.new("llama_token[]", list(tokens))
        size = 8 * len(tokens) + 16
        for _ in range(2):
            out = ffi.new("char[]", size)
            n = lib.llama_detokenize(self._vocab, arr, len(tokens), out, size, False, special)
            if n >= 0:
                return bytes(ffi.buffer(out, n)).decode("utf-8", errors="replace")
            size = -n
        raise _binding.fail("detokenization failed")

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        if isinstance(tokens, str | bytes):
            raise TypeError(f"token ids must be a sequence of ints, got {type(tokens).__name__}")
        wrong = [t for t in tokens if not isinstance(t, int | np.integer)]
        if wrong:
            raise TypeError(f"token ids must be ints, got {wrong[:5]!r}")
        bad = [t for t in tokens if isinstance(t, bool) or not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")

    # ------------------------------------------------------------------ the context's tokens

    @_exclusive
    def reset(self) -> None:
        """Forget all evaluated tokens (clear the KV cache); the next call evaluates all of its
        prompt. Calls reuse the shared prefix on their own: this is only for an explicit clear."""
        self._clear()

    def _clear(self) -> None:
        lib.llama_memory_clear(lib.llama_get_memory(self._live_ctx()), True)
        self._tokens = []

    def _reuse_prefix(self, tokens: Sequence[int], limit: int) -> int:
        """Keep the longest prefix (at most `limit` tokens) that the context shares with
        `tokens`, drop the rest of the context; return the prefix's length."""
        held = self._tokens
        n, top = 0, min(len(held), len(tokens), limit)
        while n < top and held[n] == tokens[n]:
            n += 1
        mem = lib.llama_get_memory(self._live_ctx())
        # always cut at n, even at the end of `held`: the cache then holds exactly `held[:n]`
        if not lib.llama_memory_seq_rm(mem, 0, n, -1):  # a cache that cannot cut a sequence
            self._clear()
            return 0
        del held[n:]
        # a sliding-window cache may have evicted keys the next token still attends to
        n_swa = int(lib.llama_model_n_swa(self._model))
        if n and n_swa > 0 and lib.llama_memory_seq_pos_min(mem, 0) > max(0, n - n_swa):
            self._clear()
            return 0
        return n

    def _decode(
        self,
        tokens: Sequence[int],
        *,
        all_logits: bool,
        progress: ProgressCallback | None = None,
    ) -> list[np.ndarray]:
        """Append tokens to the context in n_batch chunks; with all_logits, each chunk's logits.
        On a failed decode the context is cleared (its content would be unknown)."""
        ctx = self._live_ctx()
        self._check_tokens(tokens)
        if self._n_past + len(tokens) > self.n_ctx:
            raise ValueError(
                f"{self._n_past + len(tokens)} tokens do not fit the context of {self.n_ctx}"
            )
        batch = self._batch
        chunk_logits = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            last_chunk = start + len(chunk) == len(tokens)
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = self._n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or (last_chunk and i == len(chunk) - 1)
            _binding.clear_errors()
            rc = lib.llama_decode(ctx, batch)
            if self._eval_hook is not None and self._eval_hook.error is not None:
                # the computation stopped early: these positions hold no valid state
                self._clear()
                self._eval_hook.raise_error()
            if rc != 0:
                error = _binding.fail(f"llama_decode failed with code {rc}")
                self._clear()
                raise error
            self._tokens.extend(int(t) for t in chunk)
            if all_logits:
                chunk_logits.append(self._logits(len(chunk)))
            if progress is not None:
                progress(start + len(chunk), len(tokens))
        return chunk_logits

    def _logits(self, n: int) -> np.ndarray:
        ptr = lib.llama_get_logits_ith(self._live_ctx(), 0)
        return (
            np.frombuffer(ffi.buffer(ptr, 4 * n * self.n_vocab), dtype=np.float32)
            .reshape(n, self.n_vocab)
            .copy()
        )

    # ------------------------------------------------------------------ evaluation

    @_exclusive
    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate tokens from an empty context; logits of every position, [n_tokens, n_vocab].

        Always clears the context first: the logits of reused positions are not kept, so a
        reused prefix could not return them. The tokens stay in the context for later calls."""
        if not tokens:
            raise ValueError("eval needs at least one token")
        self._check_tokens(tokens)
        clock = Clock(len(tokens))
        self._clear()
        logits = np.concatenate(self._decode(tokens, all_logits=True))
        clock.prefilled(0)
        self.last_timings = clock.timings()
        return logits

    @_exclusive
    def logprobs(self, tokens: Sequence[int], *, start: int = 1) -> np.ndarray:
        """log p(tokens[i] | tokens[:i]) for i in [start, len(tokens)): perplexity's scores.

        The prefix before `start` is decoded without logits (reusing what the context already
        holds of it) and the rest one batch at a time, so memory stays at n_batch x n_vocab
        floats however long the text.
        """
        if not 1 <= start < len(tokens):
            raise ValueError(f"start must be in [1, {len(tokens)}), got {start}")
        self._check_tokens(tokens)  # the last one is only a target, never decoded
        clock = Clock(len(tokens) - 1)
        reused = self._reuse_prefix(tokens, start - 1)
        self._decode(tokens[reused : start - 1], all_logits=False)
        scores = []
        for first in range(start - 1, len(tokens) - 1, self.n_batch):
            last = min(first + self.n_batch, len(tokens) - 1)
            (logits,) = self._decode(tokens[first:last], all_logits=True)
            scores.append(log_softmax_pick(logits, tokens[first + 1 : last + 1]))
        clock.prefilled(reused)
        self.last_timings = clock.timings()
        return np.concatenate(scores)

    # ------------------------------------------------------------------ generation

    def _sampling(self, sampling: Sampling | None, options: Mapping[str, Any]) -> Sampling:
        """`sampling` (default: Sampling() with this Llama's seed) with `options` changed."""
        if sampling is not None and not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a Sampling or None, got {sampling!r}")
        return (sampling or Sampling(seed=self.seed)).with_options(**options)

    @_exclusive_iter
    def generate_tokens(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        sampling: Sampling | None = None,
        stop_at_eog: bool = True,
        progress: ProgressCallback | None = None,
    ) -> Iterator[int]:
        """Token ids continuing `prompt` (greedy unless `sampling` says otherwise); with
        stop_at_eog=False every continuation has exactly max_tokens tokens (unless the context
        fills up). The prompt's prefix that the context already holds is not evaluated again."""
        yield from self._generate_tokens(
            prompt, max_tokens, self._sampling(sampling, {}), stop_at_eog, progress
        )

    def _generate_tokens(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        sampling: Sampling,
        stop_at_eog: bool,
        progress: ProgressCallback | None,
    ) -> Iterator[int]:
        _positive("max_tokens", max_tokens)
        if not prompt:
            raise ValueError("the prompt has no tokens")
        self._check_tokens(prompt)
        if len(prompt) > self.n_ctx:
            raise ValueError(
                f"the prompt's {len(prompt)} tokens do not fit the context of {self.n_ctx}"
            )
        sampler = sampling.sampler(self.n_vocab, prompt)
        clock = Clock(len(prompt))
        try:
            # at least the last prompt token is evaluated again: its logits are not kept
            reused = self._reuse_prefix(prompt, len(prompt) - 1)
            self._decode(prompt[reused:], all_logits=False, progress=progress)
            clock.prefilled(reused)
            for i in range(max_tokens):
                token = int(lib.llama_sampler_sample(sampler, self._live_ctx(), -1))
                clock.sampled()
                if stop_at_eog and lib.llama_vocab_is_eog(self._vocab, token):
                    return
                clock.generated += 1
                yield token
                if i + 1 == max_tokens:
                    return
                if self._n_past >= self.n_ctx:
                    warnings.warn(
                        f"the context of {self.n_ctx} tokens is full: "
                        f"{i + 1} of {max_tokens} tokens generated",
                        ContextFullWarning,
                        stacklevel=3,
                    )
                    return
                self._decode([token], all_logits=False)
        finally:
            self.last_timings = clock.timings()

    @_exclusive_iter
    def stream(
        self,
        prompt: str,
        max_tokens: int = 128,
        *,
        sampling: Sampling | None = None,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """Generate, yielding text pieces as they are decoded.

        `options` change single settings of `sampling` (default `Sampling()` with this Llama's
        seed): temperature, top_k, top_p, min_p, repeat_penalty, penalty_last_n, seed, stop.
        `progress(done, total)` is called as the prompt is evaluated."""
        settings = self._sampling(sampling, options)
        tokens = self._tokenize(prompt, add_special=True, parse_special=True)
        yield from self._stream(tokens, max_tokens, settings, progress)

    @_exclusive
    def generate(
        self,
        prompt: str,
        max_tokens: int = 128,
        *,
        sampling: Sampling | None = None,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> str:
        """The whole completion of `prompt` (see stream() for the options)."""
        settings = self._sampling(sampling, options)
        tokens = self._tokenize(prompt, add_special=True, parse_special=True)
        return "".join(self._stream(tokens, max_tokens, settings, progress))

    def _stream(
        self,
        tokens: Sequence[int],
        max_tokens: int,
        sampling: Sampling,
        progress: ProgressCallback | None,
    ) -> Iterator[str]:
        stop = sampling.stop
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        keep = max((len(s) - 1 for s in stop), default=0)
        held = ""  # text that could still be the start of a stop string
        for token in self._generate_tokens(tokens, max_tokens, sampling, True, progress):
            held += decoder.decode(self._token_bytes(token))
            cut = min((i for s in stop if (i := held.find(s)) >= 0), default=-1)
            if cut >= 0:
                if held[:cut]:
                    yield held[:cut]
                return
            safe = _safe_prefix(held, stop, keep)
            if safe:
                yield held[:safe]
                held = held[safe:]
        held += decoder.decode(b"", final=True)
        if held:
            yield held

    # ------------------------------------------------------------------ chat

    @_exclusive
    def chat(
        self,
        messages: Sequence[Message],
        max_tokens: int = 512,
        *,
        template: str | None = None,
        sampling: Sampling | None = None,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> str:
        """The assistant's answer to a conversation, `[{"role": ..., "content": ...}, ...]`,
        formatted with the model's chat template (or `template`: a llama.cpp built-in name
        such as "chatml", or a template's source). Turn after turn, the conversation so far is
        reused from the context. Options as for stream()."""
        settings = self._sampling(sampling, options)
        tokens = self._chat_tokens(messages, template)
        return "".join(self._stream(tokens, max_tokens, settings, progress))

    @_exclusive_iter
    def stream_chat(
        self,
        messages: Sequence[Message],
        max_tokens: int = 512,
        *,
        template: str | None = None,
        sampling: Sampling | None = None,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """chat(), yielding the answer's text pieces as they are decoded."""
        settings = self._sampling(sampling, options)
        tokens = self._chat_tokens(messages, template)
        yield from self._stream(tokens, max_tokens, settings, progress)

    @_exclusive
    def chat_template(self) -> str | None:
        """The model's own chat template (the GGUF's tokenizer.chat_template), None if none."""
        return chat.model_template(self._model)

    def _chat_tokens(self, messages: Sequence[Message], template: str | None) -> list[int]:
        if template is None:
            template = chat.model_template(self._model)
            if template is None:
                raise ValueError(
                    f"{self.model_path.name} has no chat template (tokenizer.chat_template): "
                    "pass template=..., e.g. 'chatml'"
                )
        elif not isinstance(template, str) or not template:
            raise ValueError(f"template must be a non-empty string, got {template!r}")
        text = chat.render(template, messages)
        return self._tokenize(text, add_special=True, parse_special=True)

    # ------------------------------------------------------------------ state files

    def _state_settings(self) -> dict[str, Any]:
        """What a state file must share with this Llama (see state.Header.compatibility)."""
        if self._identity is None:
            self._identity = state.model_identity(self.model_path)
        sparsek = getattr(self, "sparsek", None)
        return {
            "model": self._identity,
            "SparseK settings": None if sparsek is None else asdict(sparsek),
            "K cache type": self.type_k,
            "V cache type": self.type_v,
            "flash attention": self.flash_attn,
        }

    @_exclusive
    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write the context's tokens and KV cache to `path` (atomically: a complete file or,
        on any error, the old one untouched). `load_state` restores them into a Llama of the
        same model, SparseK settings, cache types and flash attention setting."""
        ctx = self._live_ctx()
        settings = self._state_settings()
        size = lib.llama_state_seq_get_size(ctx, 0)
        buf = ffi.new("uint8_t[]", max(size, 1))
        _binding.clear_errors()
        n = lib.llama_state_seq_get_data(ctx, buf, size, 0)
        if n == 0 and size:
            raise _binding.fail("llama.cpp could not copy the context's state")
        data = ffi.buffer(buf, n)
        header = state.Header(
            model=settings["model"],
            sparsek=settings["SparseK settings"],
            type_k=settings["K cache type"],
            type_v=settings["V cache type"],
            flash_attn=settings["flash attention"],
            n_ctx=self.n_ctx,
            n_tokens=len(self._tokens),
            state_bytes=n,
            state_sha256=hashlib.sha256(data).hexdigest(),
        )
        state.write(Path(path), header, self._tokens, data)

    @_exclusive
    def load_state(self, path: str | os.PathLike[str]) -> None:
        """Replace the context with a file written by `save_state`; the next call reuses its
        tokens. A file from another model, SparseK setting, cache type or flash attention
        setting, or a truncated or foreign file, raises StateFileError and changes nothing."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such state file")
        expected = self._state_settings()
        with open(path, "rb") as f:
            try:
                header, _ = state.read_header(f, os.fstat(f.fileno()).st_size)
                state.check_compatible(header, expected)
                if header.n_tokens > self.n_ctx:
                    raise StateFileError(
                        f"the state holds {header.n_tokens} tokens, more than this context's "
                        f"{self.n_ctx}"
                    )
                tokens, data = state.read_body(f, header)
                self._check_tokens(tokens)
            except ValueError as e:  # StateFileError, or token ids from another vocabulary
                raise StateFileError(f"{path}: {e}") from None
        ctx = self._live_ctx()
        self._clear()
        _binding.clear_errors()
        read = lib.llama_state_seq_set_data(ctx, ffi.from_buffer("uint8_t[]", data), len(data), 0)
        held = lib.llama_memory_seq_pos_max(lib.llama_get_memory(ctx), 0) + 1
        if read == 0 or held != len(tokens):
            error = _binding.fail(f"llama.cpp could not restore the state in {path}")
            self._clear()
            raise error
        self._tokens = tokens


def _check_memory(model: Any, n_ctx: int, n_batch: int, type_k: str, type_v: str) -> None:
    """ValueError when the context would need more memory than the system has available (the
    loaded model's hyperparameters, overrides applied, estimated as in `memory`)."""
    n_head = lib.llama_model_n_head(model)
    head = lib.llama_model_n_embd(model) // max(n_head, 1)
    arch = _meta_str(model, "general.architecture")
    k_dim = _meta_int(model, f"{arch}.attention.key_length", head)
    v_dim = _meta_int(model, f"{arch}.attention.value_length", k_dim)
    per_cell = memory.kv_bytes_per_cell(
        lib.llama_model_n_layer(model),
        lib.llama_model_n_head_kv(model),
        k_dim,
        v_dim,
        type_k,
        type_v,
    )
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    need = memory.context_bytes(per_cell, n_ctx, n_batch, n_vocab)
    have = memory.available_memory()
    if have is not None and need > have:
        raise ValueError(
            f"n_ctx={n_ctx} with n_batch={n_batch} needs about {need / 2**30:.1f} GiB for the "
            f"KV cache and logits, more than the {have / 2**30:.1f} GiB of available memory: "
            "lower n_ctx (or use type_k/type_v='q8_0')"
        )


def _meta_str(model: Any, key: str) -> str:
    buf = ffi.new("char[]", 256)
    n = lib.llama_model_meta_val_str(model, key.encode(), buf, 256)
    return "" if n < 0 else ffi.string(buf).decode(errors="replace")


def _meta_int(model: Any, key: str, default: int) -> int:
    text = _meta_str(model, key)
    return int(text) if text.isdigit() else default


def log_softmax_pick(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """log p(target) under each row of logits, in float64 so long sums of nats stay exact."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    picked: np.ndarray = x[np.arange(len(targets)), list(targets)] - log_norm
    return picked


def _safe_prefix(text: str, stop: Sequence[str], keep: int) -> int:
    """Length of the prefix of text that no stop string can still complete."""
    if keep == 0:
        return len(text)
    for start in range(max(0, len(text) - keep), len(text)):
        tail = text[start:]
        if any(s.startswith(tail) for s in stop):
            return start
    return len(text)
