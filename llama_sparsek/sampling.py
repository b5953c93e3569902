"""Token sampling settings and the llama.cpp sampler chain built from them."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from llama_sparsek._binding import ffi, lib


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (the most likely token)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")

    def sampler(self) -> Any:
        """A new llama.cpp sampler chain, owned by the returned cdata (freed by the GC)."""
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        chain = ffi.gc(chain, lib.llama_sampler_free)
        if self.temperature == 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        # the order of llama.cpp's own default chain: truncate, then temperature, then draw
        if self.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(self.top_k))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(self.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(self.min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(self.temperature))
        seed = self.seed if self.seed is not None else random.getrandbits(32)
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain
