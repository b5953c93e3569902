"""What one call of a `Llama` cost: tokens reused from the context, prefill and decode speed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# progress(done, total): prompt tokens evaluated so far out of those that needed evaluating
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Timings:
    """One call's counts and wall-clock times (seconds).

    prompt_tokens = reused_tokens (already in the context, not evaluated again) + prefill_tokens.
    first_token_s is the time from the call's start to its first sampled token (prefill
    included); decode_s the time spent after that producing the other generated_tokens - 1.
    """

    prompt_tokens: int
    reused_tokens: int
    prefill_s: float
    generated_tokens: int = 0
    first_token_s: float | None = None
    decode_s: float = 0.0

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @property
    def prefill_tokens_per_s(self) -> float | None:
        if not self.prefill_tokens or self.prefill_s <= 0:
            return None
        return self.prefill_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    def summary(self) -> str:
        """One line for humans, as `--timings` prints it."""
        parts = [f"prompt {self.prompt_tokens} tokens ({self.reused_tokens} reused)"]
        rate = self.prefill_tokens_per_s
        parts.append(
            f"prefill {self.prefill_tokens} in {self.prefill_s:.3f} s"
            + (f" ({rate:.1f} t/s)" if rate else "")
        )
        if self.first_token_s is not None:
            parts.append(f"first token {self.first_token_s:.3f} s")
        if self.generated_tokens:
            rate = self.decode_tokens_per_s
            parts.append(
                f"generated {self.generated_tokens}" + (f" ({rate:.1f} t/s)" if rate else "")
            )
        return ", ".join(parts)


class Clock:
    """Collects one call's Timings as it runs."""

    def __init__(self, prompt_tokens: int) -> None:
        self.start = time.perf_counter()
        self.prompt_tokens = prompt_tokens
        self.reused_tokens = 0
        self.prefill_s = 0.0
        self.generated = 0
        self.first_token_s: float | None = None
        self._first_at = 0.0

    def prefilled(self, reused_tokens: int) -> None:
        self.reused_tokens = reused_tokens
        self.prefill_s = time.perf_counter() - self.start

    def sampled(self) -> None:
        """A token was sampled (counted in `generated` only if the caller keeps it)."""
        if self.first_token_s is None:
            self._first_at = time.perf_counter()
            self.first_token_s = self._first_at - self.start

    def timings(self) -> Timings:
        decode_s = time.perf_counter() - self._first_at if self.generated > 1 else 0.0
        return Timings(
            prompt_tokens=self.prompt_tokens,
            reused_tokens=self.reused_tokens,
            prefill_s=self.prefill_s,
            generated_tokens=self.generated,
            first_token_s=self.first_token_s,
            decode_s=decode_s,
        )
