"""SparseK attention for llama.cpp: a pinned, patched llama.cpp with a Python API and CLI."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llama_sparsek.sparsek import SparseK, recommended

if TYPE_CHECKING:
    from llama_sparsek.llama import Llama
    from llama_sparsek.sampling import Sampling

# loaded on first use, so that commands which never run a model (gguf, models) start fast
_LAZY = {"Llama": "llama_sparsek.llama", "Sampling": "llama_sparsek.sampling"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llama_sparsek' has no attribute {name!r}")


__all__ = ["Llama", "Sampling", "SparseK", "generate", "recommended"]
__version__ = "0.1.0"


def generate(
    prompt: str,
    model: str | os.PathLike[str] | None = None,
    *,
    max_tokens: int = 128,
    sparsek: SparseK | None = None,
    dense: bool = False,
    temperature: float = 0.0,
    top_k: int = 40,
    top_p: float = 0.95,
    min_p: float = 0.05,
    seed: int | None = None,
    stop: Sequence[str] = (),
    **llama_options: Any,
) -> str:
    """Complete `prompt` with a model (default: the registry's default, pulled on first use).

    SparseK is on with the recommended settings unless `sparsek` gives others or `dense` is set
    (dense attention even if the model file enables SparseK).
    `llama_options` go to `Llama` (n_ctx, n_threads, flash_attn, kv_overrides, ...).
    """
    from llama_sparsek import models
    from llama_sparsek.llama import Llama

    if dense and sparsek is not None:
        raise ValueError("pass either sparsek or dense=True, not both")
    path = models.resolve(model)
    settings = False if dense else (sparsek or recommended())
    with Llama(path, sparsek=settings, seed=seed, **llama_options) as llm:
        return llm.generate(
            prompt,
            max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            stop=stop,
        )
