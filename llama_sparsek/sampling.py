"""Token sampling settings and the llama.cpp sampler chain built from them.

`Sampling` is the one place that owns the sampling defaults: `Llama.stream`/`generate`/`chat`,
`llama_sparsek.generate` and the CLI all start from `Sampling()` and change only what they are
given.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen, with llama.cpp's meaning of each setting.

    temperature 0 is greedy (the most likely token after the repeat penalty); above 0 the chain
    is llama.cpp's: repeat penalty, top_k (0 = off), top_p (1 = off), min_p (0 = off),
    temperature, then a seeded draw. repeat_penalty (1 = off) divides the logits of the tokens
    among the last penalty_last_n ones (prompt included). Generation stops before any of the
    `stop` strings.
    """

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_types(self)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise ValueError(
                f"repeat_penalty must be > 0 (1 disables it), got {self.repeat_penalty}"
            )
        if not 0 <= self.penalty_last_n < 2**31:
            raise ValueError(f"penalty_last_n must be an int >= 0, got {self.penalty_last_n!r}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The keyword options that `with_options` accepts (the dataclass fields)."""
        return frozenset(f.name for f in fields(cls))

    def with_options(self, **options: Any) -> Sampling:
        """A copy with the given settings changed (None leaves a setting as it is)."""
        unknown = set(options) - self.option_names()
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in options.items() if v is not None}
        return replace(self, **given)

    @property
    def penalizes(self) -> bool:
        return self.repeat_penalty != 1.0 and self.penalty_last_n > 0

    def sampler(self, n_vocab: int, history: Sequence[int] = ()) -> Any:
        """A new llama.cpp sampler chain, owned by the returned cdata (freed by the GC).

        `history` (the prompt) feeds the repeat penalty's window; the chain then records each
        token it samples itself."""
        from llama_sparsek._binding import ffi, lib  # here: the CLI reads the defaults cheaply

        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        chain = ffi.gc(chain, lib.llama_sampler_free)
        if self.penalizes:
            lib.llama_sampler_chain_add(
                chain,
                lib.llama_sampler_init_penalties(
                    n_vocab, self.penalty_last_n, self.repeat_penalty, 0.0, 0.0
                ),
            )
            for token in history[-self.penalty_last_n :]:
                lib.llama_sampler_accept(chain, token)
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


_REALS = ("temperature", "top_p", "min_p", "repeat_penalty")
_INTS = ("top_k", "penalty_last_n", "seed")


def _check_types(sampling: Sampling) -> None:
    """TypeError for a setting of the wrong type (bool is not a number here); integers of other
    types (numpy's) become ints, for llama.cpp's C calls."""
    for name in _REALS:
        value = getattr(sampling, name)
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    for name in _INTS:
        value = getattr(sampling, name)
        if value is None and name == "seed":
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        object.__setattr__(sampling, name, int(value))
    stop = sampling.stop
    if isinstance(stop, str | bytes) or not isinstance(stop, Sequence):
        raise TypeError(f"stop must be a sequence of strings, got {type(stop).__name__} {stop!r}")
    if not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop strings must be str, got {stop!r}")


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword options into (Sampling's options, the rest)."""
    wanted = Sampling.option_names()
    sampling = {k: v for k, v in options.items() if k in wanted}
    rest = {k: v for k, v in options.items() if k not in wanted}
    return sampling, rest
