"""The GGUF metadata editor, checked against the upstream `gguf` package as an independent
reader and writer, on generated files and on a real model when one is present."""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf as upstream  # the independent reader: a test dependency, never skipped
import numpy as np
import pytest
from typer.testing import CliRunner

from llama_sparsek import gguf as editor
from llama_sparsek import tempfiles
from llama_sparsek.cli_gguf import app
from llama_sparsek.gguf import (
    GGUFArray,
    GGUFError,
    GGUFType,
    edit_metadata,
    parse_kv_override,
    read_metadata,
    set_metadata,
    set_sparsek,
    unset_sparsek,
)
from llama_sparsek.sparsek import recommended

SPARSEK_KEYS = [
    f"llama.sparsek.{s}"
    for s in (
        "enable",
        "top_k",
        "window",
        "stride",
        "block_size",
        "sinks",
        "dense_layers",
        "summaries",
        "grow_top_k",
        "per_group",
    )
]


# --- helpers -----------------------------------------------------------------------------------


def write_model(
    path: Path,
    *,
    alignment: int | None = None,
    name: str = "test-model",
    vocab: int = 3000,
    with_tensors: bool = True,
    extra: Callable[[Any], None] | None = None,
) -> Path:
    """A GGUF written by the upstream writer: every value type, a vocabulary, mixed tensors."""
    w = upstream.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name(name)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -5)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -3000)
    w.add_context_length(4096)
    w.add_int32("test.i32", -7)
    w.add_float32("test.f32", 0.1)
    w.add_bool("test.bool", True)
    w.add_uint64("test.u64", 2**40)
    w.add_int64("test.i64", -(2**40))
    w.add_float64("test.f64", 1e-300)
    w.add_string("test.str", "ünïcode ☃")
    w.add_array("test.floats", [0.25, 0.5])
    w.add_array("test.bools", [True, False, True])
    if extra is not None:
        extra(w)
    w.add_token_list([f"tok{i}✓" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    if with_tensors:
        rng = np.random.default_rng(0)
        w.add_tensor("f32", rng.standard_normal((16, 8)).astype(np.float32))
        w.add_tensor("f16", rng.standard_normal((4, 32)).astype(np.float16))
        q8 = rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8)
        w.add_tensor("q8_0", q8, raw_dtype=upstream.GGMLQuantizationType.Q8_0)
        w.add_tensor("i32", np.arange(10, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def upstream_view(path: Path) -> tuple[dict[str, tuple[Any, ...]], int, bytes]:
    """Metadata ({key: (types..., contents)}), data offset and data region, per upstream."""
    reader = upstream.GGUFReader(str(path))
    meta = {
        f.name: (*(int(t) for t in f.types), f.contents())
        for f in reader.fields.values()
        if not f.name.startswith("GGUF.")
    }
    offset = int(reader.data_offset)
    del reader  # release the memmap before the file is replaced
    return meta, offset, path.read_bytes()[offset:]


def as_upstream(meta: dict[str, editor.Update]) -> dict[str, tuple[Any, ...]]:
    """Our metadata in the shape of `upstream_view`'s."""
    out: dict[str, tuple[Any, ...]] = {}
    for key, (type_, value) in meta.items():
        if isinstance(value, GGUFArray):
            out[key] = (int(type_), int(value.item_type), list(value.items))
        else:
            out[key] = (int(type_), value)
    return out


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def cli(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model.gguf")


# --- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alignment", [None, 64, 256])
def test_read_matches_upstream(tmp_path: Path, alignment: int | None) -> None:
    path = write_model(tmp_path / "m.gguf", alignment=alignment)
    info = read_metadata(path)
    meta, offset, _ = upstream_view(path)
    assert as_upstream(info.metadata) == meta
    assert list(info.fields) == list(meta)  # file order
    assert info.alignment == (alignment or 32)
    assert info.data_offset == offset
    assert info.data_offset % info.alignment == 0
    assert info.version == 3 and info.file_size == path.stat().st_size
    reader = upstream.GGUFReader(str(path))
    expected = [
        (t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), t.data_offset - offset)
        for t in reader.tensors
    ]
    assert [(t.name, t.ggml_type, t.shape, t.offset) for t in info.tensors] == expected
    assert [t.nbytes for t in info.tensors] == [int(t.n_bytes) for t in reader.tensors]
    assert [t.type_name for t in info.tensors] == ["f32", "f16", "q8_0", "i32"]


def test_version_2_is_read_and_kept(model: Path) -> None:
    data = bytearray(model.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    model.write_bytes(data)
    assert read_metadata(model).version == 2
    out = model.with_name("out.gguf")
    set_sparsek(model, enable=True, out=out)
    assert read_metadata(out).version == 2


def test_ggml_type_sizes_match_upstream() -> None:
    for type_id, (name, block, size) in editor.GGML_TYPES.items():
        try:
            upstream_type = upstream.GGMLQuantizationType(type_id)
        except ValueError:
            continue  # newer than the upstream package
        assert upstream.GGML_QUANT_SIZES[upstream_type] == (block, size), name
        assert upstream_type.name.lower() == name.lower()


def test_field_previews_decode_only_what_is_asked(model: Path) -> None:
    tokens = read_metadata(model).fields["tokenizer.ggml.tokens"]
    assert tokens.type_name == "ARRAY[STRING]" and tokens.count == 3000
    assert tokens.items(3) == ("tok0✓", "tok1✓", "tok2✓")
    with pytest.raises(TypeError):
        read_metadata(model).fields["general.name"].items()


# --- editing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alignment", [None, 64])
def test_round_trip_set_show_unset(tmp_path: Path, alignment: int | None) -> None:
    original = write_model(tmp_path / "m.gguf", alignment=alignment)
    meta, _, data = upstream_view(original)
    with_keys, restored = tmp_path / "with.gguf", tmp_path / "restored.gguf"

    result = cli("set", original, "--enable", "-o", with_keys)
    assert result.exit_code == 0, result.output
    new_meta, _, new_data = upstream_view(with_keys)
    assert new_data == data
    rec = recommended("llama")
    assert {k: new_meta.pop(k) for k in SPARSEK_KEYS} == {
        "llama.sparsek.enable": (GGUFType.BOOL, True),
        "llama.sparsek.top_k": (GGUFType.UINT32, rec.top_k),
        "llama.sparsek.window": (GGUFType.UINT32, rec.window),
        "llama.sparsek.stride": (GGUFType.UINT32, rec.stride),
        "llama.sparsek.block_size": (GGUFType.UINT32, rec.block_size),
        "llama.sparsek.sinks": (GGUFType.UINT32, rec.sinks),
        "llama.sparsek.dense_layers": (GGUFType.UINT32, rec.dense_layers),
        "llama.sparsek.summaries": (GGUFType.UINT32, rec.summaries),
        "llama.sparsek.grow_top_k": (GGUFType.UINT32, rec.grow_top_k),
        "llama.sparsek.per_group": (GGUFType.UINT32, rec.per_group),
    }
    assert new_meta == meta

    shown = cli("show", with_keys, "--json")
    assert shown.exit_code == 0
    assert json.loads(shown.output)["sparsek"] == {
        "llama.sparsek.enable": True,
        "llama.sparsek.top_k": rec.top_k,
        "llama.sparsek.window": rec.window,
        "llama.sparsek.stride": rec.stride,
        "llama.sparsek.block_size": rec.block_size,
        "llama.sparsek.sinks": rec.sinks,
        "llama.sparsek.dense_layers": rec.dense_layers,
        "llama.sparsek.summaries": rec.summaries,
        "llama.sparsek.grow_top_k": rec.grow_top_k,
        "llama.sparsek.per_group": rec.per_group,
    }
    text = cli("show", with_keys).output
    assert "* llama.sparsek.top_k" in text and f"top_k={rec.top_k}" in text

    assert cli("unset", with_keys, "-o", restored).exit_code == 0
    assert upstream_view(restored)[0] == meta
    assert upstream_view(restored)[2] == data
    assert restored.read_bytes() == original.read_bytes()  # even the header, byte for byte


def test_in_place_patch_when_the_header_keeps_its_size(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_sparsek(model, enable=True, in_place=True)
    inode, data = model.stat().st_ino, upstream_view(model)[2]

    def no_rewrite(*args: object) -> None:
        raise AssertionError("the fast path must not rewrite the file")

    monkeypatch.setattr(editor, "_rewrite", no_rewrite)
    start = time.perf_counter()
    result = set_sparsek(model, top_k=1000, in_place=True)
    elapsed = time.perf_counter() - start
    assert result.method == "patch" and not result.dry_run
    assert model.stat().st_ino == inode
    assert elapsed < 0.5  # 0.1 s budget, with room for a loaded CI machine
    meta, _, new_data = upstream_view(model)
    assert meta["llama.sparsek.top_k"] == (GGUFType.UINT32, 1000)
    assert new_data == data


def test_in_place_rewrite_when_the_header_grows(model: Path) -> None:
    model.chmod(0o640)
    inode, (meta, _, data) = model.stat().st_ino, upstream_view(model)
    result = set_sparsek(model, enable=True, in_place=True)
    assert result.method == "rewrite"
    assert model.stat().st_ino != inode
    assert stat.S_IMODE(model.stat().st_mode) == 0o640
    new_meta, _, new_data = upstream_view(model)
    assert new_data == data
    assert {k: v for k, v in new_meta.items() if k not in SPARSEK_KEYS} == meta
    assert files_in(model.parent) == ["model.gguf"]


def write_small(path: Path, name: str) -> Path:
    """A model whose whole header fits in one sector: an arch, a name and one tensor."""
    w = upstream.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_tensor("t", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _with_slack(
    tmp_path: Path, slack: int, write: Callable[[Path, str], Path] = write_small
) -> Path:
    """A model whose header ends `slack` bytes before the data (found by varying its name)."""
    for name_len in range(1, 64):
        path = write(tmp_path / "slack.gguf", "n" * name_len)
        info = read_metadata(path)
        if info.data_offset - info.header_size == slack:
            return path
    raise AssertionError("no name length gives that slack")


def test_in_place_patch_uses_the_alignment_slack(tmp_path: Path) -> None:
    """A header that grows into its padding, or shrinks leaving more of it, is patched."""
    path = _with_slack(tmp_path, 12, lambda p, name: write_small(p, "prefix-" + name))
    assert read_metadata(path).data_offset <= editor.SECTOR
    inode, data = path.stat().st_ino, upstream_view(path)[2]

    def rename(name: str) -> editor.Method:
        return set_metadata(path, {"general.name": (GGUFType.STRING, name)}, in_place=True).method

    name = read_metadata(path).fields["general.name"].value
    assert isinstance(name, str)
    assert rename(name + "x" * 12) == "patch"
    assert rename(name.removeprefix("prefix-")) == "patch"
    meta, _, new_data = upstream_view(path)
    assert meta["general.name"][-1] == name.removeprefix("prefix-") and new_data == data
    assert path.stat().st_ino == inode
    # 13 bytes more end the header in the next alignment block: the data would move
    assert rename(name + "y" * 13) == "rewrite"
    assert path.stat().st_ino != inode
    assert upstream_view(path)[2] == data


def test_in_place_rewrite_when_the_patch_would_span_sectors(tmp_path: Path) -> None:
    """Growing an early value shifts the rest of the header: it fits, but is no 1-sector write."""
    path = _with_slack(tmp_path, 8, lambda p, name: write_model(p, name=name))
    name = read_metadata(path).fields["general.name"].value
    result = set_metadata(path, {"general.name": (GGUFType.STRING, f"{name}x")}, in_place=True)
    assert result.method == "rewrite"
    assert read_metadata(path).fields["general.name"].value == f"{name}x"


def test_dry_run_writes_nothing(model: Path) -> None:
    before, mtime = model.read_bytes(), model.stat().st_mtime_ns
    out = model.with_name("out.gguf")
    for args in (["--enable", "--dry-run"], ["--enable", "--dry-run", "-o", str(out)]):
        result = cli("set", model, *args)
        assert result.exit_code == 0, result.output
        assert f"+ llama.sparsek.top_k = {recommended().top_k} (UINT32)" in result.output
        assert "nothing written" in result.output
    result = set_sparsek(model, top_k=5, dry_run=True)
    assert result.dry_run and result.method == "rewrite" and len(result.changes) == 1
    assert model.read_bytes() == before and model.stat().st_mtime_ns == mtime
    assert files_in(model.parent) == ["model.gguf"]


def test_unchanged_in_place_edit_does_not_write(model: Path) -> None:
    set_sparsek(model, enable=True, in_place=True)
    mtime = model.stat().st_mtime_ns
    result = set_sparsek(model, enable=True, in_place=True)
    assert result.method == "unchanged" and result.changes == ()
    assert model.stat().st_mtime_ns == mtime


def test_enable_alone_writes_recommended_and_disable_only_enable(model: Path) -> None:
    set_sparsek(model, enable=True, in_place=True)
    set_sparsek(model, top_k=24, in_place=True)
    result = set_sparsek(model, enable=False, in_place=True)
    assert [c.key for c in result.changes] == ["llama.sparsek.enable"]
    meta = read_metadata(model).metadata
    assert meta["llama.sparsek.top_k"] == (GGUFType.UINT32, 24)
    assert meta["llama.sparsek.enable"] == (GGUFType.BOOL, False)
    assert list(meta)[-len(SPARSEK_KEYS) :] == SPARSEK_KEYS  # new keys are appended


def test_block_size_must_fit_top_k_and_window(model: Path) -> None:
    set_sparsek(model, top_k=64, window=16, block_size=16, enable=True, in_place=True)
    with pytest.raises(GGUFError, match="divide top_k"):
        set_sparsek(model, top_k=40, in_place=True)
    with pytest.raises(GGUFError, match="window must be >= block_size"):
        set_sparsek(model, window=8, in_place=True)
    result = cli("set", model, "--block-size", "32", "--in-place")
    assert result.exit_code != 0 and "window must be >= block_size" in result.output
    assert read_metadata(model).metadata["llama.sparsek.block_size"] == (GGUFType.UINT32, 16)
    set_sparsek(model, window=32, block_size=32, in_place=True)
    assert read_metadata(model).metadata["llama.sparsek.block_size"] == (GGUFType.UINT32, 32)


def test_unset_named_keys_and_suffixes(model: Path) -> None:
    set_sparsek(model, enable=True, in_place=True)
    unset_sparsek(model, ["top_k", "llama.sparsek.window", "test.u8"], in_place=True)
    keys = set(read_metadata(model).fields)
    assert {"llama.sparsek.enable", "llama.sparsek.stride"} <= keys
    assert not {"llama.sparsek.top_k", "llama.sparsek.window", "test.u8"} & keys
    unset_sparsek(model, in_place=True)
    assert not any(".sparsek." in k for k in read_metadata(model).fields)
    with pytest.raises(GGUFError, match="no key 'nope'"):
        unset_sparsek(model, ["nope"], in_place=True)


def test_arrays_and_every_scalar_type_round_trip_through_upstream(model: Path) -> None:
    updates: dict[str, editor.Update] = {
        "x.empty": (GGUFType.ARRAY, GGUFArray(GGUFType.UINT8, ())),
        "x.strs": (GGUFType.ARRAY, GGUFArray(GGUFType.STRING, ("a", "", "ß"))),
        "x.u64s": (GGUFType.ARRAY, GGUFArray(GGUFType.UINT64, (0, 2**64 - 1))),
        "x.f64": (GGUFType.FLOAT64, -2.5),
        "x.i8": (GGUFType.INT8, -128),
        "test.u16": (GGUFType.UINT16, 7),
    }
    out = model.with_name("out.gguf")
    set_metadata(model, updates, out=out)
    meta, ours = upstream_view(out)[0], as_upstream(read_metadata(out).metadata)
    assert {k: ours[k] for k in updates} == as_upstream(updates)
    assert meta.pop("x.empty") == (GGUFType.ARRAY, [])  # upstream omits an empty array's type
    assert {k: v for k, v in ours.items() if k != "x.empty"} == meta


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"x": (GGUFType.UINT32, 2**32)}, "does not fit in UINT32"),
        ({"x": (GGUFType.INT8, -129)}, "does not fit in INT8"),
        ({"x": (GGUFType.FLOAT32, 1e300)}, "does not fit in FLOAT32"),
        ({"x": (GGUFType.UINT32, True)}, "not a valid UINT32"),
        ({"x": (GGUFType.BOOL, 1)}, "not a valid BOOL"),
        ({"x": (GGUFType.STRING, 5)}, "not a valid STRING"),
        ({"x": (GGUFType.ARRAY, [1])}, "GGUFArray"),
        ({"x": (99, 1)}, "invalid type 99"),
        ({"": (GGUFType.UINT8, 1)}, "empty key"),
        ({"llama.sparsek.top_k": (GGUFType.UINT32, 0)}, "top_k must be >= 1"),
        ({"llama.sparsek.window": (GGUFType.UINT32, -1)}, "window must be >= 0"),
        ({"llama.sparsek.stride": (GGUFType.UINT32, -3)}, "stride must be >= 0"),
        ({"llama.sparsek.top_k": (GGUFType.INT32, 8)}, "must be UINT32"),
        ({"llama.sparsek.enable": (GGUFType.UINT8, 1)}, "must be BOOL"),
        ({"llama.sparsek.bogus": (GGUFType.UINT32, 1)}, "unknown SparseK key"),
        ({"general.alignment": (GGUFType.UINT32, 64)}, "cannot change"),
        ({"general.alignment": (GGUFType.UINT32, 48)}, "not a power of two"),
    ],
)
def test_invalid_edits_are_refused_without_writing(
    model: Path, updates: dict[str, editor.Update], message: str
) -> None:
    before = model.read_bytes()
    with pytest.raises(GGUFError, match=message):
        set_metadata(model, updates, in_place=True)
    assert model.read_bytes() == before and files_in(model.parent) == ["model.gguf"]


def test_destination_must_be_given_once(model: Path) -> None:
    with pytest.raises(GGUFError, match="say where to write"):
        set_sparsek(model, top_k=5)
    with pytest.raises(GGUFError, match="not both"):
        set_sparsek(model, top_k=5, out=model.with_name("o.gguf"), in_place=True)
    with pytest.raises(GGUFError, match="both set and removed"):
        set_metadata(model, {"test.u8": (GGUFType.UINT8, 1)}, ["test.u8"], in_place=True)
    with pytest.raises(GGUFError, match="nothing to set"):
        set_sparsek(model, in_place=True)


def test_in_place_through_a_symlink_edits_the_target(model: Path) -> None:
    link = model.with_name("link.gguf")
    link.symlink_to(model.name)
    set_sparsek(link, enable=True, in_place=True)
    assert link.is_symlink()
    assert "llama.sparsek.enable" in read_metadata(model).fields


def test_stale_info_is_refused(model: Path) -> None:
    info = read_metadata(model)
    set_sparsek(model, enable=True, in_place=True)
    with pytest.raises(GGUFError, match="changed since it was read"):
        edit_metadata(info, {"test.u8": (GGUFType.UINT8, 1)}, in_place=True)


# --- --kv overrides ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("llama.context_length=int:8192", (GGUFType.UINT32, 8192)),  # keeps the existing type
        ("test.i8=int:-100", (GGUFType.INT8, -100)),
        ("test.f32=float:0.75", (GGUFType.FLOAT32, 0.75)),
        ("new.int=int:-5", (GGUFType.INT64, -5)),
        ("new.float=float:2.5", (GGUFType.FLOAT64, 2.5)),
        ("new.bool=bool:false", (GGUFType.BOOL, False)),
        ("new.str=str:a=b:c", (GGUFType.STRING, "a=b:c")),
        ("new.u16=u16:9", (GGUFType.UINT16, 9)),
        ("test.f32=f64:1.5", (GGUFType.FLOAT64, 1.5)),  # an exact type may change the type
        ("llama.sparsek.top_k=int:64", (GGUFType.UINT32, 64)),
        ("llama.sparsek.enable=bool:true", (GGUFType.BOOL, True)),
    ],
)
def test_kv_override_types(model: Path, spec: str, expected: editor.Update) -> None:
    key, update = parse_kv_override(spec, read_metadata(model))
    assert (key, update) == (spec.split("=")[0], expected)
    out = model.with_name("out.gguf")
    result = cli("set", model, "--kv", spec, "-o", out)
    assert result.exit_code == 0, result.output
    meta = upstream_view(out)[0]
    assert meta[key] == (int(expected[0]), expected[1])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("novalue", "expected KEY=TYPE:VALUE"),
        ("k=int", "expected KEY=TYPE:VALUE"),
        ("=int:1", "expected KEY=TYPE:VALUE"),
        ("k=complex:1", "unknown type 'complex'"),
        ("k=int:1.5", "not a INT64 value"),
        ("k=bool:yes", "not a BOOL value"),
        ("test.f32=int:1", "is FLOAT32, not int"),
        ("general.name=bool:true", "is STRING, not bool"),
    ],
)
def test_kv_override_errors(model: Path, spec: str, message: str) -> None:
    with pytest.raises(GGUFError, match=message):
        parse_kv_override(spec, read_metadata(model))


