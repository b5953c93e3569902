"""SparseK settings: the GGUF keys they map to, their validation and the recommended defaults."""

from __future__ import annotations

from dataclasses import dataclass

# Suffixes of the arch-prefixed GGUF keys read by the patched llama.cpp
# (`<arch>.sparsek.<suffix>`, e.g. `llama.sparsek.top_k`).
KEY_ENABLE = "enable"
KEY_TOP_K = "top_k"
KEY_WINDOW = "window"
KEY_STRIDE = "stride"
KEY_SUFFIXES = (KEY_ENABLE, KEY_TOP_K, KEY_WINDOW, KEY_STRIDE)
# the largest value the patched llama.cpp accepts (INT32_MAX/4: sums of them stay in int32)
MAX_VALUE = (2**31 - 1) // 4


def sparsek_key(arch: str, suffix: str) -> str:
    """The full GGUF key for one SparseK setting of an architecture."""
    if suffix not in KEY_SUFFIXES:
        raise ValueError(f"unknown SparseK key suffix {suffix!r}; expected one of {KEY_SUFFIXES}")
    return f"{arch}.sparsek.{suffix}"


def is_sparsek_key(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 3 and parts[1] == "sparsek"


@dataclass(frozen=True)
class SparseK:
    """SparseK attention settings.

    Each query keeps the ``top_k`` best-scoring keys its causal mask allows, plus every key of
    the local ``window`` (the last ``window`` positions up to and including the query) and,
    when ``stride`` > 0, every key whose position is a multiple of ``stride``.
    """

    top_k: int = 256
    window: int = 128
    stride: int = 0

    def __post_init__(self) -> None:
        validate(self.top_k, self.window, self.stride)

    def kv_overrides(self, arch: str) -> dict[str, bool | int]:
        """The llama.cpp kv_overrides that enable these settings for a model of `arch`."""
        return {
            sparsek_key(arch, KEY_ENABLE): True,
            sparsek_key(arch, KEY_TOP_K): self.top_k,
            sparsek_key(arch, KEY_WINDOW): self.window,
            sparsek_key(arch, KEY_STRIDE): self.stride,
        }


def validate(top_k: int, window: int, stride: int) -> None:
    """Raise ValueError unless the values are usable SparseK settings."""
    for name, value in (("top_k", top_k), ("window", window), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"SparseK {name} must be an int, got {value!r}")
        if value > MAX_VALUE:
            raise ValueError(f"SparseK {name} must be <= {MAX_VALUE}, got {value}")
    if top_k < 1:
        raise ValueError(f"SparseK top_k must be >= 1, got {top_k}")
    if window < 0:
        raise ValueError(f"SparseK window must be >= 0, got {window}")
    if stride < 0:
        raise ValueError(f"SparseK stride must be >= 0, got {stride}")


def recommended(arch: str | None = None) -> SparseK:
    """The project's recommended SparseK settings for a model architecture.

    This is the one place that owns the defaults: `SparseK()` and `gguf set --enable` use it.
    """
    del arch  # one setting for every architecture until measurements say otherwise
    return SparseK()
