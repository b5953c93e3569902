"""State files: a context's tokens and KV cache, saved to disk and loaded into another `Llama`.

Layout (little-endian):

    magic  b"LSKSTATE"          8 bytes
    version                     u32 (FORMAT_VERSION)
    header length               u32
    header                      UTF-8 JSON: what must match to load the file (`Header`)
    tokens                      i32 x header.n_tokens
    state                       header.state_bytes bytes: llama.cpp's sequence state of seq 0

A file is written to a temporary file in the same directory, synced, then renamed over the
destination: readers never see half a file. Reading checks the header against the loading
`Llama` and the file's size and checksum before anything is handed to llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llama_sparsek.gguf import read_metadata

MAGIC = b"LSKSTATE"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_MAX_HEADER = 1 << 20
_IDENTITY_DATA_BYTES = 1 << 20  # tensor data hashed into a model's identity


class StateFileError(ValueError):
    """A state file that cannot be loaded here: foreign, truncated, or from another set-up."""


def model_identity(path: Path) -> dict[str, Any]:
    """A cheap fingerprint of a GGUF file: its size and a hash of its whole header (metadata and
    tensor infos, so also SparseK keys written into the file) and first MiB of tensor data."""
    info = read_metadata(path)
    digest = hashlib.sha256(info.header)
    with open(path, "rb") as f:
        f.seek(info.data_offset)
        digest.update(f.read(_IDENTITY_DATA_BYTES))
    return {"size": info.file_size, "sha256": digest.hexdigest()}


@dataclass(frozen=True)
class Header:
    """What a state file records about the context it came from.

    `compatibility()` is what a loading context must equal; n_ctx is informative (a context of
    any size that holds n_tokens can load the file)."""

    model: dict[str, Any]
    sparsek: dict[str, int] | None
    type_k: str
    type_v: str
    flash_attn: bool
    n_ctx: int
    n_tokens: int
    state_bytes: int
    state_sha256: str

    def compatibility(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "SparseK settings": self.sparsek,
            "K cache type": self.type_k,
            "V cache type": self.type_v,
            "flash attention": self.flash_attn,
        }

    @classmethod
    def from_json(cls, raw: bytes) -> Header:
        try:
            data = json.loads(raw.decode("utf-8"))
            header = cls(**data)
        except (UnicodeDecodeError, ValueError, TypeError) as e:
            raise StateFileError(f"unreadable header ({e})") from None
        for name in ("n_ctx", "n_tokens", "state_bytes"):
            value = getattr(header, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise StateFileError(f"bad {name} in header: {value!r}")
        return header


def check_compatible(header: Header, expected: dict[str, Any]) -> None:
    """Raise StateFileError naming every setting that differs from the loading context's."""
    found = header.compatibility()
    diffs = [
        f"{name}: file {found[name]!r}, this Llama {value!r}"
        for name, value in expected.items()
        if found.get(name) != value
    ]
    if diffs:
        raise StateFileError("the state was saved with other settings; " + "; ".join(diffs))


def write(path: Path, header: Header, tokens: Sequence[int], state: Any) -> None:
    """Write atomically: a temporary file next to `path`, fsync'd, renamed over it."""
    raw = json.dumps(asdict(header), sort_keys=True).encode()
    token_bytes = np.asarray(tokens, dtype="<i4").tobytes()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(raw)))
            f.write(raw)
            f.write(token_bytes)
            f.write(state)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(f: BinaryIO, size: int) -> tuple[Header, int]:
    """The header and the offset of the tokens; checks the file's total size against it."""
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
        raise StateFileError("not a llama-sparsek state file (bad magic)")
    _, version, header_len = _PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise StateFileError(f"state file version {version}, this build reads {FORMAT_VERSION}")
    if header_len > _MAX_HEADER:
        raise StateFileError(f"header length {header_len} is implausible")
    raw = f.read(header_len)
    if len(raw) < header_len:
        raise StateFileError("truncated header")
    header = Header.from_json(raw)
    offset = _PREFIX.size + header_len
    expected = offset + 4 * header.n_tokens + header.state_bytes
    if size != expected:
        raise StateFileError(
            f"the file has {size} bytes, its header describes {expected} (truncated or altered)"
        )
    return header, offset


def read_body(f: BinaryIO, header: Header) -> tuple[list[int], bytes]:
    """The tokens and the state bytes (checksum verified); `f` is positioned after the header."""
    token_bytes = f.read(4 * header.n_tokens)
    state = f.read(header.state_bytes)
    if len(token_bytes) != 4 * header.n_tokens or len(state) != header.state_bytes:
        raise StateFileError("truncated body")
    if hashlib.sha256(state).hexdigest() != header.state_sha256:
        raise StateFileError("the state's checksum does not match (corrupted file)")
    tokens = np.frombuffer(token_bytes, dtype="<i4").astype(np.int64).tolist()
    return tokens, state
