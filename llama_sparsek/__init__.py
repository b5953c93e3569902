"""SparseK attention for llama.cpp: a pinned, patched llama.cpp with a Python API and CLI."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from llama_sparsek.sparsek import SparseK, recommended

if TYPE_CHECKING:
    from llama_sparsek.llama import Llama
    from llama_sparsek.sampling import Sampling
    from llama_sparsek.timings import Timings

# loaded on first use, so that commands which never run a model (gguf, models) start fast
_LAZY = {
    "Llama": "llama_sparsek.llama",
    "Sampling": "llama_sparsek.sampling",
    "Timings": "llama_sparsek.timings",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llama_sparsek' has no attribute {name!r}")


__all__ = ["Llama", "Sampling", "SparseK", "Timings", "generate", "recommended"]
# the one place with the version: pyproject.toml reads it from here (scikit-build-core regex)
__version__ = "0.1.0"


def generate(
    prompt: str,
    model: str | os.PathLike[str] | None = None,
    *,
    max_tokens: int = 128,
    sparsek: SparseK | None = None,
    dense: bool = False,
    sampling: Sampling | None = None,
    **options: Any,
) -> str:
    """Complete `prompt` with a model (default: the registry's default, pulled on first use).

    SparseK is on with the recommended settings unless `sparsek` gives others or `dense` is set
    (dense attention even if the model file enables SparseK).
    Options named like `Sampling`'s fields (temperature, top_k, top_p, min_p, repeat_penalty,
    penalty_last_n, seed, stop) change the sampling; the others go to `Llama` (n_ctx,
    n_threads, flash_attn, kv_overrides, ...).
    """
    from llama_sparsek import models
    from llama_sparsek.llama import Llama
    from llama_sparsek.sampling import split_options

    if dense and sparsek is not None:
        raise ValueError("pass either sparsek or dense=True, not both")
    sampling_options, llama_options = split_options(options)
    path = models.resolve(model)
    settings = False if dense else (sparsek or recommended())
    with Llama(path, sparsek=settings, **llama_options) as llm:
        return llm.generate(prompt, max_tokens, sampling=sampling, **sampling_options)
