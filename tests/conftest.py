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


def write_tiny_llama(path: Path, seed: int = 0, arch: str = "llama") -> Path:
    """A 2-layer llama with random weights and a byte-fallback SentencePiece vocabulary."""
    rng = np.random.default_rng(seed)
    t = TINY
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-random-llama")
    writer.add_context_length(t["n_ctx"])
    writer.add_embedding_length(t["n_embd"])
    writer.add_block_count(t["n_layer"])
    writer.add_feed_forward_length(t["n_ff"])
    writer.add_head_count(t["n_head"])
    writer.add_head_count_kv(t["n_head_kv"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(t["n_embd"] // t["n_head"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocab(writer)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    n_embd, head_dim = t["n_embd"], t["n_embd"] // t["n_head"]
    n_kv = t["n_head_kv"] * head_dim
    writer.add_tensor("token_embd.weight", w(t["n_vocab"], n_embd) * 10)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", w(t["n_vocab"], n_embd))
    for i in range(t["n_layer"]):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", w(n_embd, n_embd) * 4)
        writer.add_tensor(f"blk.{i}.attn_k.weight", w(n_kv, n_embd) * 4)
        writer.add_tensor(f"blk.{i}.attn_v.weight", w(n_kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", w(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(t["n_ff"], n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(t["n_ff"], n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(n_embd, t["n_ff"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_lfm2(path: Path, seed: int = 0) -> Path:
    """A 2-layer LFM2 (a hybrid: a short-convolution layer, then an attention layer) with random
    weights: its attention's KV cache sits next to recurrent state (llama_memory_hybrid)."""
    rng = np.random.default_rng(seed)
    t = TINY
    writer = gguf.GGUFWriter(str(path), "lfm2")
    writer.add_name("tiny-random-lfm2")
    writer.add_context_length(t["n_ctx"])
    writer.add_embedding_length(t["n_embd"])
    writer.add_block_count(2)
    writer.add_feed_forward_length(t["n_ff"])
    writer.add_head_count(t["n_head"])
    writer.add_head_count_kv([0, t["n_head_kv"]])  # no KV heads: the convolution layer
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(t["n_embd"] // t["n_head"])
    writer.add_shortconv_l_cache(3)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocab(writer)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.08).astype(np.float32)

    n_embd, head_dim = t["n_embd"], t["n_embd"] // t["n_head"]
    n_kv = t["n_head_kv"] * head_dim
    writer.add_tensor("token_embd.weight", w(t["n_vocab"], n_embd) * 10)
    writer.add_tensor("token_embd_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        if i == 0:
            writer.add_tensor(f"blk.{i}.shortconv.conv.weight", w(n_embd, 3))
            writer.add_tensor(f"blk.{i}.shortconv.in_proj.weight", w(3 * n_embd, n_embd))
            writer.add_tensor(f"blk.{i}.shortconv.out_proj.weight", w(n_embd, n_embd))
        else:
            writer.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.attn_q.weight", w(n_embd, n_embd) * 4)
            writer.add_tensor(f"blk.{i}.attn_k.weight", w(n_kv, n_embd) * 4)
            writer.add_tensor(f"blk.{i}.attn_v.weight", w(n_kv, n_embd))
            writer.add_tensor(f"blk.{i}.attn_output.weight", w(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(t["n_ff"], n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(t["n_ff"], n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(n_embd, t["n_ff"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
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
