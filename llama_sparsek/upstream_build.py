"""A pristine build of the pinned upstream llama.cpp, for benchmarks against it.

The source is the `upstream` tag of the vendored working copy (`vendor/llama.cpp`, made by
`scripts/vendor.py sync`): the pinned tree without our patches. It is exported with `git archive`
into a cache directory keyed by the pinned commit (`models.home() / "upstream-<commit>"`) and
configured like this project's build (Release, shared libraries, the same `GGML_*` flags that
`build_info.json` records, ccache when present); only the requested tool is built. A build
counts as done only once its stamp is written, so an interrupted build is resumed, never used.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from llama_sparsek import models, tools

TAG = "upstream"
STAMP = "built.json"
# the tag's commit is made by scripts/vendor.py with this subject
_SUBJECT = re.compile(r"^upstream llama\.cpp ([0-9a-f]{40})$")


class UpstreamBuildError(RuntimeError):
    """The pristine tree could not be found or built; the message says why."""


def default_source() -> Path:
    """The vendored working copy next to this package (a source checkout) or under the cwd."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        tree = root / "vendor" / "llama.cpp"
        if (tree / ".git").exists():
            return tree
    raise UpstreamBuildError(
        "no vendor/llama.cpp working copy found (run `python scripts/vendor.py sync` in a source "
        "checkout, or pass its path)"
    )


def _git(tree: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UpstreamBuildError(f"git {' '.join(args)} failed in {tree}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def pinned_commit(tree: Path) -> str:
    """The upstream commit the tag holds (from its subject), else the tag's own commit id."""
    tag = f"{TAG}^{{commit}}"
    subject = _git(tree, "log", "-1", "--format=%s", tag)
    found = _SUBJECT.match(subject)
    return found.group(1) if found else _git(tree, "rev-parse", tag)


def cmake_flags(build_info: Mapping[str, object], ccache: str | None) -> list[str]:
    """Configure flags: this project's GGML_* choices, upstream's tools only, no network code."""
    recorded = build_info.get("cmake_args", {})
    assert isinstance(recorded, Mapping)
    ggml = {k: str(v) for k, v in recorded.items() if k.startswith("GGML_") and k != "GGML_CCACHE"}
    flags = {
        "CMAKE_BUILD_TYPE": "Release",
        "BUILD_SHARED_LIBS": "ON",
        "CMAKE_POSITION_INDEPENDENT_CODE": "ON",
        "LLAMA_BUILD_TESTS": "OFF",
        "LLAMA_BUILD_EXAMPLES": "OFF",
        "LLAMA_BUILD_SERVER": "OFF",
        "LLAMA_BUILD_APP": "OFF",
        "LLAMA_OPENSSL": "OFF",
        "GGML_CCACHE": "OFF",  # the launcher below, when present
        **ggml,
    }
    if ccache:
        flags["CMAKE_C_COMPILER_LAUNCHER"] = ccache
        flags["CMAKE_CXX_COMPILER_LAUNCHER"] = ccache
    return [f"-D{k}={v}" for k, v in sorted(flags.items())]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per cache directory at a time (concurrent benchmarks wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _export(tree: Path, dest: Path) -> None:
    """`git archive` of the tag into dest, through a staging directory (never half a tree)."""
    archive = subprocess.run(["git", "archive", "--format=tar", TAG], cwd=tree, capture_output=True)
    if archive.returncode != 0:
        raise UpstreamBuildError(f"git archive {TAG} failed in {tree}: {archive.stderr.decode()}")
    staging = Path(tempfile.mkdtemp(prefix=".src-", dir=dest.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(staging, filter="data")
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _run_logged(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise UpstreamBuildError(f"{cmd[0]} failed (log: {log}):\n{tail}")


def build(tool: str = "llama-completion", *, source: Path | None = None) -> Path:
    """The pristine upstream `tool`, built on first use and reused afterwards; its path."""
    tree = source or default_source()
    commit = pinned_commit(tree)
    info = tools.build_info()
    ours = str(info.get("llama_cpp_commit", ""))
    if _SUBJECT.match(f"upstream llama.cpp {commit}") and commit != ours:
        raise UpstreamBuildError(
            f"{tree} holds llama.cpp {commit}, this install was built from {ours}: "
            "the comparison needs both at the same pin"
        )
    root = models.home() / f"upstream-{commit[:12]}"
    ccache = shutil.which("ccache")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    flags = generator + cmake_flags(info, ccache)
    exe = root / "build" / "bin" / tool
    wanted = {"commit": commit, "flags": flags, "tool": tool}
    with _locked(root.with_name(root.name + ".lock")):
        stamp = root / f"{tool}.{STAMP}"
        if exe.exists() and _stamp(stamp) == wanted:
            return exe
        root.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        if not (root / "src").exists():
            _export(tree, root / "src")
        log = root / "build.log"
        parallel = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        build_dir = root / "build"
        if (build_dir / "CMakeCache.txt").exists() and _stamp_flags(build_dir) != flags:
            shutil.rmtree(build_dir)  # other flags or generator: configure afresh
        _run_logged(["cmake", "-S", str(root / "src"), "-B", str(build_dir), *flags], log)
        (build_dir / "flags.json").write_text(json.dumps(flags))
        _run_logged(
            ["cmake", "--build", str(build_dir), "--target", tool, "--parallel", parallel], log
        )
        if not exe.exists():
            raise UpstreamBuildError(f"the build finished without {exe}")
        partial = stamp.with_suffix(".partial")
        partial.write_text(json.dumps(wanted))
        os.replace(partial, stamp)
    return exe


def _stamp(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stamp_flags(build_dir: Path) -> object:
    return _stamp(build_dir / "flags.json")