# --- atomicity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left"), KeyboardInterrupt()])
@pytest.mark.parametrize("in_place", [True, False])
def test_failure_mid_copy_leaves_the_original_and_no_temp_file(
    model: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException, in_place: bool
) -> None:
    before = model.read_bytes()
    out = model.with_name("out.gguf")

    def failing_copy(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
        os.pwrite(dst, b"partial" * 100, dst_offset)
        raise failure

    monkeypatch.setattr(editor, "_copy_data", failing_copy)
    with pytest.raises(type(failure)):
        set_sparsek(model, enable=True, in_place=in_place, out=None if in_place else out)
    assert model.read_bytes() == before
    assert files_in(model.parent) == ["model.gguf"]


def test_output_over_an_existing_file_is_atomic(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = model.with_name("out.gguf")
    out.write_bytes(b"previous")

    def failing_copy(*args: object) -> None:
        raise OSError("boom")

    monkeypatch.setattr(editor, "_copy_data", failing_copy)
    with pytest.raises(OSError, match="boom"):
        set_sparsek(model, enable=True, out=out)
    assert out.read_bytes() == b"previous"
    assert files_in(model.parent) == ["model.gguf", "out.gguf"]


@pytest.mark.parametrize("unsupported", [["copy_file_range"], ["copy_file_range", "sendfile"]])
def test_copy_falls_back_when_kernel_copies_are_unsupported(
    model: Path, monkeypatch: pytest.MonkeyPatch, unsupported: list[str]
) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    for name in unsupported:
        monkeypatch.setattr(os, name, refuse)
    monkeypatch.setattr(editor, "_KERNEL_COPY_CHUNK", 100)  # many calls, odd sizes
    monkeypatch.setattr(editor, "_COPY_BUFFER", 100)
    data = upstream_view(model)[2]
    out = model.with_name("out.gguf")
    set_sparsek(model, enable=True, out=out)
    assert upstream_view(out)[2] == data


def test_a_source_that_shrinks_while_copying_is_refused(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.ENOSYS, "no")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(os, "sendfile", refuse)
    monkeypatch.setattr(os, "preadv", lambda *args: 0)  # end of file, early
    with pytest.raises(GGUFError, match="ended after 0 of"):
        set_sparsek(model, enable=True, in_place=True)
    assert files_in(model.parent) == ["model.gguf"]


# --- bad input ---------------------------------------------------------------------------------


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, type_: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", type_) + payload


def _header(
    kvs: list[bytes], n_kv: int | None = None, n_tensors: int = 0, version: int = 3
) -> bytes:
    n = len(kvs) if n_kv is None else n_kv
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n) + b"".join(kvs)


ARCH = _kv("general.architecture", 8, _string("llama"))
U32 = _kv("a.b", 4, struct.pack("<I", 5))


def _truncated_data(tmp_path: Path) -> bytes:
    """A model cut one byte short of its last tensor's end."""
    path = write_model(tmp_path / "t.gguf")
    last = upstream.GGUFReader(str(path)).tensors[-1]
    return path.read_bytes()[: last.data_offset + last.n_bytes - 1]


BAD_FILES: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("empty", lambda _: b"", "not a GGUF file"),
    ("text", lambda _: b"hello world, not a model", "not a GGUF file"),
    ("magic only", lambda _: b"GGUF", "truncated header"),
    ("version 1", lambda _: _header([ARCH], version=1), "unsupported GGUF version 1"),
    ("version 4", lambda _: _header([ARCH], version=4), "unsupported GGUF version 4"),
    ("big-endian", lambda _: _header([ARCH], version=3 << 24), "big-endian"),
    ("huge kv count", lambda _: _header([ARCH], n_kv=2**63), "more than the"),
    ("huge tensor count", lambda _: _header([ARCH], n_tensors=2**60), "more than the"),
    ("truncated kv", lambda _: _header([ARCH, U32])[:-2], "truncated header"),
    ("huge key length", lambda _: _header([struct.pack("<Q", 2**62) + b"k" * 64]), "over 65535"),
    ("huge string", lambda _: _header([_kv("s", 8, struct.pack("<Q", 2**62))]), "truncated"),
    ("huge array", lambda _: _header([_kv("a", 9, struct.pack("<IQ", 4, 2**61))]), "array length"),
    ("huge string array", lambda _: _header([_kv("a", 9, struct.pack("<IQ", 8, 2**61))]), "array"),
    (
        "short string array",
        lambda _: _header([_kv("a", 9, struct.pack("<IQQ", 8, 2, 99) + bytes(64))]),
        "run past",
    ),
    ("nested array", lambda _: _header([_kv("a", 9, struct.pack("<IQ", 9, 0))]), "nested"),
    ("bad type", lambda _: _header([_kv("a", 13, b"")]), "invalid type 13"),
    ("empty key", lambda _: _header([_kv("", 4, b"\0" * 4)]), "empty key"),
    ("duplicate key", lambda _: _header([ARCH, U32, U32]), "duplicate key 'a.b'"),
    ("alignment type", lambda _: _header([_kv("general.alignment", 5, b"\x20\0\0\0")]), "UINT32"),
    ("alignment 0", lambda _: _header([_kv("general.alignment", 4, b"\0" * 4)]), "power of two"),
    ("truncated data", _truncated_data, "truncated tensor data"),
]


