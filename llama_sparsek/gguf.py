"""Read and edit GGUF metadata (SparseK keys in particular) without touching tensor data.

Layout of a GGUF v2/v3 file (little-endian; v2 and v3 only differ in v3 allowing big-endian):

    "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count     x  string key | u32 type | value
    tensor_count x  string name | u32 n_dims | n_dims x u64 | u32 ggml type | u64 offset
    padding up to a multiple of `general.alignment` (default 32): the data offset
    tensor data; each tensor offset is relative to the data offset

A string is a u64 byte length and its UTF-8 bytes; an array value is u32 item type | u64 count |
items. Because tensor offsets are relative, a new header only moves the data region as a whole:
an edit is "new header + the old data region, byte for byte".

Edits (`edit_metadata`) keep key order and append new keys. In place, when the new header ends
in the same alignment block and the changed bytes fit in one sector, only those bytes are
written (`_plan_patch` says why that is safe); otherwise the file is rewritten: header, then
the data region streamed by the kernel, into a temp file renamed over the target.

Pure stdlib on purpose: the editor must work before numpy or the upstream `gguf` package is
installed, stream multi-GB files in constant memory, and refuse corrupt input with a GGUFError
instead of allocating whatever a damaged length field claims.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import math
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Literal, NamedTuple, TypeAlias

from llama_sparsek import tempfiles
from llama_sparsek.sparsek import (
    KEY_BLOCK_SIZE,
    KEY_DENSE_LAYERS,
    KEY_ENABLE,
    KEY_GROW_TOP_K,
    KEY_PER_GROUP,
    KEY_SINKS,
    KEY_STRIDE,
    KEY_SUFFIXES,
    KEY_SUMMARIES,
    KEY_TOP_K,
    KEY_WINDOW,
    is_sparsek_key,
    recommended,
    sparsek_key,
    validate_block_size,
    validate_value,
    value_type,
)

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
ARCHITECTURE_KEY = "general.architecture"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 65535  # bytes in a key (GGUF spec); also the bound for tensor names

# Storage writes one 512-byte sector atomically (the "power-safe overwrite" that databases rely
# on), so an in-place patch confined to one sector can never leave a torn header behind.
SECTOR = 512
_KERNEL_COPY_CHUNK = 64 << 20  # bytes per copy_file_range/sendfile call
_COPY_BUFFER = 1 << 20  # the read/write fallback's buffer: all the memory a copy takes
# errno values with which copy_file_range/sendfile say "not between these files": fall back.
_KERNEL_COPY_UNSUPPORTED = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PREAMBLE = struct.Struct("<4sIQQ")  # magic, version, tensor_count, kv_count
_MIN_KV_SIZE = 8 + 4 + 1  # key length, type, smallest value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class GGUFError(ValueError):
    """A file or an edit this module refuses; the message says what is wrong and where."""


class GGUFType(IntEnum):
    """GGUF metadata value types (gguf_type in ggml/include/gguf.h)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_FORMATS: dict[GGUFType, str] = {
    GGUFType.UINT8: "B",
    GGUFType.INT8: "b",
    GGUFType.UINT16: "H",
    GGUFType.INT16: "h",
    GGUFType.UINT32: "I",
    GGUFType.INT32: "i",
    GGUFType.FLOAT32: "f",
    GGUFType.BOOL: "?",
    GGUFType.UINT64: "Q",
    GGUFType.INT64: "q",
    GGUFType.FLOAT64: "d",
}
_SIZES = {t: struct.calcsize(f) for t, f in _FORMATS.items()}
INT_TYPES = frozenset(t for t, f in _FORMATS.items() if f in "BbHhIiQq")
FLOAT_TYPES = frozenset({GGUFType.FLOAT32, GGUFType.FLOAT64})

# ggml type id -> (name, elements per block, bytes per block), as in the pinned llama.cpp's
# ggml.h / ggml-common.h. Needed to know where the last tensor ends (truncation check).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("f32", 1, 4),
    1: ("f16", 1, 2),
    2: ("q4_0", 32, 18),
    3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22),
    7: ("q5_1", 32, 24),
    8: ("q8_0", 32, 34),
    9: ("q8_1", 32, 40),
    10: ("q2_K", 256, 84),
    11: ("q3_K", 256, 110),
    12: ("q4_K", 256, 144),
    13: ("q5_K", 256, 176),
    14: ("q6_K", 256, 210),
    15: ("q8_K", 256, 292),
    16: ("iq2_xxs", 256, 66),
    17: ("iq2_xs", 256, 74),
    18: ("iq3_xxs", 256, 98),
    19: ("iq1_s", 256, 50),
    20: ("iq4_nl", 32, 18),
    21: ("iq3_s", 256, 110),
    22: ("iq2_s", 256, 82),
    23: ("iq4_xs", 256, 136),
    24: ("i8", 1, 1),
    25: ("i16", 1, 2),
    26: ("i32", 1, 4),
    27: ("i64", 1, 8),
    28: ("f64", 1, 8),
    29: ("iq1_m", 256, 56),
    30: ("bf16", 1, 2),
    34: ("tq1_0", 256, 54),
    35: ("tq2_0", 256, 66),
    39: ("mxfp4", 32, 17),
    40: ("nvfp4", 64, 36),
    41: ("q1_0", 128, 18),
    42: ("q2_0", 64, 18),
}

