"""The upstream programs bundled with the package (test-backend-ops, llama-perplexity, ...,
llama-server and the RPC worker ggml-rpc-server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
BIN_DIR = PACKAGE_DIR / "_bin"
# llama-server's chat page (static files for its --path), when the build could provide it
UI_DIR = PACKAGE_DIR / "_ui"
TOOLS = (
    "test-backend-ops",
    "llama-perplexity",
    "llama-bench",
    "llama-completion",
    "llama-server",
    "ggml-rpc-server",
)


def tool_path(name: str) -> Path:
    """The bundled binary `name`; FileNotFoundError when this install lacks it."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; bundled: {', '.join(TOOLS)}")
    path = BIN_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall llama-sparsek with `pip install .`")
    return path


def ui_dir() -> Path | None:
    """The directory of llama-server's chat page, or None when this install has none."""
    return UI_DIR if (UI_DIR / "index.html").is_file() else None


def build_info() -> dict[str, Any]:
    """What the build recorded: pinned commit, applied patches, build flags."""
    info: dict[str, Any] = json.loads((PACKAGE_DIR / "build_info.json").read_text())
    info["patches"] = [p for p in info.get("patches", []) if p]
    return info