@pytest.mark.parametrize(
    ("make", "message"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES]
)
def test_bad_files_are_refused(tmp_path: Path, make: Callable[[Path], bytes], message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(make(tmp_path))
    (tmp_path / "t.gguf").unlink(missing_ok=True)
    with pytest.raises(GGUFError, match=message):
        read_metadata(path)
    for args in (
        ["show", path],
        ["set", path, "--enable", "--in-place"],
        ["unset", path, "-o", tmp_path / "o"],
    ):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and "Traceback" not in result.output
    assert files_in(tmp_path) == ["bad.gguf"]


def test_tensor_info_errors(tmp_path: Path) -> None:
    def tensor(name: str, dims: list[int], ggml_type: int) -> bytes:
        return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, 0)

    cases = [
        ([tensor("t", [32], 99)], "unknown ggml type 99"),
        ([tensor("t", [1] * 5, 0)], "5 dimensions"),
        ([tensor("t", [33], 8)], "not a multiple"),
        ([tensor("t", [4], 0), tensor("t", [4], 0)], "duplicate tensor"),
    ]
    path = tmp_path / "t.gguf"
    for tensors, message in cases:
        path.write_bytes(_header([ARCH], n_tensors=len(tensors)) + b"".join(tensors) + bytes(4096))
        with pytest.raises(GGUFError, match=message):
            read_metadata(path)


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_exit_codes_and_messages(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = model.with_name("out.gguf")
    assert cli("show", model).exit_code == 0
    assert cli("show", model.with_name("missing.gguf")).exit_code == 2
    assert cli("show", model.parent).exit_code == 2
    for args, message in [
        (["set", model, "--enable"], "say where to write"),
        (["set", model, "--enable", "-o", out, "--in-place"], "not both"),
        (["set", model, "--in-place"], "nothing to set"),
        (["set", model, "--top-k", "0", "--in-place"], "top_k must be >= 1"),
        (["set", model, "--window", "-1", "--in-place"], "window must be >= 0"),
        (["set", model, "--stride", "-1", "--in-place"], "stride must be >= 0"),
        (
            ["set", model, "--top-k", "5", "--kv", "llama.sparsek.top_k=int:6", "--in-place"],
            "twice",
        ),
        (["set", model, "--kv", "bad", "--in-place"], "KEY=TYPE:VALUE"),
        (["unset", model, "nope", "--in-place"], "no key 'nope'"),
        (["set", model, "--enable", "-o", model.parent], "is a directory"),
        (["set", model, "--enable", "-o", model.parent / "no" / "x.gguf"], "not a directory"),
    ]:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert files_in(model.parent) == ["model.gguf"]
    read_only = model.parent / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):  # root ignores directory permissions: what it would get

            def refused(dest: Path, suffix: str = ".tmp") -> tuple[int, str]:
                raise PermissionError(errno.EACCES, "Permission denied", str(dest.parent))

            monkeypatch.setattr(tempfiles, "mkstemp", refused)
        result = cli("set", model, "--enable", "-o", read_only / "x.gguf")
        assert result.exit_code == 1 and "Permission denied" in result.output
        assert files_in(read_only) == []
    finally:
        read_only.chmod(0o700)


