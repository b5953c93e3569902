"""How large a context to open: the model's trained context, capped by a KV cache memory budget.

The rule (used by the CLI when --ctx is not given):

    n_ctx = min(trained context, KV budget / KV bytes per token), rounded down to 256, >= 256
    KV budget = min(8 GiB, a quarter of the machine's physical memory)
    KV bytes per token = sum over layers of n_head_kv * (key width * K cache type's bytes per
                         element + value width * V cache type's bytes per element)

The per-token size is an upper bound: sliding-window layers (Gemma 3) hold fewer cells. An
explicit context whose KV cache would exceed all of physical memory is refused up front.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llama_sparsek.gguf import GGUFArray, GGUFInfo, read_metadata

KV_BUDGET_MAX = 8 << 30
KV_BUDGET_FRACTION = 4  # a quarter of physical memory
N_CTX_STEP = 256
N_CTX_MAX = 2**32 - 1  # llama.cpp's n_ctx is a uint32

# bytes per element of each KV cache type (block size / block bytes for the quantized ones)
CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}


@dataclass(frozen=True)
class ContextPlan:
    n_ctx: int
    n_ctx_train: int
    kv_bytes_per_token: int
    budget: int

    def describe(self) -> str:
        gib = self.kv_bytes_per_token * self.n_ctx / 2**30
        return (
            f"context {self.n_ctx} (trained {self.n_ctx_train}, KV cache ~{gib:.2f} GiB, "
            f"budget {self.budget / 2**30:.2f} GiB)"
        )


def physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 << 30  # unknown: assume a modest machine


def kv_budget() -> int:
    return min(KV_BUDGET_MAX, physical_memory() // KV_BUDGET_FRACTION)


def _int(info: GGUFInfo, key: str, default: int | None = None) -> int:
    found = info.fields.get(key)
    if found is None:
        if default is None:
            raise ValueError(f"{info.path}: no {key} in the GGUF metadata")
        return default
    value = found.value
    if isinstance(value, GGUFArray):  # per-layer values: the largest bounds the cache
        value = max((v for v in value.items if isinstance(v, int)), default=0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{info.path}: {key} is not an integer")
    return value


def kv_bytes_per_cell(
    n_layer: int, n_head_kv: int, k_dim: int, v_dim: int, type_k: str = "f16", type_v: str = "f16"
) -> int:
    """An upper bound of the KV cache's bytes per context cell (every layer at full size)."""
    per_layer = n_head_kv * (k_dim * CACHE_TYPE_BYTES[type_k] + v_dim * CACHE_TYPE_BYTES[type_v])
    return max(1, int(n_layer * per_layer))


def context_bytes(per_cell: int, n_ctx: int, n_batch: int, n_vocab: int) -> int:
    """What a context allocates beyond the model, estimated from above: the KV cache (n_ctx
    rounded up to 256 cells, as llama.cpp pads it) and the logits of n_batch rows. Compute
    buffers (tens of MB for small models) are not counted."""
    cells = -(-n_ctx // N_CTX_STEP) * N_CTX_STEP
    return cells * per_cell + 4 * n_batch * n_vocab


def available_memory() -> int | None:
    """Bytes of memory the system can still give (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def kv_bytes_per_token(info: GGUFInfo, type_k: str = "f16", type_v: str = "f16") -> int:
    """An upper bound of the KV cache's bytes per context cell for a model file."""
    arch = info.require_arch()
    n_layer = _int(info, f"{arch}.block_count")
    n_head = _int(info, f"{arch}.attention.head_count")
    n_head_kv = _int(info, f"{arch}.attention.head_count_kv", n_head)
    head_dim = _int(info, f"{arch}.embedding_length") // max(n_head, 1)
    k_dim = _int(info, f"{arch}.attention.key_length", head_dim)
    v_dim = _int(info, f"{arch}.attention.value_length", head_dim)
    return kv_bytes_per_cell(n_layer, n_head_kv, k_dim, v_dim, type_k, type_v)


def plan(
    path: str | os.PathLike[str],
    n_ctx: int | None = None,
    *,
    type_k: str = "f16",
    type_v: str = "f16",
) -> ContextPlan:
    """The context to open for a model: `n_ctx` if given (checked), else the rule above."""
    info = read_metadata(Path(path))
    arch = info.require_arch()
    per_token = kv_bytes_per_token(info, type_k, type_v)
    trained = _int(info, f"{arch}.context_length", 4096)
    budget = kv_budget()
    if n_ctx is None:
        fit = budget // per_token // N_CTX_STEP * N_CTX_STEP
        return ContextPlan(max(N_CTX_STEP, min(trained, fit)), trained, per_token, budget)
    if isinstance(n_ctx, bool) or not 1 <= n_ctx <= N_CTX_MAX:
        raise ValueError(f"the context size must be in [1, {N_CTX_MAX}], got {n_ctx}")
    need, have = per_token * n_ctx, physical_memory()
    if need > have:
        raise ValueError(
            f"a context of {n_ctx} tokens needs a KV cache of ~{need / 2**30:.1f} GiB, more than "
            f"this machine's {have / 2**30:.1f} GiB of memory"
        )
    return ContextPlan(n_ctx, trained, per_token, budget)
