"""A SparseK query keeps the same keys however the prompt was cut into ubatches.

llama.cpp evaluates a prompt in ubatches; a prefix reused from an earlier call, or a token decoded
alone, is a ubatch of its own. The keys a query keeps must depend only on the query and the keys,
so that the next-token logits after a prompt are the same whether it was evaluated in one go,
as a prefix plus a suffix, or with its last tokens decoded one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from llama_sparsek import Llama, SparseK

# drops most keys from 640 cells on: the prompt's later ubatches all run the SparseK graph
SETTINGS = [
    SparseK(top_k=256, window=64, block_size=8),
    SparseK(top_k=256, window=64, block_size=1),
    SparseK(top_k=256, window=64, stride=128, block_size=16),
]
N_PROMPT = 2000
N_TAIL = 64  # decoded one token at a time


def _code_text() -> str:
    """Code-like text whose later lines call functions defined far back (retrieval-like keys)."""
    lines = [f"def f_{i}(x):\n    return x * {i * 7919 % 1000} + {i}\n" for i in range(120)]
    lines += [f"y_{i} = f_{(i * 37) % 120}(y_{i - 1})\n" for i in range(1, 200)]
    return "".join(lines)


def _last_logits(llm: Llama, chunks: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits after the last token, the chunks decoded one after another from an empty context."""
    llm.reset()
    for chunk in chunks:
        llm._decode(chunk, all_logits=False)
    return llm._logits(1)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings", SETTINGS, ids=lambda s: f"k{s.top_k}-w{s.window}-s{s.stride}-b{s.block_size}"
)
def test_logits_do_not_depend_on_the_split(smollm2_path: Path, settings: SparseK) -> None:
    # flash attention off: its CPU kernel rounds ubatches of fewer than 64 rows differently even
    # dense, while the soft-max path gives a reused prefix bit-identical logits
    opts = {"n_ctx": 2048, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2, "flash_attn": False}
    with Llama(smollm2_path, sparsek=settings, **opts) as llm:  # type: ignore[arg-type]
        tokens = llm.tokenize(_code_text())[:N_PROMPT]
        assert len(tokens) == N_PROMPT
        head, tail = tokens[:-N_TAIL], tokens[-N_TAIL:]
        whole = _last_logits(llm, [tokens])
        by_token = _last_logits(llm, [head, *([t] for t in tail)])
        two_parts = _last_logits(llm, [head, tail])
    print(
        f"max |logit diff| vs one batch: token by token {np.abs(by_token - whole).max():.3g}, "
        f"prefix + suffix {np.abs(two_parts - whole).max():.3g}"
    )
    np.testing.assert_allclose(by_token, whole, atol=1e-3, rtol=0)
    np.testing.assert_allclose(two_parts, whole, atol=1e-3, rtol=0)
