"""A loaded model with its context: tokenize, evaluate, score and generate."""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from llama_sparsek import _binding
from llama_sparsek._binding import ffi, lib
from llama_sparsek.sampling import Sampling
from llama_sparsek.sparsek import SparseK, check_override

KvValue = bool | int | float | str
# cb_eval(name, None) asks whether the tensor `name` is wanted; cb_eval(name, array) then
# delivers it as float32 (numpy order: ne[3], ne[2], ne[1], ne[0]); returning False stops.
EvalCallback = Callable[[str, np.ndarray | None], bool]

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


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _llama_sparsek_eval(tensor: Any, ask: bool, user_data: Any) -> bool:
    callback: EvalCallback = ffi.from_handle(user_data)
    name = ffi.string(tensor.name).decode()
    if ask:
        return bool(callback(name, None))
    return bool(callback(name, _tensor_to_numpy(tensor)))


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


class Llama:
    """A GGUF model loaded with one context (one sequence). Use as a context manager or close()."""

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
        for name, value in (
            ("n_ctx", n_ctx),
            ("n_threads", n_threads),
            ("n_batch", n_batch),
            ("n_ubatch", n_ubatch),
        ):
            _positive(name, value)
        for name, cache in (("type_k", type_k), ("type_v", type_v)):
            if cache not in _CACHE_TYPES:
                raise ValueError(f"{name} must be one of {sorted(_CACHE_TYPES)}, got {cache!r}")
        if sparsek is not None and not isinstance(sparsek, SparseK | bool):
            raise ValueError(f"sparsek must be a SparseK, True, False or None, got {sparsek!r}")
        self.seed = seed
        Sampling(seed=seed)  # validates the seed
        # llama.cpp reads the file (a malformed one fails the load with its reason)
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}")
        overrides = dict(kv_overrides or {})
        for key, kv_value in overrides.items():
            check_override(key, kv_value)
        self._overrides = _kv_overrides(overrides)  # must outlive the load call

        _binding.init()
        _binding.clear_errors()
        mparams = lib.llama_model_default_params()
        mparams.kv_overrides = self._overrides if overrides else ffi.NULL
        model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if model == ffi.NULL:
            raise _binding.fail(f"llama.cpp could not load {path}")
        self._model = ffi.gc(model, lib.llama_model_free)

        # the handle refers to the callback, not to self: no reference cycle through C
        self._cb_eval = None if cb_eval is None else ffi.new_handle(cb_eval)
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
            SparseK(resolved.top_k, resolved.window, resolved.stride, resolved.block_size)
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
        self._n_past = 0

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free the context and the model now (idempotent)."""
        if getattr(self, "_ctx", None) is not None:
            ffi.release(self._batch)
            ffi.release(self._ctx)
            ffi.release(self._model)
            self._ctx = self._model = self._batch = None

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

    # ------------------------------------------------------------------ text <-> tokens

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        self._live_ctx()
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

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (control tokens render as nothing, as in llama.cpp's CLI)."""
        buf = ffi.new("char[]", 64)
        n = lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return bytes(ffi.buffer(buf, n))

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        self._live_ctx()
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
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")

    # ------------------------------------------------------------------ evaluation

    def reset(self) -> None:
        """Forget all evaluated tokens (clear the KV cache)."""
        lib.llama_memory_clear(lib.llama_get_memory(self._live_ctx()), True)
        self._n_past = 0

    def _decode(self, tokens: Sequence[int], *, all_logits: bool) -> list[np.ndarray]:
        """Append tokens to the context in n_batch chunks; with all_logits, each chunk's logits."""
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
            if rc != 0:
                raise _binding.fail(f"llama_decode failed with code {rc}")
            self._n_past += len(chunk)
            if all_logits:
                chunk_logits.append(self._logits(len(chunk)))
        return chunk_logits

    def _logits(self, n: int) -> np.ndarray:
        ptr = lib.llama_get_logits_ith(self._live_ctx(), 0)
        return (
            np.frombuffer(ffi.buffer(ptr, 4 * n * self.n_vocab), dtype=np.float32)
            .reshape(n, self.n_vocab)
            .copy()
        )

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate tokens from an empty context; logits of every position, [n_tokens, n_vocab]."""
        if not tokens:
            raise ValueError("eval needs at least one token")
        self.reset()
        return np.concatenate(self._decode(tokens, all_logits=True))

    def logprobs(self, tokens: Sequence[int], *, start: int = 1) -> np.ndarray:
        """log p(tokens[i] | tokens[:i]) for i in [start, len(tokens)): perplexity's scores.

        The prefix before `start` is decoded without logits and the rest one batch at a time,
        so memory stays at n_batch x n_vocab floats however long the text.
        """
        if not 1 <= start < len(tokens):
            raise ValueError(f"start must be in [1, {len(tokens)}), got {start}")
        self.reset()
        if start > 1:
            self._decode(tokens[: start - 1], all_logits=False)
        scores = []
        for first in range(start - 1, len(tokens) - 1, self.n_batch):
            last = min(first + self.n_batch, len(tokens) - 1)
            (logits,) = self._decode(tokens[first:last], all_logits=True)
            scores.append(log_softmax_pick(logits, tokens[first + 1 : last + 1]))
        return np.concatenate(scores)

    # ------------------------------------------------------------------ generation

    def generate_tokens(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        sampling: Sampling | None = None,
        stop_at_eog: bool = True,
    ) -> Iterator[int]:
        """Token ids continuing `prompt` from an empty context (greedy unless `sampling` says
        otherwise); with stop_at_eog=False every continuation has exactly max_tokens tokens."""
        _positive("max_tokens", max_tokens)
        if not prompt:
            raise ValueError("the prompt has no tokens")
        sampler = (sampling or Sampling(seed=self.seed)).sampler()
        self.reset()
        self._decode(prompt, all_logits=False)
        for i in range(max_tokens):
            token = int(lib.llama_sampler_sample(sampler, self._live_ctx(), -1))
            if stop_at_eog and lib.llama_vocab_is_eog(self._vocab, token):
                return
            yield token
            if i + 1 == max_tokens or self._n_past >= self.n_ctx:
                return
            self._decode([token], all_logits=False)

    def stream(
        self,
        prompt: str,
        max_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Generate from an empty context, yielding text pieces as they are decoded."""
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        sampling = Sampling(temperature, top_k, top_p, min_p, self.seed if seed is None else seed)
        tokens = self.tokenize(prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        keep = max((len(s) - 1 for s in stop), default=0)
        held = ""  # text that could still be the start of a stop string
        for token in self.generate_tokens(tokens, max_tokens, sampling=sampling):
            held += decoder.decode(self.token_bytes(token))
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

    def generate(self, prompt: str, max_tokens: int = 128, **options: Any) -> str:
        """The whole completion of `prompt` (see stream() for the options)."""
        return "".join(self.stream(prompt, max_tokens, **options))


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
