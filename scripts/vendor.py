#!/usr/bin/env python3
"""Materialise the pinned llama.cpp tree and apply llama-sparsek's patch series.

    python scripts/vendor.py sync      # fetch, verify, extract, apply patches/*.patch (idempotent)
    python scripts/vendor.py export    # regenerate patches/ from the working copy's commits
    python scripts/vendor.py status    # pin, source, applied patches

vendor/llama.cpp/ is a git working copy: its first commit (tag `upstream`) is the pristine
pinned tree, then one commit per patch. Developers edit C++ there, commit one concern per
commit and run `export`. Only the standard library is used: CMake runs this at configure time.

Environment:
    LLAMA_SPARSEK_LLAMA_CPP_DIR  an existing upstream git checkout of the pinned commit
                                 (offline builds); used instead of the sdist
    LLAMA_SPARSEK_HOME           cache root (default: $XDG_CACHE_HOME/llama-sparsek)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = ROOT / "vendor" / "llama.cpp.toml"
PATCH_DIR = ROOT / "patches"
TREE = ROOT / "vendor" / "llama.cpp"
BASE_TAG = "upstream"
STAMP = "llama-sparsek-stamp"  # inside the working copy's .git: what sync last produced
# fixed identity and dates so that the same pin and patches give the same commit ids
GIT_ENV = {
    "GIT_AUTHOR_NAME": "llama-sparsek",
    "GIT_AUTHOR_EMAIL": "llama-sparsek@localhost",
    "GIT_COMMITTER_NAME": "llama-sparsek",
    "GIT_COMMITTER_EMAIL": "llama-sparsek@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z",
}


class VendorError(RuntimeError):
    """A step of vendoring failed; the message says which and why."""


@dataclass(frozen=True)
class Pin:
    commit: str
    package: str
    version: str
    filename: str
    sha256: str
    subtree: str
    head_file: str


def load_pin(path: Path = PIN_FILE) -> Pin:
    data = tomllib.loads(path.read_text())
    src = data["source"]
    return Pin(
        commit=data["upstream"]["commit"],
        package=src["package"],
        version=src["version"],
        filename=src["filename"],
        sha256=src["sha256"],
        subtree=src["subtree"].strip("/"),
        head_file=src["head_file"],
    )


def cache_dir() -> Path:
    home = os.environ.get("LLAMA_SPARSEK_HOME")
    if home:
        return Path(home) / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llama-sparsek"


def patch_files() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, text=True, capture_output=True)
    if check and proc.returncode != 0:
        raise VendorError(f"git {' '.join(args)} failed in {cwd}:\n{proc.stderr.strip()}")
    return proc


# ---------------------------------------------------------------- fetching


def fetch_sdist(pin: Pin) -> Path:
    """Return the verified sdist from the cache, downloading it with pip if needed."""
    dest = cache_dir() / "sdist" / pin.filename
    if dest.exists():
        if sha256_file(dest) == pin.sha256:
            return dest
        dest.unlink()  # a corrupt cache entry is refetched, never used
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # pip prepares the sdist's metadata, i.e. runs its build backend, as soon as it has
        # the file: the pinned hash goes to pip (--require-hashes), which checks it right
        # after the download, before anything from the archive runs. --no-build-isolation
        # makes that backend (scikit-build-core, ours too) the installed one.
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text(f"{pin.package}=={pin.version} --hash=sha256:{pin.sha256}\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            "--require-hashes",
            "-r",
            str(reqs),
            "--dest",
            tmp,
        ]
        print(f"vendor: downloading {pin.package}=={pin.version} sdist", flush=True)
        proc = subprocess.run(cmd, text=True, capture_output=True)
        got = Path(tmp) / pin.filename
        if proc.returncode != 0 or not got.exists():
            raise VendorError(
                f"could not download {pin.package}=={pin.version} with pip "
                f"(set LLAMA_SPARSEK_LLAMA_CPP_DIR to build offline):\n{proc.stderr.strip()}"
            )
        actual = sha256_file(got)
        if actual != pin.sha256:
            raise VendorError(
                f"{pin.filename}: sha256 {actual} does not match the pin {pin.sha256}"
            )
        os.replace(got, dest)
    return dest


def extract_sdist(pin: Pin, sdist: Path, dest: Path) -> None:
    """Extract the pinned subtree of the sdist into dest, checking the recorded HEAD."""
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/{pin.subtree}/"
        head_member = tar.extractfile(f"{top}/{pin.head_file}")
        head = head_member.read().decode().strip() if head_member else ""
        if head != pin.commit:
            raise VendorError(f"{sdist.name} carries llama.cpp {head!r}, the pin is {pin.commit}")
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix) :]
            if rel in ("", ".git"):  # .git is a submodule pointer, not part of the tree
                continue
            m.name = rel
            members.append(m)
        tar.extractall(dest, members=members, filter="data")


def export_checkout(pin: Pin, checkout: Path, dest: Path) -> None:
    """Copy the committed tree of an existing upstream checkout (must be the pinned commit)."""
    head = git(checkout, "rev-parse", "HEAD").stdout.strip()
    if head != pin.commit:
        raise VendorError(
            f"LLAMA_SPARSEK_LLAMA_CPP_DIR={checkout} is at {head}, the pin is {pin.commit}"
        )
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=checkout, capture_output=True)
    if archive.returncode != 0:
        raise VendorError(f"git archive failed in {checkout}: {archive.stderr.decode()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")


# ---------------------------------------------------------------- the working copy


def series_stamp(pin: Pin, patches: list[Path]) -> str:
    digest = hashlib.sha256(pin.commit.encode())
    for p in patches:
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.hexdigest()


def read_stamp(tree: Path) -> tuple[str, str] | None:
    """(series stamp, HEAD it produced), or None when the tree was never synced."""
    path = tree / ".git" / STAMP
    if not path.exists():
        return None
    stamp, head = path.read_text().split()
    return stamp, head


def write_stamp(tree: Path, stamp: str) -> None:
    head = git(tree, "rev-parse", "HEAD").stdout.strip()
    (tree / ".git" / STAMP).write_text(f"{stamp} {head}\n")


def apply_patches(tree: Path, patches: list[Path]) -> None:
    """git am each patch in order (no fuzz); on failure abort and name patch and file."""
    for patch in patches:
        proc = git(
            tree, "am", "--quiet", "--committer-date-is-author-date", str(patch), check=False
        )
        if proc.returncode != 0:
            git(tree, "am", "--abort", check=False)
            files = re.findall(r"patch failed: ([^:\n]+)", proc.stderr)
            files += re.findall(r"error: ([^:\n]+): does not exist in index", proc.stderr)
            where = f" (failing file: {', '.join(dict.fromkeys(files))})" if files else ""
            raise VendorError(f"patch {patch.name} does not apply{where}:\n{proc.stderr.strip()}")


def create_tree(pin: Pin, dest: Path, patches: list[Path], stamp: str) -> None:
    """Build a fresh working copy in a staging directory, then move it into place."""
    staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    try:
        upstream = os.environ.get("LLAMA_SPARSEK_LLAMA_CPP_DIR")
        if upstream:
            export_checkout(pin, Path(upstream), staging)
        else:
            extract_sdist(pin, fetch_sdist(pin), staging)
        git(staging, "init", "--quiet", "--initial-branch=main")
        git(staging, "config", "core.autocrlf", "false")
        git(staging, "add", "--all", "--force")
        git(staging, "commit", "--quiet", "--no-verify", "-m", f"upstream llama.cpp {pin.commit}")
        git(staging, "tag", BASE_TAG)
        apply_patches(staging, patches)
        write_stamp(staging, stamp)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def reapply(tree: Path, patches: list[Path], stamp: str) -> None:
    """Re-apply a changed series in place (touching only changed files); restore on failure."""
    old_head = git(tree, "rev-parse", "HEAD").stdout.strip()
    git(tree, "reset", "--quiet", "--hard", BASE_TAG)
    try:
        apply_patches(tree, patches)
    except VendorError:
        git(tree, "reset", "--quiet", "--hard", old_head)
        raise
    write_stamp(tree, stamp)


def sync(force: bool = False) -> str:
    pin = load_pin()
    patches = patch_files()
    stamp = series_stamp(pin, patches)
    if not (TREE / ".git").is_dir():
        if TREE.exists():
            raise VendorError(f"{TREE} exists but is not a git working copy; remove it")
        create_tree(pin, TREE, patches, stamp)
        return f"vendor: created {TREE.relative_to(ROOT)} with {len(patches)} patch(es)"
    recorded = read_stamp(TREE)
    head = git(TREE, "rev-parse", "HEAD").stdout.strip()
    dirty = git(TREE, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if recorded == (stamp, head) and not dirty:
        return "vendor: up to date"
    if recorded is not None and recorded[0] == stamp and not force:
        # same series, but the developer has commits or edits that are not exported yet
        return "vendor: working copy has local changes (run `export` to keep them); left as is"
    if (dirty or (recorded is not None and recorded[1] != head)) and not force:
        raise VendorError(
            "patches/ changed but the working copy has unexported changes; "
            "run `scripts/vendor.py export` or `sync --force`"
        )
    reapply(TREE, patches, stamp)
    return f"vendor: re-applied {len(patches)} patch(es)"


def export() -> str:
    if not (TREE / ".git").is_dir():
        raise VendorError(f"no working copy at {TREE}; run `sync` first")
    if git(TREE, "status", "--porcelain", "--untracked-files=no").stdout.strip():
        raise VendorError("the working copy has uncommitted changes; commit them first")
    with tempfile.TemporaryDirectory() as tmp:
        git(
            TREE,
            "format-patch",
            "--quiet",
            "--zero-commit",
            "--no-signature",
            "--no-stat",
            "-o",
            tmp,
            f"{BASE_TAG}..HEAD",
        )
        new = sorted(Path(tmp).glob("*.patch"))
        for old in patch_files():
            old.unlink()
        PATCH_DIR.mkdir(exist_ok=True)
        for p in new:
            shutil.copyfile(p, PATCH_DIR / p.name)
    write_stamp(TREE, series_stamp(load_pin(), patch_files()))
    return f"vendor: exported {len(new)} patch(es) to {PATCH_DIR.relative_to(ROOT)}/"


def status() -> str:
    pin = load_pin()
    lines = [f"pin: llama.cpp {pin.commit} ({pin.package}=={pin.version} sdist)"]
    if not (TREE / ".git").is_dir():
        lines.append("working copy: absent (run `sync`)")
        return "\n".join(lines)
    log = git(TREE, "log", "--format=%s", f"{BASE_TAG}..HEAD", "--reverse").stdout.split("\n")
    lines.append(f"applied patches: {len([s for s in log if s])}")
    lines += [f"  {s}" for s in log if s]
    recorded = read_stamp(TREE)
    fresh = recorded is not None and recorded[0] == series_stamp(pin, patch_files())
    lines.append("patches/: " + ("in sync" if fresh else "differs from the working copy"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p_sync = sub.add_parser("sync", help="materialise vendor/llama.cpp and apply patches/")
    p_sync.add_argument("--force", action="store_true", help="discard unexported local changes")
    sub.add_parser("export", help="regenerate patches/ from the working copy")
    sub.add_parser("status", help="show the pin and the applied patches")
    args = parser.parse_args(argv)
    try:
        if args.verb == "sync":
            print(sync(force=args.force))
        elif args.verb == "export":
            print(export())
        else:
            print(status())
    except VendorError as e:
        print(f"vendor: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
