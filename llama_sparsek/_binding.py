"""The loaded libllama: the cffi module, one-time backend set-up, logging and error checks."""

from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Any

# On a failed GGML_ASSERT, ggml forks a debugger (or backtrace()) to print the stack; when two
# compute threads fail at once, that fork in a multi-threaded process can deadlock, and the
# process hangs instead of aborting. GGML_NO_BACKTRACE (read by ggml when the library loads
# and when it aborts) makes an assert print its message and abort. LLAMA_SPARSEK_BACKTRACE=1
# keeps ggml's backtraces (for debugging the native code).
if not os.environ.get("LLAMA_SPARSEK_BACKTRACE"):
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")

try:
    from llama_sparsek._llama_cffi import ffi as ffi
    from llama_sparsek._llama_cffi import lib as lib
except ImportError as e:  # a source checkout without a build
    raise ImportError(
        "llama_sparsek's native module is missing: install the package with `pip install .`"
    ) from e

log = logging.getLogger("llama_sparsek.llama_cpp")

# The patch series this Python code was written for (patch 0001 defines the function).
EXPECTED_SPARSEK_VERSION = "sparsek-7"

_LEVELS = {
    lib.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    lib.GGML_LOG_LEVEL_INFO: logging.INFO,
    lib.GGML_LOG_LEVEL_WARN: logging.WARNING,
    lib.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}


class LlamaError(RuntimeError):
    """llama.cpp refused an operation; the message carries its own reason where it gave one."""


class _LogState:
    """Reassembles llama.cpp's log pieces into lines, per thread; keeps the ERROR lines of each
    thread's current call for its exception.

    llama.cpp logs from the thread that made the call, so a thread only ever sees the errors of
    its own calls: another thread's failure (or any warning) never lands in its exception.
    """

    def __init__(self) -> None:
        self.local = threading.local()

    def _thread(self) -> threading.local:
        state = self.local
        if not hasattr(state, "pending"):
            state.pending = ""
            state.level = logging.INFO
            state.errors = collections.deque(maxlen=8)
        return state

    def feed(self, level: int, text: str) -> None:
        state = self._thread()
        if level != lib.GGML_LOG_LEVEL_CONT:
            state.level = _LEVELS.get(level, logging.DEBUG)
        state.pending += text
        while "\n" in state.pending:
            line, state.pending = state.pending.split("\n", 1)
            if state.level >= logging.ERROR and line.strip():
                state.errors.append(line.strip())
            log.log(state.level, "%s", line)

    def take_errors(self) -> str:
        state = self._thread()
        msgs = list(state.errors)
        state.errors.clear()
        return "; ".join(msgs)


_log_state = _LogState()


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _llama_sparsek_log(level: int, text: Any, _user_data: Any) -> None:
    _log_state.feed(level, ffi.string(text).decode("utf-8", errors="replace"))


def clear_errors() -> None:
    """Start a call: forget this thread's earlier log errors (its exception reports its own)."""
    _log_state.take_errors()


def fail(what: str) -> LlamaError:
    """An exception for a failed call, with the reason llama.cpp logged as an ERROR on this thread
    since `clear_errors()`, when it logged one."""
    reason = _log_state.take_errors()
    return LlamaError(f"{what}: {reason}" if reason else what)


_initialised = False
_init_lock = threading.Lock()


def init() -> None:
    """Route llama.cpp's log to Python logging and initialise the backends, once."""
    global _initialised
    with _init_lock:
        if _initialised:
            return
        lib.llama_log_set(lib._llama_sparsek_log, ffi.NULL)
        version = ffi.string(lib.llama_sparsek_version()).decode()
        if version != EXPECTED_SPARSEK_VERSION:
            raise ImportError(
                f"libllama carries patch series {version!r}, expected {EXPECTED_SPARSEK_VERSION!r}"
            )
        lib.llama_backend_init()
        _initialised = True


def c_string(value: Any) -> str:
    """A NUL-terminated C string as str (invalid UTF-8 replaced)."""
    return "" if value == ffi.NULL else ffi.string(value).decode("utf-8", errors="replace")
