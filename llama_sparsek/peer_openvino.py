"""The CPU peer: OpenVINO GenAI on the same GGUF, dense and with XAttention sparse prefill.

`pip install '.[peer]'`. Measured the way the project measured the peer before: the whole prompt
in one scheduler step, no prefix caching, a 1 GB KV cache, one new token, greedy, no chat
template, EOS ignored, and the pipeline's own time to first token (`perf_metrics.get_ttft()`);
XAttention with threshold 0.8, blocks of 64, stride 8, the last 100 prompt tokens dense. It uses
all cores (the same as `-t 2` on a 2-core machine). It is fed the token ids our engines evaluate;
each repetition rolls them by one more position so that no run can reuse another's work.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_sparsek.gguf import read_metadata

# tensor types the peer's GGUF reader accepts (norms and biases are f32 in every model)
SUPPORTED_TYPES = frozenset({"f32", "q4_0", "q4_1", "q8_0", "q4_K", "q6_K"})
XATTENTION = {
    "xattention_threshold": 0.8,
    "xattention_block_size": 64,
    "xattention_stride": 8,
    "num_last_dense_tokens_in_prefill": 100,
}


def available() -> bool:
    return importlib.util.find_spec("openvino_genai") is not None


def unsupported_types(model: Path) -> list[str]:
    """The model's tensor types the peer cannot load (empty: it can)."""
    found = {t.type_name for t in read_metadata(model).tensors}
    return sorted(found - SUPPORTED_TYPES)


class PeerEngine:
    """One OpenVINO GenAI pipeline (loaded once), timed per prompt."""

    def __init__(
        self, name: str, model: Path, *, xattention: bool, max_tokens: int, warmup: Sequence[int]
    ) -> None:
        import openvino_genai as ovg

        self.name = name
        config = ovg.SchedulerConfig()
        config.max_num_batched_tokens = max_tokens  # the whole prompt in one step
        config.enable_prefix_caching = False
        config.cache_size = 1
        if xattention:
            config.use_sparse_attention = True
            config.sparse_attention_config = ovg.SparseAttentionConfig(
                mode=ovg.SparseAttentionMode.XATTENTION, **XATTENTION
            )
        self._pipeline: Any = ovg.LLMPipeline(str(model), "CPU", scheduler_config=config)
        generation = ovg.GenerationConfig()
        generation.max_new_tokens = 1
        generation.do_sample = False
        generation.apply_chat_template = False
        generation.ignore_eos = True
        self._generation = generation
        self.ttft(warmup, 0)  # one untimed run, as llama.cpp's tools warm up too

    def ttft(self, tokens: Sequence[int], repetition: int) -> float:
        """Seconds to the first token for `tokens` rolled by `repetition` positions."""
        import numpy as np
        import openvino as ov

        ids = np.roll(np.asarray(tokens, dtype=np.int64), repetition)[None, :]
        result = self._pipeline.generate(ov.Tensor(ids), self._generation)
        return float(result.perf_metrics.get_ttft().mean) / 1000.0
