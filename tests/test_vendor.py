"""scripts/vendor.py: idempotent sync, clear errors for patches that do not apply."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "vendor" / "llama.cpp"

spec = importlib.util.spec_from_file_location("vendor", ROOT / "scripts" / "vendor.py")
assert spec and spec.loader
vendor = importlib.util.module_from_spec(spec)
sys.modules["vendor"] = vendor
spec.loader.exec_module(vendor)

needs_tree = pytest.mark.skipif(not (TREE / ".git").is_dir(), reason="vendor/llama.cpp not synced")


def test_pin_is_the_documented_commit() -> None:
    pin = vendor.load_pin()
    assert pin.commit == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    assert pin.sha256 == "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


@needs_tree
def test_series_is_applied_in_order() -> None:
    subjects = vendor.git(TREE, "log", "--format=%s", "upstream..HEAD", "--reverse").stdout.split(
        "\n"
    )
    patches = vendor.patch_files()
    assert len([s for s in subjects if s]) == len(patches)
    for patch, subject in zip(patches, subjects, strict=False):
        assert subject.split(" ")[0] in patch.read_text()


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the working copy and patches/, so the real ones are never touched."""
    tree = tmp_path / "vendor" / "llama.cpp"
    subprocess.run(["git", "clone", "--quiet", str(TREE), str(tree)], check=True)
    shutil.copy(TREE / ".git" / vendor.STAMP, tree / ".git" / vendor.STAMP)
    subprocess.run(["git", "-C", str(tree), "fetch", "--quiet", "--tags"], check=True)
    patches = tmp_path / "patches"
    shutil.copytree(ROOT / "patches", patches)
    monkeypatch.setattr(vendor, "TREE", tree)
    monkeypatch.setattr(vendor, "PATCH_DIR", patches)
    monkeypatch.setattr(vendor, "ROOT", tmp_path)
    return tree


@needs_tree
def test_sync_is_idempotent(scratch: Path) -> None:
    head = vendor.git(scratch, "rev-parse", "HEAD").stdout
    assert vendor.sync() == "vendor: up to date"
    assert vendor.git(scratch, "rev-parse", "HEAD").stdout == head


@needs_tree
def test_broken_patch_names_patch_and_file_and_restores(scratch: Path) -> None:
    head = vendor.git(scratch, "rev-parse", "HEAD").stdout
    bad = vendor.PATCH_DIR / "9999-broken.patch"
    bad.write_text(
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        "From: x <x@y>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nSubject: [PATCH] broken\n\n---\n"
        "diff --git a/src/llama.cpp b/src/llama.cpp\n--- a/src/llama.cpp\n+++ b/src/llama.cpp\n"
        "@@ -1,3 +1,3 @@\n-this line is not there\n+neither is this\n context\n context\n"
    )
    with pytest.raises(vendor.VendorError) as err:
        vendor.sync()
    assert "9999-broken.patch" in str(err.value)
    assert "src/llama.cpp" in str(err.value)
    assert vendor.git(scratch, "rev-parse", "HEAD").stdout == head  # previous tree restored
    assert not vendor.git(scratch, "status", "--porcelain").stdout.strip()


@needs_tree
def test_export_round_trips_the_series(scratch: Path) -> None:
    before = {p.name: p.read_text() for p in vendor.patch_files()}
    vendor.export()
    after = {p.name: p.read_text() for p in vendor.patch_files()}
    assert before.keys() == after.keys()
    for name in before:  # identical diffs (headers may differ in author/date)
        assert before[name].split("\ndiff --git ", 1)[1] == after[name].split("\ndiff --git ", 1)[1]


@needs_tree
def test_series_applies_to_a_pristine_tree(tmp_path: Path) -> None:
    """The whole series, from the verified sdist, in order, with no fuzz (git am)."""
    dest = tmp_path / "llama.cpp"
    patches = vendor.patch_files()
    vendor.create_tree(
        vendor.load_pin(), dest, patches, vendor.series_stamp(vendor.load_pin(), patches)
    )
    ours = vendor.git(TREE, "rev-parse", "HEAD^{tree}").stdout
    assert vendor.git(dest, "rev-parse", "HEAD^{tree}").stdout == ours


def test_offline_checkout_must_be_the_pinned_commit(tmp_path: Path) -> None:
    """LLAMA_SPARSEK_LLAMA_CPP_DIR pointing at another commit is refused, naming both."""
    other = tmp_path / "checkout"
    other.mkdir()
    (other / "README.md").write_text("not llama.cpp\n")
    vendor.git(other, "init", "--quiet")
    vendor.git(other, "add", "README.md")
    vendor.git(other, "commit", "--quiet", "-m", "x")
    head = vendor.git(other, "rev-parse", "HEAD").stdout.strip()
    with pytest.raises(vendor.VendorError, match=head) as err:
        vendor.export_checkout(vendor.load_pin(), other, tmp_path / "dest")
    assert vendor.load_pin().commit in str(err.value)


def _evil_sdist(where: Path, marker: Path) -> Path:
    """An sdist whose build backend, once imported, writes `marker` (code run from it)."""
    src = where / "evil_pkg-1.0"
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
        '[project]\nname = "evil-pkg"\nversion = "1.0"\n'
    )
    (src / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: evil-pkg\nVersion: 1.0\n")
    (src / "backend.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "def prepare_metadata_for_build_wheel(directory, config_settings=None):\n"
        "    d = pathlib.Path(directory) / 'evil_pkg-1.0.dist-info'\n"
        "    d.mkdir()\n"
        "    meta = 'Metadata-Version: 2.1\\nName: evil-pkg\\nVersion: 1.0\\n'\n"
        "    (d / 'METADATA').write_text(meta)\n"
        "    return d.name\n"
        "def build_wheel(directory, config_settings=None, metadata_directory=None):\n"
        "    raise RuntimeError('not needed')\n"
        "def get_requires_for_build_wheel(config_settings=None):\n"
        "    return []\n"
    )
    index = where / "index"
    index.mkdir()
    sdist = index / "evil_pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return sdist


@pytest.mark.parametrize("right_hash", [False, True])
def test_sdist_hash_is_checked_before_its_code_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, right_hash: bool
) -> None:
    """A download whose hash is not the pin fails before pip runs anything from it; with the
    right hash the same sdist's backend does run (so the marker can tell)."""
    marker = tmp_path / "backend-ran"
    sdist = _evil_sdist(tmp_path / "src", marker)
    digest = vendor.sha256_file(sdist) if right_hash else "0" * 64
    pin = vendor.Pin("c" * 40, "evil-pkg", "1.0", sdist.name, digest, "x", "y")
    monkeypatch.setenv("LLAMA_SPARSEK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(sdist.parent))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    if right_hash:
        assert vendor.fetch_sdist(pin).read_bytes() == sdist.read_bytes()
        assert marker.exists()
    else:
        with pytest.raises(vendor.VendorError, match=r"(?i)hash"):
            vendor.fetch_sdist(pin)
        assert not marker.exists()
        assert not list((tmp_path / "home" / "cache" / "sdist").iterdir())