def test_cli_show_summarises_long_arrays_and_json_is_complete(model: Path) -> None:
    text = cli("show", model).output
    assert "tokenizer.ggml.tokens" in text and "3000 items: [" in text
    assert "alignment 32" in text and "data offset" in text
    assert "no llama.sparsek.* keys" in text
    assert '"ünïcode ☃"' in text and "test.f32" in text and "0.1\n" in text
    data = json.loads(cli("show", model, "--json").output)
    info = read_metadata(model)
    assert data["data_offset"] == info.data_offset and data["tensor_count"] == 4
    tokens = data["metadata"]["tokenizer.ggml.tokens"]
    assert tokens["length"] == 3000 and tokens["truncated"] and len(tokens["value"]) == 8
    assert data["metadata"]["test.bools"] == {
        "type": "ARRAY",
        "item_type": "BOOL",
        "length": 3,
        "value": [True, False, True],
        "truncated": False,
    }
    assert [t["type"] for t in data["tensors"]] == ["f32", "f16", "q8_0", "i32"]


def test_cli_in_place_reports_the_method(model: Path) -> None:
    result = cli("set", model, "--enable", "--in-place")
    assert result.exit_code == 0 and f"wrote {model}" in result.output
    result = cli("set", model, "--top-k", "16", "--in-place")
    assert result.exit_code == 0 and f"patched {model} in place" in result.output
    assert f"~ llama.sparsek.top_k: {recommended().top_k} -> 16 (UINT32)" in result.output
    result = cli("unset", model, "--in-place")
    assert result.exit_code == 0 and "- llama.sparsek.top_k (was 16)" in result.output


# --- a real model ------------------------------------------------------------------------------


def test_real_model_round_trip(smollm2_path: Path, tmp_path: Path) -> None:
    """One upstream read (it takes seconds here): of our output, against our read of the input."""
    info = read_metadata(smollm2_path)
    with_keys, restored = tmp_path / "with.gguf", tmp_path / "restored.gguf"
    set_sparsek(smollm2_path, enable=True, out=with_keys)
    meta, offset, data = upstream_view(with_keys)
    assert read_metadata(with_keys).data_offset == offset
    assert meta.pop("llama.sparsek.top_k") == (GGUFType.UINT32, recommended().top_k)
    assert meta.pop("llama.sparsek.enable") == (GGUFType.BOOL, True)
    assert {k: v for k, v in meta.items() if ".sparsek." not in k} == as_upstream(info.metadata)
    with open(smollm2_path, "rb") as f:
        f.seek(info.data_offset)
        assert f.read() == data
    start = time.perf_counter()
    assert set_sparsek(with_keys, top_k=512, in_place=True).method == "patch"
    assert time.perf_counter() - start < 0.5
    unset_sparsek(with_keys, out=restored)
    assert restored.read_bytes() == smollm2_path.read_bytes()
