#!/usr/bin/env python3
"""Provide llama-server's chat page (its web UI) to the build, from a pinned package.

At the pinned llama.cpp commit the UI is no longer in the source tree: upstream builds it with
npm or downloads it from a model hub while building, and build machines here reach neither.
Upstream kept the same Svelte UI as a static build in `tools/server/public/` (index.html,
bundle.js, bundle.css, loading.html) up to llama.cpp commit 7d442abf, which the sdist of
llama-cpp-python 0.3.23 carries. This script takes those four files from that sdist
(downloaded with pip, sha256-verified, cached like the main sdist by scripts/vendor.py) and
writes them to DEST; CMake installs DEST as `llama_sparsek/_ui`, and `llama-sparsek serve`
hands it to llama-server with `--path`.

    python scripts/ui_assets.py DEST

Exit status 1 with a message when the sdist cannot be had: the build then goes on without the
page (the server's API works the same).
"""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vendor  # scripts/vendor.py: the same download and cache

UI_PIN = vendor.Pin(
    commit="7d442abf5c6244117fd5a1dc51a5d19f00792491",
    package="llama-cpp-python",
    version="0.3.23",
    filename="llama_cpp_python-0.3.23.tar.gz",
    sha256="85493cd887b543588941e8704640fef6a54c057443292e527559c30728375ffd",
    subtree="vendor/llama.cpp",
    head_file=".git/modules/vendor/llama.cpp/HEAD",
)
UI_DIR = "tools/server/public"
UI_FILES = ("index.html", "bundle.js", "bundle.css", "loading.html")
LICENSE = "LICENSE"


def extract(sdist: Path, dest: Path) -> None:
    """Write the UI files (and llama.cpp's license) from `sdist` into `dest`, all or none."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar, tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        top = tar.getmembers()[0].name.split("/")[0]
        root = f"{top}/{UI_PIN.subtree}"
        wanted = {f"{root}/{UI_DIR}/{name}": name for name in UI_FILES}
        wanted[f"{root}/{LICENSE}"] = LICENSE
        for member, name in wanted.items():
            data = tar.extractfile(member)
            if data is None:
                raise vendor.VendorError(f"{sdist.name} has no {member}")
            (Path(tmp) / name).write_bytes(data.read())
        staged = Path(tmp) / "ui"
        staged.mkdir()
        for name in wanted.values():
            os.replace(Path(tmp) / name, staged / name)
        if dest.exists():
            for old in dest.iterdir():
                old.unlink()
            dest.rmdir()
        os.replace(staged, dest)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(argv[0])
    if all((dest / name).is_file() for name in UI_FILES):
        return 0
    try:
        extract(vendor.fetch_sdist(UI_PIN), dest)
    except (vendor.VendorError, OSError, tarfile.TarError, KeyError) as e:
        print(f"ui_assets: no chat page for llama-server: {e}", file=sys.stderr)
        return 1
    print(f"ui_assets: llama-server chat page from llama.cpp {UI_PIN.commit[:8]} in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
