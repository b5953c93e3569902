"""Property tests: a corrupted GGUF is refused with GGUFError, never with another exception, and
an edit of a refused file writes nothing; a corruption the reader accepts still edits cleanly."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf as upstream  # the independent reader: a test dependency, never skipped
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llama_sparsek.cli_gguf import app
from llama_sparsek.gguf import (
    GGUFError,
    GGUFInfo,
    GGUFType,
    read_metadata,
    set_metadata,
    set_sparsek,
    unset_sparsek,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HUGE = [2**32, 2**40, 2**62, 2**63, 2**64 - 1]


def _seed() -> tuple[bytes, int]:
    """A small valid model (every value kind, a vocabulary, quantized tensors), header size."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "seed.gguf"
        w = upstream.GGUFWriter(str(path), "llama")
        w.add_name("seed")
        w.add_context_length(128)
        w.add_float32("test.f32", 0.5)
        w.add_bool("test.bool", True)
        w.add_int64("test.i64", -1)
        w.add_array("test.ints", [1, 2, 3])
        w.add_token_list([f"t{i}" for i in range(20)])
        q8_0 = upstream.GGMLQuantizationType.Q8_0
        w.add_tensor("q", np.zeros((2, 34), dtype=np.uint8), raw_dtype=q8_0)
        w.add_tensor("f", np.ones((2, 8), dtype=np.float32))  # 64 bytes: no padding after it
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        info = read_metadata(path)
        last = info.tensors[-1]
        assert info.file_size == info.data_offset + last.offset + last.nbytes
        return path.read_bytes(), info.header_size


SEED, HEADER_SIZE = _seed()
# u64 fields of the seed that hold small numbers: its counts and string/array lengths
LENGTH_FIELDS = [
    i for i in range(0, HEADER_SIZE - 8) if 0 < struct.unpack_from("<Q", SEED, i)[0] < 4096
]


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    """The seed truncated, with flipped bytes, or with huge or wrong counts and lengths."""
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 3))):
        end = min(len(data), HEADER_SIZE)  # the header is where parsing can go wrong
        kind = draw(st.sampled_from(["truncate", "flip", "length", "u64"]))
        if kind == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif kind == "flip" and end > 0:
            data[draw(st.integers(0, end - 1))] ^= draw(st.integers(1, 255))
        elif kind == "length" and LENGTH_FIELDS[0] + 8 <= end:
            i = draw(st.sampled_from([i for i in LENGTH_FIELDS if i + 8 <= end]))
            value = draw(st.sampled_from(HUGE) | st.integers(0, 2 * len(SEED)))
            data[i : i + 8] = struct.pack("<Q", value)
        elif kind == "u64" and end >= 8:
            i = draw(st.integers(0, end - 8))
            data[i : i + 8] = struct.pack("<Q", draw(st.sampled_from(HUGE)))
    return bytes(data)


@contextmanager
def as_file(data: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.gguf"
        path.write_bytes(data)
        yield path


def _snapshot(path: Path) -> tuple[bytes, list[str]]:
    return path.read_bytes(), sorted(os.listdir(path.parent))


EDITS: list[Callable[[Path], object]] = [
    lambda p: set_sparsek(p, enable=True, in_place=True),
    lambda p: set_sparsek(p, top_k=3, out=p.with_name("out.gguf")),
    lambda p: unset_sparsek(p, in_place=True),
    lambda p: set_metadata(p, {"general.name": (GGUFType.STRING, "x")}, in_place=True),
]


def _check_accepted(path: Path, info: GGUFInfo) -> None:
    """A corruption the reader accepts (say a flipped byte in a name) must still edit cleanly."""
    out = path.with_name("out.gguf")
    try:
        set_metadata(path, {"fuzz.key": (GGUFType.UINT32, 1)}, out=out)
    except GGUFError:
        assert not out.exists()
        return
    edited = read_metadata(out)
    assert {k: f.raw for k, f in edited.fields.items() if k != "fuzz.key"} == {
        k: f.raw for k, f in info.fields.items()
    }
    assert edited.tensors == info.tensors
    tail = path.read_bytes()[info.data_offset :]
    assert out.read_bytes()[edited.data_offset :] == tail


@FUZZ
@given(data=corrupted())
def test_corrupt_files_are_refused_or_edited_cleanly(data: bytes) -> None:
    with as_file(data) as path:
        before = _snapshot(path)
        try:
            info = read_metadata(path)
        except GGUFError:
            for edit in EDITS:
                with pytest.raises(GGUFError):
                    edit(path)
                assert _snapshot(path) == before
            return
        _check_accepted(path, info)
        assert path.read_bytes() == before[0]


@FUZZ
@given(data=corrupted())
def test_cli_never_crashes_on_corrupt_files(data: bytes) -> None:
    runner = CliRunner()
    with as_file(data) as path:
        before = _snapshot(path)
        for args in (
            ["show", str(path)],
            ["show", "--json", str(path)],
            ["set", str(path), "--enable", "--in-place"],
        ):
            result = runner.invoke(app, args)
            assert result.exit_code in (0, 2), result.output
            assert result.exception is None or isinstance(result.exception, SystemExit)
            if result.exit_code == 2:
                assert result.output.startswith("error: ") and _snapshot(path) == before


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, len(SEED) - 1))
def test_every_truncation_is_refused(cut: int) -> None:
    """Every prefix of the seed is refused: it cuts the header or the last tensor's data."""
    with as_file(SEED[:cut]) as path, pytest.raises(GGUFError):
        read_metadata(path)
