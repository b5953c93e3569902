"""Shared fixtures: a tiny random-weight llama GGUF written at test time, and the real models."""

from __future__ import annotations

import os
from pathlib import Path

import gguf  # the upstream writer, a test dependency: without it the suite must fail, not skip
import numpy as np
import pytest

TINY = {
    "n_vocab": 3 + 256 + 62,  # controls, bytes, the words below
    "n_embd": 128,
    "n_head": 4,
    "n_head_kv": 2,
    "n_layer": 2,
    "n_ff": 256,
    "n_ctx": 4096,
}


def _add_vocab(writer: gguf.GGUFWriter) -> None:
    """A byte-fallback SentencePiece vocabulary of TINY["n_vocab"] tokens."""
    t = TINY
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = [f"\u2581{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    words += [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
        "\u2581",
        ".",
        ",",
        "\u2581the",
        "\u2581and",
        "\u2581of",
        "\u2581to",
        "\u2581in",
        "\u2581is",
        "\u2581it",
    ]
    tokens += words[: t["n_vocab"] - len(tokens)]
    assert len(tokens) == t["n_vocab"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)


class _TinyWriter:
    """A GGUF of TINY's sizes with random F32 weights: the hyperparameters and the vocabulary
    that every tiny model shares, then the tensors a model adds layer by layer."""

    def __init__(
        self, path: Path, arch: str, n_layer: int, head_count_kv: int | list[int], seed: int = 0
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.head_dim = TINY["n_embd"] // TINY["n_head"]
        self.writer = gguf.GGUFWriter(str(path), arch)
        self.writer.add_name(f"tiny-random-{arch}")
        self.writer.add_context_length(TINY["n_ctx"])
        self.writer.add_embedding_length(TINY["n_embd"])
        self.writer.add_block_count(n_layer)
        self.writer.add_feed_forward_length(TINY["n_ff"])
        self.writer.add_head_count(TINY["n_head"])
        self.writer.add_head_count_kv(head_count_kv)
        self.writer.add_layer_norm_rms_eps(1e-5)
        self.writer.add_rope_dimension_count(self.head_dim)
        self.writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        _add_vocab(self.writer)

    def w(self, *shape: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * 0.08).astype(np.float32)

    def ones(self, name: str, n: int = TINY["n_embd"]) -> None:
        self.writer.add_tensor(name, np.ones(n, dtype=np.float32))

    def attention(self, i: int) -> None:
        n_embd, n_kv = TINY["n_embd"], TINY["n_head_kv"] * self.head_dim
        self.writer.add_tensor(f"blk.{i}.attn_q.weight", self.w(n_embd, n_embd) * 4)
        self.writer.add_tensor(f"blk.{i}.attn_k.weight", self.w(n_kv, n_embd) * 4)
        self.writer.add_tensor(f"blk.{i}.attn_v.weight", self.w(n_kv, n_embd))
        self.writer.add_tensor(f"blk.{i}.attn_output.weight", self.w(n_embd, n_embd))

    def ffn(self, i: int) -> None:
        n_embd, n_ff = TINY["n_embd"], TINY["n_ff"]
        self.ones(f"blk.{i}.ffn_norm.weight")
        self.writer.add_tensor(f"blk.{i}.ffn_gate.weight", self.w(n_ff, n_embd))
        self.writer.add_tensor(f"blk.{i}.ffn_up.weight", self.w(n_ff, n_embd))
        self.writer.add_tensor(f"blk.{i}.ffn_down.weight", self.w(n_embd, n_ff))

    def close(self) -> None:
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_tensors_to_file()
        self.writer.close()


def write_tiny_llama(path: Path, seed: int = 0, arch: str = "llama") -> Path:
    """A 2-layer llama with random weights and a byte-fallback SentencePiece vocabulary."""
    m = _TinyWriter(path, arch, TINY["n_layer"], TINY["n_head_kv"], seed)
    m.writer.add_tensor("token_embd.weight", m.w(TINY["n_vocab"], TINY["n_embd"]) * 10)
    m.ones("output_norm.weight")
    m.writer.add_tensor("output.weight", m.w(TINY["n_vocab"], TINY["n_embd"]))
    for i in range(TINY["n_layer"]):
        m.ones(f"blk.{i}.attn_norm.weight")
        m.attention(i)
        m.ffn(i)
    m.close()
    return path


def write_tiny_lfm2(path: Path) -> Path:
    """A 2-layer LFM2 (a hybrid: a short-convolution layer, then an attention layer) with random
    weights: its attention's KV cache sits next to recurrent state (llama_memory_hybrid)."""
    n_embd = TINY["n_embd"]
    m = _TinyWriter(path, "lfm2", 2, [0, TINY["n_head_kv"]])  # no KV heads: the convolution
    m.writer.add_shortconv_l_cache(3)
    m.writer.add_tensor("token_embd.weight", m.w(TINY["n_vocab"], n_embd) * 10)
    m.ones("token_embd_norm.weight")
    m.ones("blk.0.attn_norm.weight")
    m.writer.add_tensor("blk.0.shortconv.conv.weight", m.w(n_embd, 3))
    m.writer.add_tensor("blk.0.shortconv.in_proj.weight", m.w(3 * n_embd, n_embd))
    m.writer.add_tensor("blk.0.shortconv.out_proj.weight", m.w(n_embd, n_embd))
    m.ffn(0)
    m.ones("blk.1.attn_norm.weight")
    m.ones("blk.1.attn_q_norm.weight", m.head_dim)
    m.ones("blk.1.attn_k_norm.weight", m.head_dim)
    m.attention(1)
    m.ffn(1)
    m.close()
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_hybrid_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lfm2(tmp_path_factory.mktemp("tiny") / "tiny-lfm2.gguf")


def _registry_model(name: str) -> Path:
    """A registry model, pulled on first use (skipped with LLAMA_SPARSEK_OFFLINE=1)."""
    from llama_sparsek import models

    if not models.is_pulled(name) and os.environ.get("LLAMA_SPARSEK_OFFLINE") == "1":
        pytest.skip(f"{name} is not pulled and LLAMA_SPARSEK_OFFLINE=1")
    return models.pull(name, progress=False)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _registry_model("smollm2-135m")


@pytest.fixture(scope="session")
def registry_model():  # type: ignore[no-untyped-def]
    return _registry_model
