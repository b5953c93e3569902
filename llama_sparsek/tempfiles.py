"""Hidden temporary files (and directories) next to their destination, and the clean-up of
those a killed process left behind.

A writer names its temporary `.{name}.{pid}.{random}{suffix}` in the destination's directory,
so that a rename publishes it atomically. SIGKILL (or a power cut) leaves it there; the next
writer of the same name removes those whose process is gone, or that nobody has written to for
STALE_AFTER_S (a live writer keeps touching its file; a pid may have been reused).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

STALE_AFTER_S = 15 * 60


def prefix(name: str) -> str:
    """The prefix of this process's temporaries for the destination `name`."""
    return f".{name}.{os.getpid()}."


def mkstemp(dest: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """A new temporary file for `dest`, in its directory (after cleaning stale ones)."""
    clean_stale(dest.parent, dest.name, suffix)
    return tempfile.mkstemp(prefix=prefix(dest.name), suffix=suffix, dir=dest.parent)


def mkdtemp(dest: Path, suffix: str = ".tmp") -> Path:
    """A new temporary directory for `dest`, in its directory (after cleaning stale ones)."""
    clean_stale(dest.parent, dest.name, suffix)
    return Path(tempfile.mkdtemp(prefix=prefix(dest.name), suffix=suffix, dir=dest.parent))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(directory: Path, name: str, suffix: str = ".tmp") -> list[Path]:
    """Remove the temporaries for `name` in `directory` that no live writer owns."""
    removed: list[Path] = []
    head = f".{name}."
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not (entry.name.startswith(head) and entry.name.endswith(suffix)):
            continue
        pid_text = entry.name[len(head) :].split(".", 1)[0]
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid == os.getpid():
            continue
        owner_gone = pid is not None and not _pid_alive(pid)
        if not (owner_gone or now - mtime > STALE_AFTER_S):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed
