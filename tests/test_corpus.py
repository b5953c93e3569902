"""The corpus registry: pins, roles, cleaning per layout, the fetch path (with a fake index), and
(slow) the real downloads."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from llama_sparsek import corpus, download


def test_registry_pins_and_roles() -> None:
    assert corpus.DEFAULT_CORPUS == "english-prose"
    assert {"english-prose", "python-code", "tech-docs", "dialogue"} <= set(corpus.REGISTRY)
    # every corpus is either for choosing settings or kept aside, and at least one is kept aside
    assert set(corpus.SELECTION) | set(corpus.CONFIRMATION) == set(corpus.REGISTRY)
    assert not set(corpus.SELECTION) & set(corpus.CONFIRMATION)
    assert corpus.DEFAULT_CORPUS in corpus.SELECTION and corpus.CONFIRMATION
    cached: dict[Path, str] = {}
    for name, spec in corpus.REGISTRY.items():
        assert spec.name == name and spec.sources
        package = spec.package
        assert re.fullmatch(r"[0-9a-f]{64}", package.sha256)
        assert package.archive == f"{package.name}-{package.version}.tar.gz"
        assert package.requirement.endswith(f"--hash=sha256:{package.sha256}")
        for source in spec.sources:
            assert re.fullmatch(r"[0-9a-f]{64}", source.sha256)
            assert source.member.startswith(f"{package.name}-{package.version}/")
            assert source.layout in ("prose", "verse", "verbatim")
            # one cache file per member: two members never share a cached name
            path = corpus._cached(package, source)
            assert cached.setdefault(path, source.sha256) == source.sha256


def test_verbatim_keeps_code_and_markup() -> None:
    code = "# a comment\r\ndef f(x):   \n\n    return x  # trailing\n\n\n"
    assert corpus.verbatim(code) == "# a comment\ndef f(x):\n\n    return x  # trailing"
    rst = "Title\n=====\n\n.. code-block:: python\n\n    x = 1\n"
    assert corpus.verbatim(rst) == rst.rstrip("\n")
    # the transcription cleaning would have eaten the comment line
    assert "# a comment" not in corpus.clean(code, prose=False)


def _fake_index(
    monkeypatch: pytest.MonkeyPatch, archive: str, members: dict[str, bytes]
) -> list[Sequence[str]]:
    """download.pip_download writing a tar.gz with `members` instead of asking the index."""
    calls: list[Sequence[str]] = []

    def fake_download(args: Sequence[str], into: Path) -> None:
        calls.append(list(args))
        with tarfile.open(into / archive, "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    monkeypatch.setattr(download, "pip_download", fake_download)
    return calls


LAYOUTS: tuple[corpus.Layout, ...] = ("verbatim", "prose")


def _register(monkeypatch: pytest.MonkeyPatch, members: dict[str, bytes]) -> corpus.CorpusSpec:
    package = corpus.Package("fakepkg", "1.0", "fakepkg-1.0.tar.gz", "0" * 64)
    spec = corpus.CorpusSpec(
        "fake",
        "test corpus",
        package,
        tuple(
            corpus.Source(m, hashlib.sha256(d).hexdigest(), layout)
            for (m, d), layout in zip(members.items(), LAYOUTS, strict=False)
        ),
    )
    monkeypatch.setitem(corpus.REGISTRY, "fake", spec)
    return spec


def test_fetch_verifies_caches_and_cleans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_SPARSEK_HOME", str(tmp_path))
    members = {
        "fakepkg-1.0/src/mod.py": b"# header\nclass A:\n    pass\n",
        "fakepkg-1.0/docs/a.txt": b"Wrapped\nprose.\n\nNext.\n",
    }
    spec = _register(monkeypatch, members)
    calls = _fake_index(monkeypatch, "fakepkg-1.0.tar.gz", members)
    text = corpus.load_text("fake")
    assert text == "# header\nclass A:\n    pass\n\nWrapped prose.\n\nNext."
    assert calls and "--require-hashes" in calls[0]
    for source in spec.sources:
        assert corpus._cached(spec.package, source).read_bytes() == members[source.member]
    assert corpus.load_text("fake") == text
    assert len(calls) == 1  # the second load came from the cache


def test_fetch_refuses_a_member_that_does_not_match_its_pin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_SPARSEK_HOME", str(tmp_path))
    members = {"fakepkg-1.0/src/mod.py": b"pass\n"}
    spec = _register(monkeypatch, members)
    _fake_index(monkeypatch, "fakepkg-1.0.tar.gz", {"fakepkg-1.0/src/mod.py": b"evil()\n"})
    with pytest.raises(corpus.CorpusError, match="does not match the pin"):
        corpus.load_text("fake")
    assert not corpus._cached(spec.package, spec.sources[0]).exists()
    _fake_index(monkeypatch, "fakepkg-1.0.tar.gz", {"fakepkg-1.0/other.py": b"pass\n"})
    with pytest.raises(corpus.CorpusError, match="lacks"):
        corpus.load_text("fake")


# the start of each corpus and a lower bound on its length in characters (>= ~20k tokens)
EXPECTED = {
    "python-code": ('"""Compiles nodes from the parser into Python code."""', 120_000),
    "tech-docs": (".. py:currentmodule:: jinja2", 100_000),
    "dialogue": ("HAMLET, PRINCE OF DENMARK", 150_000),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_new_corpora_download(name: str) -> None:
    spec = corpus.spec(name)
    if os.environ.get("LLAMA_SPARSEK_OFFLINE") == "1" and not all(
        corpus._cached(spec.package, s).exists() for s in spec.sources
    ):
        pytest.skip("the corpus is not cached and LLAMA_SPARSEK_OFFLINE=1")
    start, size = EXPECTED[name]
    text = corpus.load_text(name)
    assert text.startswith(start)
    assert len(text) > size
    assert "\r" not in text and not text.endswith("\n")