Scalar: TypeAlias = int | float | bool | str
Buffer: TypeAlias = bytes | memoryview


@dataclass(frozen=True)
class GGUFArray:
    """An array value: GGUF arrays are homogeneous and cannot nest."""

    item_type: GGUFType
    items: tuple[Scalar, ...]


Value: TypeAlias = Scalar | GGUFArray
Update: TypeAlias = tuple[GGUFType, Value]
Method = Literal["unchanged", "patch", "rewrite"]


@dataclass(frozen=True)
class Field:
    """One metadata key/value pair, kept as its encoded bytes.

    Untouched keys are written back byte for byte from `raw`, and a 150k-entry vocabulary is
    only decoded when someone asks for it (`value`, or `items(limit)` for a preview).
    """

    key: str
    type: GGUFType
    item_type: GGUFType | None  # for arrays
    count: int  # number of items of an array, 1 for a scalar
    raw: Buffer = field(repr=False)  # type tag and value, as stored

    @property
    def type_name(self) -> str:
        return f"ARRAY[{self.item_type.name}]" if self.item_type is not None else self.type.name

    @property
    def value(self) -> Value:
        if self.item_type is not None:
            return GGUFArray(self.item_type, self.items())
        if self.type is GGUFType.STRING:
            return _decode_strings(self.raw, 4, 1)[0]
        scalar: Scalar = struct.unpack_from("<" + _FORMATS[self.type], self.raw, 4)[0]
        return scalar

    def items(self, limit: int | None = None) -> tuple[Scalar, ...]:
        """The first `limit` items (all by default) of an array value."""
        if self.item_type is None:
            raise TypeError(f"{self.key} is a {self.type.name}, not an array")
        count = self.count if limit is None else min(limit, self.count)
        if self.item_type is GGUFType.STRING:
            return _decode_strings(self.raw, 16, count)
        items: tuple[Scalar, ...] = struct.unpack_from(
            f"<{count}{_FORMATS[self.item_type]}", self.raw, 16
        )
        return items


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the data offset
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@dataclass(frozen=True)
class GGUFInfo:
    """What `read_metadata` found: header facts, metadata in file order, tensor infos."""

    path: Path
    version: int
    alignment: int
    header_size: int  # end of the tensor infos, before the alignment padding
    data_offset: int
    file_size: int
    fields: dict[str, Field]
    tensors: tuple[TensorInfo, ...]
    header: bytes = field(repr=False)  # the file up to header_size; fields' raw point into it
    tensor_info_bytes: memoryview = field(repr=False)  # written back unchanged
    stat: os.stat_result = field(repr=False, compare=False)  # to detect concurrent changes

    @property
    def kv_count(self) -> int:
        return len(self.fields)

    @property
    def tensor_count(self) -> int:
        return len(self.tensors)

    @property
    def arch(self) -> str | None:
        """`general.architecture`, the prefix of the SparseK keys."""
        found = self.fields.get(ARCHITECTURE_KEY)
        if found is None or found.type is not GGUFType.STRING:
            return None
        value = found.value
        assert isinstance(value, str)
        return value

    @property
    def metadata(self) -> dict[str, Update]:
        """Every key with its type and decoded value (arrays in full), in file order."""
        return {key: (f.type, f.value) for key, f in self.fields.items()}

    def require_arch(self) -> str:
        arch = self.arch
        if arch is None:
            raise GGUFError(f"{self.path}: no {ARCHITECTURE_KEY} string, cannot name SparseK keys")
        return arch


@dataclass(frozen=True)
class Change:
    key: str
    old: Field | None  # None: the key is new
    new: Field | None  # None: the key is removed


@dataclass(frozen=True)
class EditResult:
    """What an edit did (or, with dry_run, would do).

    method: "unchanged" (nothing to write), "patch" (header bytes rewritten in place, no
    copy) or "rewrite" (a new file: header + streamed data, atomically renamed into place).
    """

    path: Path
    changes: tuple[Change, ...]
    method: Method
    dry_run: bool


# --- reading -----------------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike[str]) -> GGUFInfo:
    """Parse a GGUF file's header; the tensor data is never read, only checked to be there."""
    path = Path(path)
    if not stat.S_ISREG(path.stat().st_mode):  # before open: opening a FIFO would block
        raise GGUFError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        try:
            if st.st_size < len(MAGIC):
                raise GGUFError("not a GGUF file (too short)")
            # Walk the header in a read-only map: skipping a 150k-string vocabulary copies
            # nothing, and every length is checked against the file size before use. Only a
            # header that parsed is then read, once, into memory. (Another process truncating
            # the file during these milliseconds would fault the map: editing a file that is
            # being rewritten is not supported anyway.)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                layout = _parse(buf)
            header = os.pread(f.fileno(), layout.header_size, 0)
            if len(header) < layout.header_size:
                raise GGUFError("the file shrank while it was being read")
            return _info(path, st, header, layout)
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None


