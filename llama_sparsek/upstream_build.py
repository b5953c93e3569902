"""A pristine build of the pinned upstream llama.cpp, for benchmarks against it.

The source is the `upstream` tag of the vendored working copy (`vendor/llama.cpp`, made by
`scripts/vendor.py sync`): the pinned tree without our patches. It is exported with `git archive`
into a cache directory keyed by the pinned commit (`models.home() / "upstream-<commit>"`) and
configured like this project's build (Release, shared libraries, the same `GGML_*` flags that
`build_info.json` records, ccache when present); only the requested tool is built. A build
counts as done only once its stamp is written, so an interrupted build is resumed, never used.

One exception to "pristine": the pinned tree crashes on some machines for reasons that have
nothing to do with attention (`CRASH_FIXES`); the baseline carries those fixes, taken from the
series' own commits, so that it runs wherever ours does.
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
# subjects of the series' commits that fix crashes of the pinned tree itself: GCC 12 drops the
# stores that fill the AMX tile config, so every Q4_0/Q4_1/Q8_0/K-quant prompt of 32 tokens or
# more dies of SIGILL on a CPU with AMX-INT8
CRASH_FIXES = {"ggml-cpu : keep the AMX tile config in static storage": "AMX tile-config fix"}


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


def crash_fixes(tree: Path) -> dict[str, str]:
    """The commits of `CRASH_FIXES` that the working copy holds after the tag: subject -> id."""
    found: dict[str, str] = {}
    for line in _git(tree, "log", "--format=%H %s", f"{TAG}..HEAD").splitlines():
        commit, _, subject = line.partition(" ")
        found[subject] = commit
    return {subject: found[subject] for subject in CRASH_FIXES if subject in found}


def describe(tree: Path | None = None) -> str:
    """How the baseline differs from the pin, for a table: "pristine", or which fixes it carries."""
    fixes = crash_fixes(tree or default_source())
    return " + ".join(["pristine", *(CRASH_FIXES[subject] for subject in fixes)])


def _export(tree: Path, dest: Path, fixes: Mapping[str, str]) -> None:
    """`git archive` of the tag plus the `fixes` into dest, through a staging directory (never
    half a tree)."""
    archive = subprocess.run(["git", "archive", "--format=tar", TAG], cwd=tree, capture_output=True)
    if archive.returncode != 0:
        raise UpstreamBuildError(f"git archive {TAG} failed in {tree}: {archive.stderr.decode()}")
    staging = Path(tempfile.mkdtemp(prefix=".src-", dir=dest.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(staging, filter="data")
        for subject, commit in fixes.items():
            diff = _git(tree, "format-patch", "-1", "--stdout", commit) + "\n"
            proc = subprocess.run(
                ["git", "apply", "-p1", "-"],
                cwd=staging,
                input=diff,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise UpstreamBuildError(f"{subject!r} does not apply: {proc.stderr.strip()}")
        shutil.rmtree(dest, ignore_errors=True)
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
    fixes = crash_fixes(tree)
    wanted = {"commit": commit, "flags": flags, "tool": tool, "fixes": sorted(fixes)}
    with _locked(root.with_name(root.name + ".lock")):
        stamp = root / f"{tool}.{STAMP}"
        if exe.exists() and _stamp(stamp) == wanted:
            return exe
        root.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        source_stamp = root / "src.json"
        if not (root / "src").exists() or _stamp(source_stamp) != sorted(fixes):
            source_stamp.unlink(missing_ok=True)
            _export(tree, root / "src", fixes)
            source_stamp.write_text(json.dumps(sorted(fixes)))
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
