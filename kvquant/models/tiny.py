"""Tiny randomly initialised Llama models for fast CPU tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vocab: int = 128,
    max_pos: int = 256,
    rope_theta: float = 10000.0,
    intermediate: int | None = None,
) -> LlamaConfig:
    """A small ``LlamaConfig`` (GQA when ``kv_heads < heads``); ``intermediate`` defaults to 2 * hidden."""
    from transformers import LlamaConfig

    if min(num_layers, hidden, heads, kv_heads, head_dim, vocab, max_pos) <= 0:
        raise ValueError("tiny_llama_config sizes must all be positive")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even for rotary embeddings")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **kw: Any) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` in eval mode; ``kw`` go to :func:`tiny_llama_config`.

    The weights depend only on ``seed`` (the global RNG state is left untouched).
    """
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()