class _Span(NamedTuple):
    """Where a key/value pair's encoded value (type tag onwards) lies in the header."""

    key: str
    type: GGUFType
    item_type: GGUFType | None
    n_items: int
    start: int
    end: int


class _Layout(NamedTuple):
    version: int
    kvs: list[_Span]
    tensors: tuple[TensorInfo, ...]
    tensors_start: int
    header_size: int


class _Reader:
    """Bounds-checked little-endian reads from a buffer holding the whole file.

    A length or count that claims more than the rest of the file fails with GGUFError before
    anything is allocated for it.
    """

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            left = self.size - self.pos
            raise GGUFError(
                f"truncated header: {what} at offset {self.pos} needs {n} bytes, {left} left"
            )

    def check_count(self, count: int, min_size: int, what: str) -> None:
        left = self.size - self.pos
        if count * min_size > left:
            raise GGUFError(f"{what} {count} cannot fit in the {left} bytes left in the file")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(value)

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def name(self, what: str) -> str:
        """A key or tensor name: at most MAX_NAME bytes, as the GGUF spec says for keys."""
        n = self.u64(f"{what} length")
        if n > MAX_NAME:
            raise GGUFError(f"{what} at offset {self.pos - 8} is {n} bytes long, over {MAX_NAME}")
        self.need(n, what)
        start, self.pos = self.pos, self.pos + n
        return self.buf[start : self.pos].decode("utf-8", "surrogateescape")

    def skip_strings(self, count: int, what: str) -> None:
        """Skip `count` strings: the hot loop of a vocabulary, hence its terse form.

        Reading a length past the end of the buffer is what stops a truncated array.
        """
        self.check_count(count, 8, f"{what}: array length")
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        try:
            for _ in itertools.repeat(None, count):
                (n,) = unpack(buf, pos)
                pos += 8 + n
        except (struct.error, OverflowError):
            pos = self.size + 1
        if pos > self.size:
            raise GGUFError(f"truncated header: the strings of {what} run past the end of the file")
        self.pos = pos


def _parse(buf: mmap.mmap) -> _Layout:
    r = _Reader(buf)
    if buf[: len(MAGIC)] != MAGIC:
        raise GGUFError("not a GGUF file (no GGUF magic)")
    r.need(_PREAMBLE.size, "header")
    _, version, tensor_count, kv_count = _PREAMBLE.unpack_from(buf)
    r.pos = _PREAMBLE.size
    _check_version(version)
    left = r.size - r.pos
    if kv_count * _MIN_KV_SIZE + tensor_count * _MIN_TENSOR_INFO_SIZE > left:
        raise GGUFError(
            f"the header declares {kv_count} keys and {tensor_count} tensors, "
            f"more than the {left} bytes after it can hold"
        )
    kvs: list[_Span] = []
    keys: set[str] = set()
    for _ in range(kv_count):
        kv = _parse_field(r)
        if kv.key in keys:
            raise GGUFError(f"duplicate key {kv.key!r}")
        keys.add(kv.key)
        kvs.append(kv)
    tensors_start = r.pos
    tensors = tuple(_parse_tensor(r) for _ in range(tensor_count))
    if len({t.name for t in tensors}) != len(tensors):
        raise GGUFError("duplicate tensor names")
    return _Layout(version, kvs, tensors, tensors_start, r.pos)


def _info(path: Path, st: os.stat_result, header: bytes, layout: _Layout) -> GGUFInfo:
    view = memoryview(header)
    fields = {
        kv.key: Field(kv.key, kv.type, kv.item_type, kv.n_items, view[kv.start : kv.end])
        for kv in layout.kvs
    }
    alignment = _alignment(fields)
    data_offset = _align(layout.header_size, alignment)
    data_size = max((t.offset + t.nbytes for t in layout.tensors), default=0)
    if layout.tensors and st.st_size < data_offset + data_size:
        raise GGUFError(
            f"truncated tensor data: the tensors need {data_size} bytes from offset "
            f"{data_offset}, the file has {max(0, st.st_size - data_offset)}"
        )
    return GGUFInfo(
        path=path,
        version=layout.version,
        alignment=alignment,
        header_size=layout.header_size,
        data_offset=data_offset,
        file_size=st.st_size,
        fields=fields,
        tensors=layout.tensors,
        header=header,
        tensor_info_bytes=view[layout.tensors_start :],
        stat=st,
    )


def _check_version(version: int) -> None:
    if version & 0xFFFF == 0 and version != 0:
        raise GGUFError(f"version field {version:#x}: a big-endian GGUF file, not supported")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"unsupported GGUF version {version} (supported: 2, 3)")


def _value_type(tag: int, key: str) -> GGUFType:
    try:
        return GGUFType(tag)
    except ValueError:
        raise GGUFError(f"key {key!r} has invalid type {tag}") from None


