"""Models built from a config with random weights (``random:<preset>``): memory and throughput, never accuracy.

``random:7b`` is the Llama-2-7B shape, ``random:8b`` Llama-3-8B (GQA), ``random:1b`` the Llama-3.2-1B shape,
``random:small`` a few-MB model for quick CPU runs and ``random:tiny`` the shape of
:func:`kvquant.models.tiny_llama`. The model is built directly on its device (or on ``meta`` for its shape only).
"""

from __future__ import annotations

from typing import Any

import torch

RANDOM_PREFIX = "random:"
RANDOM_WEIGHTS_NOTE = "random weights: memory/throughput only, not accuracy"


#: ``random:<preset>`` model shapes (Llama architecture). Keys are LlamaConfig fields.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    # Llama-2-7B: 32 layers, 32 heads (MHA), head dim 128, hidden 4096, MLP 11008, vocab 32000
    "7b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
               head_dim=128, intermediate_size=11008, vocab_size=32000, rope_theta=10000.0),
    # Llama-3-8B: GQA 32/8 heads, MLP 14336, vocab 128256
    "8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    # Llama-3.2-1B shape: 16 layers, GQA 32/8, head dim 64
    "1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
               head_dim=64, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0),
    # a few-MB model for quick CPU runs
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, intermediate_size=512, vocab_size=1024, rope_theta=10000.0),
    # the shape of kvquant.models.tiny_llama (tests)
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, vocab_size=128, rope_theta=10000.0),
}


def is_random_model(name: str | None) -> bool:
    return bool(name) and name.lower().startswith(RANDOM_PREFIX)


def random_model_config(name: str, max_positions: int = 1 << 20):
    """The ``LlamaConfig`` of ``random:<preset>`` (presets: :data:`RANDOM_PRESETS`).

    Raises:
        ValueError: unknown preset.
    """
    from transformers import LlamaConfig

    preset = name[len(RANDOM_PREFIX):].strip().lower()
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"unknown random model preset {preset!r}; choose from "
                         f"{', '.join(RANDOM_PREFIX + k for k in RANDOM_PRESETS)}")
    p = dict(RANDOM_PRESETS[preset])
    theta = p.pop("rope_theta")
    return LlamaConfig(**p, max_position_embeddings=max_positions,
                       rope_parameters={"rope_type": "default", "rope_theta": theta},
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def build_random_model(name: str, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> torch.nn.Module:
    """A Llama of preset ``random:<preset>`` built directly on ``device`` with random weights."""
    from transformers import AutoModelForCausalLM

    config = random_model_config(name)
    with torch.random.fork_rng(devices=[torch.device(device)] if str(device).startswith("cuda") else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
