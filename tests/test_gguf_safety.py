"""The editor under concurrent edits, odd destinations, killed rewrites and non-finite floats:
every edit lands or fails with a clear error, nothing is replaced that is not a GGUF file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_gguf_editor import cli, files_in, write_model

from llama_sparsek import tempfiles
from llama_sparsek.gguf import (
    GGUFError,
    GGUFType,
    edit_metadata,
    read_metadata,
    set_metadata,
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model.gguf", vocab=50)


# --- concurrent edits --------------------------------------------------------------------------


@pytest.mark.parametrize("value_type", [GGUFType.UINT8, GGUFType.STRING])  # patch / rewrite
def test_concurrent_in_place_edits_land_or_fail(model: Path, value_type: GGUFType) -> None:
    """Threads (separate open files, so flock applies as between processes) edit one file at
    once; every edit that returned is in the file, the others failed saying why."""
    rounds, writers = 12, 3
    for r in range(rounds):
        barrier = threading.Barrier(writers)
        landed: list[str] = []
        refused: list[str] = []

        def edit(
            i: int,
            r: int = r,
            barrier: threading.Barrier = barrier,
            landed: list[str] = landed,
            refused: list[str] = refused,
        ) -> None:
            key = "test.u8" if value_type is GGUFType.UINT8 else f"new.key{i}"
            value: object = (r * writers + i) % 256 if value_type is GGUFType.UINT8 else f"v{r}"
            barrier.wait()
            try:
                set_metadata(model, {key: (value_type, value)}, in_place=True)  # type: ignore[dict-item]
                landed.append(f"{key}={value}")
            except GGUFError as e:
                assert "changed since it was read" in str(e)
                refused.append(key)

        threads = [threading.Thread(target=edit, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(landed) + len(refused) == writers
        fields = read_metadata(model).fields
        if value_type is GGUFType.STRING:
            for item in landed:
                key, value = item.split("=")
                assert fields[key].value == value, (r, landed, refused)
        else:  # one key: the value in the file is the last edit that landed
            assert len(landed) >= 1
            assert f"test.u8={fields['test.u8'].value}" in landed
    assert files_in(model.parent) == ["model.gguf"]


def test_a_patch_within_the_same_mtime_is_still_seen(model: Path) -> None:
    """mtimes are as coarse as the kernel's clock tick: the header itself is compared."""
    info = read_metadata(model)
    st = model.stat()
    assert set_metadata(model, {"test.u8": (GGUFType.UINT8, 7)}, in_place=True).method == "patch"
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # as if in the same tick
    with pytest.raises(GGUFError, match="changed since it was read"):
        edit_metadata(info, {"test.u16": (GGUFType.UINT16, 9)}, in_place=True)
    assert read_metadata(model).fields["test.u8"].value == 7


def test_two_cli_processes_editing_in_place(model: Path) -> None:
    """The issue's case: two `gguf set --in-place` at once; both land or one says it failed."""
    cmd = [sys.executable, "-m", "llama_sparsek", "gguf", "set", str(model), "--in-place"]
    procs = [
        subprocess.Popen(
            [*cmd, "--kv", f"new.p{i}=str:{'x' * 40}"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=model.parent,  # not the source tree: the installed package
        )
        for i in range(2)
    ]
    results = [(p.wait(), p.stderr.read() if p.stderr else "") for p in procs]
    fields = read_metadata(model).fields
    for i, (rc, err) in enumerate(results):
        if rc == 0:
            assert f"new.p{i}" in fields
        else:
            assert rc == 2 and "changed since it was read" in err, err


# --- destinations ------------------------------------------------------------------------------


def test_output_to_a_fifo_or_device_is_refused(model: Path) -> None:
    fifo = model.with_name("pipe")
    os.mkfifo(fifo)
    for out in (fifo, Path("/dev/null")):
        result = cli("set", model, "--enable", "-o", out)
        assert result.exit_code == 2, result.output
        assert "not a regular file" in result.output
    assert fifo.is_fifo()
    assert Path("/dev/null").is_char_device()


@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink"])
def test_output_equal_to_the_input_is_refused(
    model: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = model.read_bytes()
    if how == "same":
        out = model
    elif how == "relative":
        monkeypatch.chdir(model.parent)
        out = Path("sub/../model.gguf")
        (model.parent / "sub").mkdir()
    elif how == "symlink":
        out = model.with_name("link.gguf")
        out.symlink_to(model)
    else:
        out = model.with_name("hard.gguf")
        os.link(model, out)
    result = cli("set", model, "--enable", "-o", out)
    assert result.exit_code == 2, result.output
    assert "is the input file itself" in result.output and "--in-place" in result.output
    assert model.read_bytes() == before


# --- what killed rewrites leave ----------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_are_removed_by_the_next_rewrite(model: Path) -> None:
    d = model.parent
    dead = d / f".model.gguf.{_dead_pid()}.abc123.tmp"  # SIGKILLed rewrite
    old = d / ".model.gguf.oldformat.tmp"  # no pid, untouched for an hour
    live = d / f".model.gguf.{os.getppid()}.xyz789.tmp"  # another process, still writing
    other = d / f".other.gguf.{_dead_pid()}.abc123.tmp"  # not ours to judge
    for p in (dead, old, live, other):
        p.write_bytes(b"x" * 1000)
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    result = cli("set", model, "--kv", "new.s=str:" + "y" * 100, "--in-place")
    assert result.exit_code == 0, result.output
    assert sorted(files_in(d)) == sorted(["model.gguf", live.name, other.name])


def test_temp_names_carry_the_pid(tmp_path: Path) -> None:
    fd, name = tempfiles.mkstemp(tmp_path / "x.gguf")
    os.close(fd)
    assert Path(name).name.startswith(f".x.gguf.{os.getpid()}.")
    assert tempfiles.clean_stale(tmp_path, "x.gguf") == []  # our own: kept


# --- non-finite floats -------------------------------------------------------------------------


def _strict_json(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_show_json_is_valid_with_nan_and_inf(model: Path) -> None:
    out = model.with_name("nan.gguf")
    result = cli(
        "set",
        model,
        "--kv",
        "x.nan=float:nan",
        "--kv",
        "x.inf=f32:inf",
        "--kv",
        "x.ninf=f64:-inf",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    shown = cli("show", out, "--json")
    assert shown.exit_code == 0, shown.output
    meta = _strict_json(shown.output)["metadata"]  # type: ignore[index]
    assert meta["x.nan"] == {"type": "FLOAT64", "value": "nan"}
    assert meta["x.inf"] == {"type": "FLOAT32", "value": "inf"}
    assert meta["x.ninf"] == {"type": "FLOAT64", "value": "-inf"}
    assert meta["test.f32"]["value"] == pytest.approx(0.1)  # finite floats stay numbers