def _parse_field(r: _Reader) -> _Span:
    key = r.name("key")
    if not key:
        raise GGUFError(f"empty key at offset {r.pos}")
    start = r.pos
    type_ = _value_type(r.u32(f"type of {key!r}"), key)
    if type_ is GGUFType.STRING:
        r.skip(r.u64(f"length of {key!r}"), f"value of {key!r}")
    elif type_ is not GGUFType.ARRAY:
        r.skip(_SIZES[type_], f"value of {key!r}")
    if type_ is not GGUFType.ARRAY:
        return _Span(key, type_, None, 1, start, r.pos)
    item_type = _value_type(r.u32(f"item type of {key!r}"), key)
    if item_type is GGUFType.ARRAY:
        raise GGUFError(f"key {key!r}: nested arrays are not supported")
    count = r.u64(f"length of {key!r}")
    if item_type is GGUFType.STRING:
        r.skip_strings(count, f"key {key!r}")
    else:
        r.check_count(count, _SIZES[item_type], f"key {key!r}: array length")
        r.skip(count * _SIZES[item_type], f"value of {key!r}")
    return _Span(key, type_, item_type, count, start, r.pos)


def _parse_tensor(r: _Reader) -> TensorInfo:
    name = r.name("tensor name")
    n_dims = r.u32(f"dimension count of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise GGUFError(f"tensor {name!r} has {n_dims} dimensions, at most {MAX_DIMS} allowed")
    shape = tuple(r.u64(f"shape of tensor {name!r}") for _ in range(n_dims))
    ggml_type = r.u32(f"type of tensor {name!r}")
    offset = r.u64(f"offset of tensor {name!r}")
    if ggml_type not in GGML_TYPES:
        raise GGUFError(f"tensor {name!r} has unknown ggml type {ggml_type}")
    _, block, block_bytes = GGML_TYPES[ggml_type]
    row = shape[0] if shape else 1
    if row % block:
        raise GGUFError(
            f"tensor {name!r}: a row of {row} elements is not a multiple "
            f"of its type's block size {block}"
        )
    nbytes = math.prod(shape) // block * block_bytes
    return TensorInfo(name, shape, ggml_type, offset, nbytes)


def _alignment(fields: Mapping[str, Field]) -> int:
    """The data alignment the fields declare, validated as llama.cpp does."""
    found = fields.get(ALIGNMENT_KEY)
    if found is None:
        return DEFAULT_ALIGNMENT
    if found.type is not GGUFType.UINT32:
        raise GGUFError(f"{ALIGNMENT_KEY} must be UINT32, not {found.type_name}")
    value = found.value
    assert isinstance(value, int)
    if value == 0 or value & (value - 1):
        raise GGUFError(f"{ALIGNMENT_KEY} {value} is not a power of two")
    return value


def _align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


def _decode_strings(raw: Buffer, pos: int, count: int) -> tuple[str, ...]:
    out = []
    for _ in range(count):
        (n,) = _U64.unpack_from(raw, pos)
        out.append(str(raw[pos + 8 : pos + 8 + n], "utf-8", "surrogateescape"))
        pos += 8 + n
    return tuple(out)


# --- encoding ----------------------------------------------------------------------------------


def _encode_string(value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    return _U64.pack(len(data)) + data


def _accepts(type_: GGUFType, value: object) -> bool:
    if type_ is GGUFType.BOOL:
        return isinstance(value, bool)
    if type_ is GGUFType.STRING:
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (type_ in FLOAT_TYPES and isinstance(value, float))


def _encode_scalar(key: str, type_: GGUFType, value: object) -> bytes:
    if not _accepts(type_, value):
        raise GGUFError(f"key {key!r}: {value!r} is not a valid {type_.name} value")
    if isinstance(value, str):
        return _encode_string(value)
    try:
        return struct.pack("<" + _FORMATS[type_], value)
    except (struct.error, OverflowError):
        raise GGUFError(f"key {key!r}: {value!r} does not fit in {type_.name}") from None


def make_field(key: str, type_: GGUFType, value: Value) -> Field:
    """Encode one key/value pair, checking that the value fits the type."""
    if not key:
        raise GGUFError("empty key")
    type_ = _value_type(type_, key)
    if type_ is not GGUFType.ARRAY:
        raw = _U32.pack(type_) + _encode_scalar(key, type_, value)
        return Field(key, type_, None, 1, raw)
    if not isinstance(value, GGUFArray) or value.item_type is GGUFType.ARRAY:
        raise GGUFError(f"key {key!r}: an ARRAY value must be a GGUFArray of scalars")
    item_type = _value_type(value.item_type, key)
    items = b"".join(_encode_scalar(key, item_type, v) for v in value.items)
    raw = _U32.pack(type_) + _U32.pack(item_type) + _U64.pack(len(value.items)) + items
    return Field(key, type_, item_type, len(value.items), raw)


def _header_pieces(info: GGUFInfo, fields: Mapping[str, Field]) -> list[Buffer]:
    """The new header as the pieces it is made of: untouched values are views of the old
    header, so a rewrite streams them out without ever holding a second copy."""
    pieces: list[Buffer] = [_PREAMBLE.pack(MAGIC, info.version, len(info.tensors), len(fields))]
    for key, kv in fields.items():
        pieces += (_encode_string(key), kv.raw)
    pieces.append(info.tensor_info_bytes)
    return pieces


# --- editing -----------------------------------------------------------------------------------


def set_metadata(
    path: str | os.PathLike[str],
    updates: Mapping[str, Update] | None = None,
    remove: Iterable[str] = (),
    *,
    out: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    dry_run: bool = False,
) -> EditResult:
    """Set `updates` ({key: (type, value)}) and delete the `remove` keys.

    Existing keys keep their position, new ones are appended. Write to `out` or `in_place`
    (exactly one, unless `dry_run`). See `edit_metadata`.
    """
    return edit_metadata(
        read_metadata(path), updates, remove, out=out, in_place=in_place, dry_run=dry_run
    )


def set_sparsek(
    path: str | os.PathLike[str],
    *,
    top_k: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    block_size: int | None = None,
    sinks: int | None = None,
    dense_layers: int | None = None,
    summaries: int | None = None,
    grow_top_k: int | None = None,
    per_group: int | None = None,
    enable: bool | None = None,
    out: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    dry_run: bool = False,
) -> EditResult:
    """Write `<arch>.sparsek.*` keys; `enable=True` alone writes the recommended settings."""
    info = read_metadata(path)
    updates = sparsek_updates(
        info,
        top_k=top_k,
        window=window,
        stride=stride,
        block_size=block_size,
        sinks=sinks,
        dense_layers=dense_layers,
        summaries=summaries,
        grow_top_k=grow_top_k,
        per_group=per_group,
        enable=enable,
    )
    return edit_metadata(info, updates, out=out, in_place=in_place, dry_run=dry_run)


def unset_sparsek(
    path: str | os.PathLike[str],
    keys: Iterable[str] = (),
    *,
    out: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    dry_run: bool = False,
) -> EditResult:
    """Remove every `<arch>.sparsek.*` key, or only `keys` (see `sparsek_removals`)."""
    info = read_metadata(path)
    return edit_metadata(
        info, remove=sparsek_removals(info, keys), out=out, in_place=in_place, dry_run=dry_run
    )


def sparsek_updates(
    info: GGUFInfo,
    *,
    top_k: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    block_size: int | None = None,
    sinks: int | None = None,
    dense_layers: int | None = None,
    summaries: int | None = None,
    grow_top_k: int | None = None,
    per_group: int | None = None,
    enable: bool | None = None,
) -> dict[str, Update]:
    """The updates that write the given SparseK settings under the file's architecture.

    `enable=True` with no other setting means "turn it on with the project's defaults", so all
    keys are written from `recommended(arch)`.
    """
    arch = info.require_arch()
    settings = {
        KEY_TOP_K: top_k,
        KEY_WINDOW: window,
        KEY_STRIDE: stride,
        KEY_BLOCK_SIZE: block_size,
        KEY_SINKS: sinks,
        KEY_DENSE_LAYERS: dense_layers,
        KEY_SUMMARIES: summaries,
        KEY_GROW_TOP_K: grow_top_k,
        KEY_PER_GROUP: per_group,
    }
    if enable is True and all(v is None for v in settings.values()):
        settings = dict(recommended(arch).values())
    updates: dict[str, Update] = {}
    if enable is not None:
        updates[sparsek_key(arch, KEY_ENABLE)] = (sparsek_type(KEY_ENABLE), enable)
    for suffix, value in settings.items():
        if value is not None:
            updates[sparsek_key(arch, suffix)] = (sparsek_type(suffix), value)
    if not updates:
        raise GGUFError(
            "nothing to set: give top_k, window, stride, block_size, sinks, dense_layers, "
            "summaries, grow_top_k, per_group or enable"
        )
    return updates


def sparsek_removals(info: GGUFInfo, keys: Iterable[str] = ()) -> list[str]:
    """The keys to remove: all `<arch>.sparsek.*` keys, or the named ones.

    A name that is not a key of the file but a SparseK suffix (`top_k`) means the arch's key.
    """
    names = list(keys)
    if not names:
        prefix = f"{info.require_arch()}.sparsek."
        return [key for key in info.fields if key.startswith(prefix)]
    found = []
    for name in names:
        if name not in info.fields and name in KEY_SUFFIXES:
            name = sparsek_key(info.require_arch(), name)
        if name not in info.fields:
            raise GGUFError(f"{info.path}: no key {name!r}")
        found.append(name)
    return found


# llama.cpp --override-kv types: the kinds of GGUF type each accepts, and the type of a new key
# (llama.cpp's override holds an int64 or a double, so these lose nothing it would accept).
_OVERRIDE_KINDS: dict[str, tuple[frozenset[GGUFType], GGUFType]] = {
    "int": (INT_TYPES, GGUFType.INT64),
    "float": (FLOAT_TYPES, GGUFType.FLOAT64),
    "bool": (frozenset({GGUFType.BOOL}), GGUFType.BOOL),
    "str": (frozenset({GGUFType.STRING}), GGUFType.STRING),
}
# Exact types, for a new key whose reader expects another width (llama.cpp reads most integer
# hyperparameters as u32) or to change the type of an existing key.
_EXACT_TYPES = {
    "u8": GGUFType.UINT8,
    "i8": GGUFType.INT8,
    "u16": GGUFType.UINT16,
    "i16": GGUFType.INT16,
    "u32": GGUFType.UINT32,
    "i32": GGUFType.INT32,
    "u64": GGUFType.UINT64,
    "i64": GGUFType.INT64,
    "f32": GGUFType.FLOAT32,
    "f64": GGUFType.FLOAT64,
}


def parse_kv_override(spec: str, info: GGUFInfo) -> tuple[str, Update]:
    """Parse `KEY=TYPE:VALUE` (llama.cpp's --override-kv syntax) into an update for this file.

    TYPE int, float, bool or str: a key the file has with a type of that kind keeps its type;
    a new key becomes INT64, FLOAT64, BOOL or STRING; the SparseK top_k/window/stride keys are
    always UINT32. TYPE u8..u64, i8..i64, f32 or f64 names the exact type instead. Unlike
    llama.cpp, numbers must parse in full and strings are not limited to 127 bytes.
    """
    key, eq, rest = spec.partition("=")
    kind, colon, text = rest.partition(":")
    if not (key and eq and colon):
        raise GGUFError(f"malformed override {spec!r}: expected KEY=TYPE:VALUE")
    type_ = _override_type(info, key, kind)
    try:
        return key, (type_, _parse_scalar(type_, text))
    except ValueError:
        raise GGUFError(f"override {spec!r}: {text!r} is not a {type_.name} value") from None


def _override_type(info: GGUFInfo, key: str, kind: str) -> GGUFType:
    if kind in _EXACT_TYPES:
        return _EXACT_TYPES[kind]
    if kind not in _OVERRIDE_KINDS:
        names = ", ".join([*_OVERRIDE_KINDS, *_EXACT_TYPES])
        raise GGUFError(f"override of {key!r}: unknown type {kind!r} (expected one of {names})")
    suffix = key.rsplit(".", 1)[-1]
    if (
        kind == "int"
        and is_sparsek_key(key)
        and suffix in KEY_SUFFIXES
        and value_type(suffix) is int
    ):
        return sparsek_type(suffix)  # not INT64: llama.cpp reads the sizes as u32
    family, new_key_type = _OVERRIDE_KINDS[kind]
    existing = info.fields.get(key)
    if existing is None:
        return new_key_type
    if existing.type in family:
        return existing.type
    raise GGUFError(
        f"{key} is {existing.type_name}, not {kind}: name an exact type (e.g. u32:) to change it"
    )


def _parse_scalar(type_: GGUFType, text: str) -> Scalar:
    """Raises ValueError when `text` is not a value of the type."""
    if type_ is GGUFType.BOOL:
        if text not in ("true", "false"):
            raise ValueError(text)
        return text == "true"
    if type_ in INT_TYPES:
        return int(text)
    if type_ in FLOAT_TYPES:
        return float(text)
    return text


def edit_metadata(
    info: GGUFInfo,
    updates: Mapping[str, Update] | None = None,
    remove: Iterable[str] = (),
    *,
    out: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    dry_run: bool = False,
) -> EditResult:
    """Apply an edit to the file `info` was read from.

    In place, the header is patched directly when only a few bytes of it change and the data
    offset stays put (see `_plan_patch`); otherwise, and always for `out`, a new file is written
    next to the destination and renamed over it, so the destination is either the old or the
    new file, never a mix. A dry run without a destination reports what `in_place` would do.
    """
    dest = _destination(info, out, in_place, dry_run)
    fields, changes = _apply(info, updates or {}, remove)
    pieces = _header_pieces(info, fields)
    patch = None
    if out is not None:
        method: Method = "rewrite"
    elif not changes:
        method = "unchanged"
    else:
        patch = _plan_patch(info, b"".join(pieces))
        method = "rewrite" if patch is None else "patch"
    if not dry_run:
        if patch is not None:
            _write_patch(info, *patch)
        elif method == "rewrite":
            _rewrite(info, pieces, dest)
    return EditResult(dest, tuple(changes), method, dry_run)


def _destination(
    info: GGUFInfo, out: str | os.PathLike[str] | None, in_place: bool, dry_run: bool
) -> Path:
    """The real path to write; symlinks are followed so that the link itself is kept."""
    if out is not None and in_place:
        raise GGUFError("give an output path or in_place, not both")
    if out is None and not in_place and not dry_run:
        raise GGUFError("say where to write: an output path (-o OUT) or in place (--in-place)")
    dest = Path(os.path.realpath(info.path if out is None else out))
    if dest.is_dir():
        raise GGUFError(f"{dest} is a directory, not a file to write")
    if not dest.parent.is_dir():
        raise GGUFError(f"{dest.parent} is not a directory")
    if out is not None:
        try:
            st = dest.stat()
        except FileNotFoundError:
            return dest
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would be replaced by a file
            raise GGUFError(f"{out}: not a regular file; refusing to replace it")
        if (st.st_dev, st.st_ino) == (info.stat.st_dev, info.stat.st_ino):
            raise GGUFError(
                f"{out} is the input file itself (-o leaves the input untouched): "
                "use --in-place to edit it"
            )
    return dest


def _apply(
    info: GGUFInfo, updates: Mapping[str, Update], remove: Iterable[str]
) -> tuple[dict[str, Field], list[Change]]:
    """The new fields and the changes that lead to them; every check of an edit is here."""
    gone = list(dict.fromkeys(remove))
    for key in gone:
        if key not in info.fields:
            raise GGUFError(f"{info.path}: no key {key!r} to remove")
        if key in updates:
            raise GGUFError(f"key {key!r} is both set and removed")
    fields = {key: kv for key, kv in info.fields.items() if key not in gone}
    changes = [Change(key, info.fields[key], None) for key in gone]
    for key, (tag, value) in updates.items():
        type_ = _value_type(tag, key)
        if is_sparsek_key(key):
            _check_sparsek(key, type_, value)
        new = make_field(key, type_, value)
        old = fields.get(key)
        if old is None or old.raw != new.raw:
            fields[key] = new
            changes.append(Change(key, old, new))
    _check_sparsek_blocks(fields)
    if _alignment(fields) != info.alignment:
        raise GGUFError(
            f"{ALIGNMENT_KEY} cannot change: the tensor data is laid out "
            f"for alignment {info.alignment}"
        )
    return fields, changes


def sparsek_type(key: str) -> GGUFType:
    """The GGUF type of a SparseK key (suffix or full key), as the patched llama.cpp reads it:
    BOOL for the flag, UINT32 for the sizes (see `sparsek.value_type`)."""
    return GGUFType.BOOL if value_type(key) is bool else GGUFType.UINT32


def _check_sparsek(key: str, type_: GGUFType, value: Value) -> None:
    """SparseK keys must have the types the patched llama.cpp reads and valid values."""
    suffix = key.rsplit(".", 1)[1]
    if suffix not in KEY_SUFFIXES:
        raise GGUFError(f"unknown SparseK key {key!r}: the suffix must be one of {KEY_SUFFIXES}")
    expected = sparsek_type(suffix)
    if type_ != expected:
        raise GGUFError(f"{key} must be {expected.name}, not {type_.name}")
    if suffix != KEY_ENABLE and isinstance(value, int):  # other values fail in make_field
        try:
            validate_value(suffix, value)
        except ValueError as e:
            raise GGUFError(str(e)) from None


def _check_sparsek_blocks(fields: Mapping[str, Field]) -> None:
    """llama.cpp refuses a block size that does not divide top_k or exceeds the window: refuse
    to write such a top_k, window and block size (a file without one of them is left to the
    load, which fails on a missing top_k anyway)."""
    prefixes = {key.rsplit(".", 1)[0] for key in fields if is_sparsek_key(key)}
    for prefix in prefixes:
        got = [fields.get(f"{prefix}.{s}") for s in (KEY_TOP_K, KEY_WINDOW, KEY_BLOCK_SIZE)]
        if any(kv is None for kv in got):
            continue
        k, w, b = (kv.value for kv in got if kv is not None)
        if isinstance(k, int) and isinstance(w, int) and isinstance(b, int) and b > 1:
            try:
                validate_block_size(k, w, b)
            except ValueError as e:
                raise GGUFError(str(e)) from None


def _plan_patch(info: GGUFInfo, header: bytes) -> tuple[int, bytes] | None:
    """The (offset, bytes) that turn the old header into `header` in place, if that is safe.

    Readers find the data at align(end of header), so the new header must end in the same
    alignment block as the old one (the rest of the block is zero padding). On top of that,
    the bytes to write must lie within one 512-byte sector: such a write is atomic on storage,
    so a crash leaves either the old or the new header, never a torn one. This covers the
    common edit, a SparseK value replaced by one of the same size (1 to 4 bytes change);
    larger header changes take the atomic full rewrite instead.
    """
    old = info.header
    if _align(len(header), info.alignment) != info.data_offset or info.file_size < info.data_offset:
        return None
    start = _first_difference(old, header)
    if len(header) == len(old):
        end = _last_difference(old, header) + 1
    else:  # everything after the first change moved; a shorter header leaves zero padding
        end = max(len(header), len(old))
    if start >= end or start // SECTOR != (end - 1) // SECTOR:
        return None
    return start, header[start:end].ljust(end - start, b"\0")


def _first_difference(a: bytes, b: bytes, block: int = 4096) -> int:
    """Index of the first byte where `a` and `b` differ (the shorter length if none)."""
    n = min(len(a), len(b))
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        if a[lo:hi] != b[lo:hi]:
            return next(i for i in range(lo, hi) if a[i] != b[i])
    return n


def _last_difference(a: bytes, b: bytes, block: int = 4096) -> int:
    """Index of the last byte where equal-length `a` and `b` differ (-1 if none)."""
    for hi in range(len(a), 0, -block):
        lo = max(0, hi - block)
        if a[lo:hi] != b[lo:hi]:
            return next(i for i in range(hi - 1, lo - 1, -1) if a[i] != b[i])
    return -1


def _write_patch(info: GGUFInfo, offset: int, data: bytes) -> None:
    with _locked_source(info, os.O_RDWR) as fd:
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError(errno.EIO, "short write", str(info.path))
        os.fsync(fd)


@contextlib.contextmanager
def _locked_source(info: GGUFInfo, flags: int = os.O_RDONLY) -> Iterator[int]:
    """The file `info` was read from, opened and exclusively locked (flock) until the edit is
    written, after checking that it is still that file with that header.

    Editors take this lock around their check and their write (a patch, or the copy and the
    rename), so of two concurrent edits of one file, the second sees the first's result and
    fails ("changed since it was read") instead of silently overwriting it.
    """
    fd = os.open(info.path, flags)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _check_unchanged(info, fd)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _check_unchanged(info: GGUFInfo, fd: int) -> None:
    """Refuse to write from a stale `info`: offsets would no longer match the file.

    The path must still name the open file (a rewrite renames a new one over it), with the
    same size and mtime, and the same header bytes (mtimes are only as fine as the kernel's
    clock tick, so a header patch a moment ago may not show in them).
    """
    now, then = os.fstat(fd), info.stat
    try:
        named = os.stat(info.path)
    except FileNotFoundError:
        named = None
    if (
        named is None
        or (named.st_dev, named.st_ino) != (now.st_dev, now.st_ino)
        or (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns)
        != (then.st_dev, then.st_ino, then.st_size, then.st_mtime_ns)
        or os.pread(fd, len(info.header), 0) != info.header
    ):
        raise GGUFError(f"{info.path} changed since it was read; run the edit again")


def _rewrite(info: GGUFInfo, pieces: list[Buffer], dest: Path) -> None:
    """Write the header pieces, padding and the old data region to a temp file next to `dest`,
    then rename it over `dest`. Any failure (or Ctrl-C) removes the temp file and leaves `dest`
    as it was."""
    header_size = sum(len(p) for p in pieces)
    new_offset = _align(header_size, info.alignment)
    data_size = max(0, info.file_size - info.data_offset)
    with _locked_source(info) as src_fd, open(src_fd, "rb", closefd=False) as src:
        fd, tmp = tempfiles.mkstemp(dest)  # a killed rewrite's temp file is removed here
        try:
            try:
                os.fchmod(fd, stat.S_IMODE(info.stat.st_mode))
                with open(fd, "wb", closefd=False) as header:
                    header.writelines(pieces)
                    header.write(bytes(new_offset - header_size))
                _copy_data(src.fileno(), fd, info.data_offset, new_offset, data_size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    _fsync_dir(dest.parent)


def _copy_data(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy `length` bytes between files in constant memory.

    copy_file_range first (in-kernel, and extent sharing on btrfs/XFS), then sendfile, then
    reads and writes through one small buffer, each picking up where the previous one stopped.
    """
    buffer = memoryview(bytearray(_COPY_BUFFER))

    def copy_file_range(pos: int, count: int) -> int:
        return os.copy_file_range(src, dst, count, src_offset + pos, dst_offset + pos)

    def sendfile(pos: int, count: int) -> int:
        os.lseek(dst, dst_offset + pos, os.SEEK_SET)
        return os.sendfile(dst, src, src_offset + pos, count)

    def read_write(pos: int, count: int) -> int:
        n = os.preadv(src, [buffer[:count]], src_offset + pos)
        return os.pwrite(dst, buffer[:n], dst_offset + pos) if n else 0

    done = _copy_loop(copy_file_range, length, 0, _KERNEL_COPY_CHUNK, _KERNEL_COPY_UNSUPPORTED)
    done = _copy_loop(sendfile, length, done, _KERNEL_COPY_CHUNK, _KERNEL_COPY_UNSUPPORTED)
    done = _copy_loop(read_write, length, done, len(buffer), frozenset())
    if done < length:
        raise GGUFError(
            f"the tensor data ended after {done} of {length} bytes; "
            "was the file truncated while copying?"
        )


def _copy_loop(
    copy: Callable[[int, int], int],
    length: int,
    done: int,
    chunk: int,
    unsupported: frozenset[int],
) -> int:
    """Call `copy(pos, count)` until `length` bytes are done, it stops or is unsupported."""
    while done < length:
        try:
            n = copy(done, min(length - done, chunk))
        except OSError as e:
            if e.errno in unsupported:
                break
            raise
        if n == 0:
            break
        done += n
    return done


def _fsync_dir(path: Path) -> None:
    """Make the rename durable: it is an update of the directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
