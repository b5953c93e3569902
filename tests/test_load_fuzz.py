"""Fuzz the native loader: mutated models (and kv_overrides) must load or fail with a Python
exception, never kill the process with a signal or hang it.

Each case mutates the tiny test model: real keys get out-of-range counts, negative or NaN
epsilons, other types, arrays; keys it lacks are added (experts, alignment, rope scaling,
tokenizer model); the vocabulary gets duplicates or short arrays; tensor infos get other types,
shapes or names; the file is truncated or bytes of its header are overwritten. The cases are a
pure function of (seed, index), so a failure names a case that can be replayed:

    python tests/test_load_fuzz.py --cases 2000 --seed 0      # tally of outcomes
    python tests/test_load_fuzz.py --case 0:123 --show        # one case, with llama.cpp's log

Every case is loaded by `Llama(...)` in a child process, followed by a short evaluation; one
child serves many cases and is restarted after it dies, so thousands of loads stay fast.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_sparsek.gguf import (
    GGUFArray,
    GGUFType,
    TensorInfo,
    make_field,
    read_metadata,
)

DEFAULT_CASES = 300
SLOW_CASES = 2000
TIMEOUT_S = 60.0  # per case; a loaded machine can be slow, a hang never answers
RESULT = "LOAD-FUZZ-RESULT "  # prefix of the child's answers (llama.cpp may print to stdout)
ALLOWED_ERRORS = {"LlamaError", "GGUFError", "ValueError"}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


# --------------------------------------------------------------------------- the base model


@dataclass
class Model:
    """A GGUF as editable parts: fields (encoded), tensor infos, the data region."""

    fields: dict[str, bytes]  # key -> type tag and value, as stored
    tensors: list[TensorInfo]
    data: bytes
    alignment: int = 32
    version: int = 3
    overrides: dict[str, Any] = field(default_factory=dict)

    def set(self, key: str, type_: GGUFType, value: Any) -> None:
        self.fields[key] = bytes(make_field(key, type_, value).raw)

    def encode(self) -> bytes:
        out = [struct.pack("<4sIQQ", b"GGUF", self.version, len(self.tensors), len(self.fields))]
        for key, raw in self.fields.items():
            out += [_string(key), raw]
        for t in self.tensors:
            out += [_string(t.name), _U32.pack(len(t.shape))]
            out += [_U64.pack(n) for n in t.shape]
            out += [_U32.pack(t.ggml_type), _U64.pack(t.offset)]
        header = b"".join(out)
        pad = -len(header) % self.alignment
        return header + bytes(pad) + self.data


def _string(text: str) -> bytes:
    raw = text.encode()
    return _U64.pack(len(raw)) + raw


def load_base(path: Path) -> Model:
    info = read_metadata(path)
    data = path.read_bytes()[info.data_offset :]
    fields = {key: bytes(f.raw) for key, f in info.fields.items()}
    return Model(fields, list(info.tensors), data, info.alignment, info.version)


# --------------------------------------------------------------------------- mutations

INTS = [0, 1, 2, 3, 4, 7, 8, 63, 64, 255, 256, 511, 512, 4096, 65535, 65536, 2**31 - 1, 2**32 - 1]
FLOATS = [-1.0, -1e-5, -0.0, 0.0, math.nan, math.inf, -math.inf, 1e30, 1e-45, 0.5, 1e6]
INT_TYPES = [
    GGUFType.UINT32,
    GGUFType.INT32,
    GGUFType.UINT64,
    GGUFType.INT64,
    GGUFType.UINT8,
    GGUFType.INT8,
    GGUFType.UINT16,
    GGUFType.INT16,
]
# keys llama.cpp reads for a llama-arch model that the tiny model does not have
NEW_INT_KEYS = [
    "llama.expert_count",
    "llama.expert_used_count",
    "llama.expert_group_count",
    "llama.expert_group_used_count",
    "llama.nextn_predict_layers",
    "llama.attention.key_length",
    "llama.attention.value_length",
    "llama.vocab_size",
    "llama.attention.sliding_window",
    "llama.rope.scaling.original_context_length",
    "general.alignment",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.mask_token_id",
    "llama.sparsek.top_k",
    "llama.sparsek.window",
    "llama.sparsek.block_size",
    "llama.sparsek.stride",
    "llama.sparsek.sinks",
    "llama.sparsek.dense_layers",
    "llama.embedding_length_out",
    "llama.pooling_type",
]
NEW_FLOAT_KEYS = [
    "llama.rope.freq_base",
    "llama.rope.scaling.factor",
    "llama.rope.scale_linear",
    "llama.attention.layer_norm_epsilon",
    "llama.logit_scale",
    "llama.attn_logit_softcapping",
    "llama.final_logit_softcapping",
    "llama.rope.scaling.attn_factor",
]
NEW_STR_KEYS = {
    "llama.rope.scaling.type": ["linear", "yarn", "none", "longrope", "bogus", ""],
    "tokenizer.ggml.pre": ["default", "llama3", "gpt-2", "bogus", ""],
    "tokenizer.ggml.model": [
        "llama",
        "gpt2",
        "bert",
        "t5",
        "rwkv",
        "plamo2",
        "none",
        "no_vocab",
        "bogus",
        "",
    ],
}
ARRAY_KEYS = [
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.expert_used_count",
    "llama.rope.dimension_sections",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
]
GGML_TYPE_IDS = [0, 1, 2, 3, 8, 12, 14, 24, 25, 26, 27, 28, 30, 39]


def _int_value(rng: random.Random) -> int:
    return rng.choice(INTS) if rng.random() < 0.8 else rng.randrange(0, 2**32)


def _put_int(model: Model, rng: random.Random, key: str) -> str:
    """Mostly the type llama.cpp expects (the file's, else u32), so the value gets checked."""
    raw = model.fields.get(key)
    usual = GGUFType(_U32.unpack_from(raw)[0]) if raw is not None else GGUFType.UINT32
    type_ = usual if usual in INT_TYPES and rng.random() < 0.75 else rng.choice(INT_TYPES)
    value = _int_value(rng)
    if (
        type_ in (GGUFType.INT8, GGUFType.INT16, GGUFType.INT32, GGUFType.INT64)
        and rng.random() < 0.4
    ):
        value = -rng.choice([1, 2, 1000, 2**31])
    bits = {
        GGUFType.UINT8: 8,
        GGUFType.INT8: 8,
        GGUFType.UINT16: 16,
        GGUFType.INT16: 16,
        GGUFType.UINT32: 32,
        GGUFType.INT32: 32,
    }.get(type_, 64)
    signed = type_ in (GGUFType.INT8, GGUFType.INT16, GGUFType.INT32, GGUFType.INT64)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    value = max(lo, min(hi, value))
    model.set(key, type_, value)
    return f"{key}={type_.name}:{value}"


def _put_float(model: Model, rng: random.Random, key: str) -> str:
    type_ = rng.choice([GGUFType.FLOAT32, GGUFType.FLOAT64])
    value = rng.choice(FLOATS)
    model.set(key, type_, value)
    return f"{key}={type_.name}:{value}"


def _put_other_type(model: Model, rng: random.Random, key: str) -> str:
    choice = rng.randrange(5)
    if choice == 0:
        model.set(key, GGUFType.STRING, rng.choice(["", "x", "12", "nan"]))
    elif choice == 1:
        model.set(key, GGUFType.BOOL, rng.random() < 0.5)
    elif choice == 2:
        model.set(key, GGUFType.FLOAT32, rng.choice(FLOATS))
    elif choice == 3:
        n = rng.choice([0, 1, 2, 3, 5, 512, 513])
        model.set(
            key,
            GGUFType.ARRAY,
            GGUFArray(GGUFType.UINT32, tuple(rng.choice(INTS[:12]) for _ in range(n))),
        )
    else:
        model.set(key, GGUFType.ARRAY, GGUFArray(GGUFType.STRING, ("a", "b")))
    return f"{key}=other type"


def mutate_key(model: Model, rng: random.Random) -> str:
    """A key of the file gets a value out of range or of another type."""
    key = rng.choice([k for k in model.fields if not k.startswith("tokenizer.ggml.tokens")])
    raw = model.fields[key]
    (tag,) = _U32.unpack_from(raw)
    if rng.random() < 0.2:
        return _put_other_type(model, rng, key)
    if tag in (GGUFType.FLOAT32, GGUFType.FLOAT64):
        return _put_float(model, rng, key)
    if tag == GGUFType.STRING:
        model.set(key, GGUFType.STRING, rng.choice(["", "llama", "gpt2", "bogus", "\u2581" * 3]))
        return f"{key}=string"
    if tag == GGUFType.ARRAY:
        return mutate_vocab(model, rng)
    return _put_int(model, rng, key)


def add_key(model: Model, rng: random.Random) -> str:
    """A key the file lacks, with a value out of range."""
    kind = rng.randrange(4)
    if kind == 0:
        return _put_int(model, rng, rng.choice(NEW_INT_KEYS))
    if kind == 1:
        return _put_float(model, rng, rng.choice(NEW_FLOAT_KEYS))
    if kind == 2:
        key = rng.choice(list(NEW_STR_KEYS))
        value = rng.choice(NEW_STR_KEYS[key])
        model.set(key, GGUFType.STRING, value)
        return f"{key}={value!r}"
    key = rng.choice(ARRAY_KEYS)
    n = rng.choice([0, 1, 2, 3, 4, 5, 64])
    item = rng.choice([GGUFType.UINT32, GGUFType.INT32, GGUFType.FLOAT32, GGUFType.STRING])
    if item is GGUFType.STRING:
        items: tuple[Any, ...] = tuple(rng.choice(["a b", "\u2581 a", "x", ""]) for _ in range(n))
    elif item is GGUFType.FLOAT32:
        items = tuple(rng.choice(FLOATS) for _ in range(n))
    else:
        items = tuple(rng.choice(INTS[:12]) for _ in range(n))
    model.set(key, GGUFType.ARRAY, GGUFArray(item, items))
    return f"{key}=[{item.name} x {n}]"


def _array_items(model: Model, key: str) -> tuple[GGUFType, list[Any]] | None:
    raw = model.fields.get(key)
    if raw is None or _U32.unpack_from(raw)[0] != GGUFType.ARRAY:
        return None
    (_, item, count) = struct.unpack_from("<IIQ", raw)
    if item == GGUFType.STRING:
        out, pos = [], 16
        for _ in range(count):
            (n,) = _U64.unpack_from(raw, pos)
            out.append(raw[pos + 8 : pos + 8 + n].decode("utf-8", "surrogateescape"))
            pos += 8 + n
        return GGUFType.STRING, out
    fmt = {GGUFType.INT32: "i", GGUFType.FLOAT32: "f", GGUFType.UINT32: "I"}.get(GGUFType(item))
    if fmt is None:
        return None
    return GGUFType(item), list(struct.unpack_from(f"<{count}{fmt}", raw, 16))


def mutate_vocab(model: Model, rng: random.Random) -> str:
    """Duplicate or missing tokens, short or wrong arrays, token ids and types out of range."""
    kind = rng.randrange(7)
    tokens = _array_items(model, "tokenizer.ggml.tokens")
    if kind == 0 and tokens:
        items = tokens[1]
        i, j = rng.sample(range(len(items)), 2)
        items[i] = items[j]
        model.set("tokenizer.ggml.tokens", GGUFType.ARRAY, GGUFArray(GGUFType.STRING, tuple(items)))
        return f"duplicate token {j} at {i}"
    key = rng.choice(
        ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"]
    )
    found = _array_items(model, key)
    if found is None:
        return "vocab: no array"
    item, items = found
    if kind == 1:
        del items[rng.randrange(len(items) + 1) :]
        what = f"{key} cut to {len(items)}"
    elif kind == 2:
        items += items[: rng.choice([1, 5, 300])]
        what = f"{key} grown to {len(items)}"
    elif kind == 3 and item is not GGUFType.STRING:
        i = rng.randrange(len(items))
        items[i] = (
            rng.choice(FLOATS) if item is GGUFType.FLOAT32 else rng.choice([-1, 7, 99, 2**31 - 1])
        )
        what = f"{key}[{i}]={items[i]}"
    elif kind == 4 and item is GGUFType.STRING:
        i = rng.randrange(len(items))
        items[i] = rng.choice(["", "\u2581", "<s>", "\xff", "<0x41>", "<0xZZ>", "a" * 300])
        what = f"{key}[{i}]={items[i]!r}"
    elif kind == 5:
        key = rng.choice(
            [
                "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unk_token_id",
            ]
        )
        return _put_int(model, rng, key)
    else:
        del model.fields[key]
        return f"{key} removed"
    model.set(key, GGUFType.ARRAY, GGUFArray(item, tuple(items)))
    return what


def mutate_tensor(model: Model, rng: random.Random) -> str:
    """A tensor info gets another type, shape or name (data offsets unchanged)."""
    i = rng.randrange(len(model.tensors))
    t = model.tensors[i]
    kind = rng.randrange(4)
    if kind == 0:
        new = TensorInfo(t.name, t.shape, rng.choice(GGML_TYPE_IDS), t.offset, t.nbytes)
        what = f"{t.name} type {new.ggml_type}"
    elif kind == 1:
        shape = list(t.shape)
        d = rng.randrange(len(shape))
        shape[d] = rng.choice([0, 1, shape[d] // 2, shape[d] * 2, 2**31, 2**40])
        if rng.random() < 0.3:
            shape = shape[::-1] if rng.random() < 0.5 else [*shape, 1][:4]
        new = TensorInfo(t.name, tuple(shape), t.ggml_type, t.offset, t.nbytes)
        what = f"{t.name} shape {tuple(shape)}"
    elif kind == 2:
        other = rng.choice(model.tensors).name
        name = rng.choice([other, "", "blk.99.attn_q.weight", "blk.-1.attn_q.weight", t.name + "x"])
        new = TensorInfo(name, t.shape, t.ggml_type, t.offset, t.nbytes)
        what = f"{t.name} renamed {name!r}"
    else:
        del model.tensors[i]
        return f"{t.name} removed"
    model.tensors[i] = new
    return what


def mutate_alignment(model: Model, rng: random.Random) -> str:
    value = rng.choice([1, 2, 4, 8, 16, 64, 3, 0])
    model.set("general.alignment", GGUFType.UINT32, value)
    model.alignment = value if value and not value & (value - 1) else 32
    return f"alignment {value}"


def mutate_override(model: Model, rng: random.Random) -> str:
    """kv_overrides instead of file content (llama.cpp applies them to its own reads)."""
    key = rng.choice(
        [
            "llama.block_count",
            "llama.context_length",
            "llama.embedding_length",
            "llama.attention.head_count",
            "llama.attention.head_count_kv",
            "llama.feed_forward_length",
            "llama.rope.dimension_count",
            "llama.expert_count",
            "llama.expert_used_count",
            "llama.attention.layer_norm_rms_epsilon",
            "llama.rope.freq_base",
            "llama.vocab_size",
            "llama.nextn_predict_layers",
            "tokenizer.ggml.bos_token_id",
            "general.alignment",
        ]
    )
    roll = rng.random()
    value: Any
    if roll < 0.5:
        value = rng.choice([0, 1, 3, 5, 513, -1, 2**31, 2**32 - 1, 2**40])
    elif roll < 0.85:
        value = rng.choice(FLOATS)
    elif roll < 0.95:
        value = rng.random() < 0.5
    else:
        value = rng.choice(["", "x"])
    model.overrides[key] = value
    return f"override {key}={value!r}"


MUTATIONS: list[tuple[Callable[[Model, random.Random], str], int]] = [
    (mutate_key, 30),
    (add_key, 20),
    (mutate_vocab, 10),
    (mutate_tensor, 10),
    (mutate_alignment, 3),
    (mutate_override, 10),
]


def make_case(base: Model, seed: int, index: int) -> tuple[str, bytes, dict[str, Any]]:
    """The mutated file and overrides of case `index` (a pure function of seed and index)."""
    rng = random.Random(f"{seed}:{index}")
    model = Model(dict(base.fields), list(base.tensors), base.data, base.alignment, base.version)
    what = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        funcs, weights = zip(*MUTATIONS, strict=True)
        what.append(rng.choices(funcs, weights)[0](model, rng))
    data = bytearray(model.encode())
    roll = rng.random()
    if roll < 0.08:  # truncated anywhere
        cut = rng.randrange(len(data))
        del data[cut:]
        what.append(f"truncated at {cut}")
    elif roll < 0.14:  # bytes of the header overwritten
        header = len(data) - len(model.data)
        for _ in range(rng.choice([1, 2, 4, 8])):
            pos = rng.randrange(header)
            data[pos] = rng.randrange(256)
            what.append(f"byte {pos}")
    return "; ".join(what), bytes(data), model.overrides


# --------------------------------------------------------------------------- the child


def child_main() -> None:
    """Serve load requests from stdin, one JSON object per line: {"path", "overrides"}."""
    from llama_sparsek import Llama

    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        try:
            with Llama(
                req["path"],
                n_ctx=64,
                n_batch=16,
                n_ubatch=16,
                n_threads=2,
                kv_overrides=req["overrides"] or None,
            ) as llm:
                tokens = llm.tokenize("the cat is in the hat")[:12] or [0]
                llm.eval(tokens)
                llm.eval(list(range(min(4, llm.n_vocab))))
            answer = "ok"
        except Exception as e:
            answer = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        out.write(RESULT + answer + "\n")
        out.flush()


@dataclass
class Outcome:
    index: int
    what: str
    kind: str  # "ok", "error", "signal", "exit", "hang"
    detail: str


class Loader:
    """A long-lived child that loads files one after another; restarted after it dies."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.log = workdir / "child.log"
        self.restarts = 0

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            self.log_file = open(self.log, "w")  # noqa: SIM115 (lives with the child)
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log_file,
                text=True,
                env=self.env,
            )
            self.restarts += 1
        return self.proc

    def load(self, path: Path, overrides: dict[str, Any], timeout: float) -> tuple[str, str]:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        start = self.log.stat().st_size
        try:
            proc.stdin.write(json.dumps({"path": str(path), "overrides": overrides}) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
            if not ready:
                proc.kill()
                proc.wait()
                return "hang", self._log_tail(start)
            line = proc.stdout.readline()
            if not line:  # the child is gone
                rc = proc.wait()
                kind = "signal" if rc < 0 else "exit"
                return kind, f"rc={rc}: {self._log_tail(start)}"
            if line.startswith(RESULT):
                answer = line[len(RESULT) :].strip()
                return ("ok", "") if answer == "ok" else ("error", answer)

    def _log_tail(self, start: int) -> str:
        self.log_file.flush()
        with open(self.log, errors="replace") as f:
            f.seek(start)
            lines = [s for s in f.read().splitlines() if s.strip()]
        # the assert's message, not the debugger's backtrace that ggml may print after it
        found = [s for s in lines if "GGML_ASSERT" in s or "error" in s.lower()]
        return " | ".join(found[:2] or lines[-3:])[-400:]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_cases(
    base_path: Path, seed: int, indices: Sequence[int], workdir: Path, timeout: float = TIMEOUT_S
) -> Iterator[Outcome]:
    base = load_base(base_path)
    loader = Loader(workdir)
    try:
        for i in indices:
            what, data, overrides = make_case(base, seed, i)
            path = workdir / "case.gguf"
            path.write_bytes(data)
            kind, detail = loader.load(path, overrides, timeout)
            yield Outcome(i, what, kind, detail)
    finally:
        loader.close()


# --------------------------------------------------------------------------- the tests


def _check(tiny_model: Path, tmp_path: Path, n: int, seed: int) -> None:
    outcomes = list(run_cases(tiny_model, seed, range(n), tmp_path))
    tally = collections.Counter(o.kind for o in outcomes)
    bad = [o for o in outcomes if o.kind in ("signal", "exit", "hang")]
    bad += [
        o for o in outcomes if o.kind == "error" and o.detail.split(":")[0] not in ALLOWED_ERRORS
    ]
    report = "\n".join(f"case {seed}:{o.index} [{o.what}] {o.kind}: {o.detail}" for o in bad[:20])
    assert not bad, (
        f"{len(bad)} of {n} cases crashed, hung or raised oddly ({dict(tally)}):\n{report}"
    )
    # the mutations must reach llama.cpp: most cases load or fail inside it, not in the pre-check
    assert tally["ok"] > n // 10, dict(tally)


def test_mutated_models_never_kill_the_process(tiny_model: Path, tmp_path: Path) -> None:
    _check(tiny_model, tmp_path, DEFAULT_CASES, seed=1)


@pytest.mark.slow
def test_mutated_models_never_kill_the_process_many(tiny_model: Path, tmp_path: Path) -> None:
    _check(tiny_model, tmp_path, SLOW_CASES, seed=2)


# The reproducers: each used to abort (SIGABRT) or, for the epsilon with 2 threads,
# sometimes hang in ggml's backtrace handler. As overrides and as file content (`gguf set`).
KNOWN_CRASHERS: list[tuple[str, Any, str]] = [
    ("llama.block_count", 0, "block_count"),
    ("llama.block_count", 600, "block_count"),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, "epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", math.nan, "epsilon"),
    ("llama.expert_count", 4, "expert"),
    ("llama.expert_used_count", 2, "expert"),
    ("llama.nextn_predict_layers", 3, "nextn"),
]


@pytest.mark.parametrize("as_file", [False, True])
def test_known_crashers_are_load_errors(tiny_model: Path, tmp_path: Path, as_file: bool) -> None:
    from llama_sparsek.gguf import set_metadata

    loader = Loader(tmp_path)
    try:
        for key, value, message in KNOWN_CRASHERS:
            if not as_file and key == "llama.expert_used_count":
                continue  # read per layer: llama.cpp applies no override to a key a file lacks
            for _ in range(3 if "epsilon" in key else 1):  # the hang was intermittent
                if as_file:
                    path = tmp_path / "edited.gguf"
                    path.unlink(missing_ok=True)
                    type_ = GGUFType.FLOAT32 if isinstance(value, float) else GGUFType.UINT32
                    set_metadata(tiny_model, {key: (type_, value)}, out=path)
                    kind, detail = loader.load(path, {}, TIMEOUT_S)
                else:
                    kind, detail = loader.load(tiny_model, {key: value}, TIMEOUT_S)
                assert kind == "error", (key, value, kind, detail)
                assert detail.startswith("LlamaError") and message in detail, (key, detail)
    finally:
        loader.close()


def test_the_harness_sees_a_crash(tmp_path: Path) -> None:
    """A child that dies by a signal is reported as such (the fuzz test can fail)."""
    loader = Loader(tmp_path, env={"LOAD_FUZZ_ABORT": "1"})
    try:
        kind, _ = loader.load(tmp_path / "none.gguf", {}, TIMEOUT_S)
    finally:
        loader.close()
    assert kind == "signal"


# --------------------------------------------------------------------------- as a script


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case index")
    parser.add_argument("--case", help="SEED:INDEX, one case")
    parser.add_argument("--show", action="store_true", help="print every case's outcome")
    args = parser.parse_args(argv)
    if args.child:
        if os.environ.get("LOAD_FUZZ_ABORT"):
            os.abort()
        child_main()
        return 0
    from conftest import write_tiny_llama

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        base = write_tiny_llama(work / "tiny.gguf")
        if args.case:
            seed, index = (int(x) for x in args.case.split(":"))
            indices: Sequence[int] = [index]
        else:
            seed, indices = args.seed, range(args.start, args.start + args.cases)
        tally: collections.Counter[str] = collections.Counter()
        messages: collections.Counter[str] = collections.Counter()
        start = time.monotonic()
        for o in run_cases(base, seed, indices, work):
            tally[o.kind] += 1
            if o.kind in ("signal", "exit", "hang"):
                print(f"case {seed}:{o.index} [{o.what}] {o.kind}: {o.detail}", flush=True)
                messages[o.detail.split("|")[0][-120:]] += 1
            elif args.show:
                print(f"case {seed}:{o.index} [{o.what}] {o.kind}: {o.detail}", flush=True)
        print(f"{sum(tally.values())} cases in {time.monotonic() - start:.0f} s: {dict(tally)}")
        for msg, n in messages.most_common():
            print(f"{n:5d}  {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
