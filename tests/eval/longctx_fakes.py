"""Small stand-ins for the long-context tests: a word tokenizer, a tiny fp32 Llama, a press that keeps the most
recent tokens (what kvpress's presses do, minus the scoring)."""

from __future__ import annotations

import zlib

import torch

from kvquant.models import tiny_llama


class WordTokenizer:
    """One token per 6-character piece of each whitespace-separated word (ids 2-255 by a hash of the piece); 0 pads,
    1 ends a sequence."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        pieces = [w[i:i + 6] for w in text.split() for i in range(0, len(w), 6)]
        return {"input_ids": [2 + zlib.crc32(p.encode()) % 254 for p in pieces]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(f"w{i}" for i in ids if i >= 2)


def word_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer fp32 Llama (GQA 4/2 heads x 32) over the word-hash vocabulary, 1024 positions."""
    return tiny_llama(seed=seed, num_layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, vocab=256,
                      max_pos=1024).float().eval()


class KeepRecentPress:
    """Evicts the oldest ``compression_ratio`` of the prefilled tokens, through kvpress's hook interface (it reads
    ``past_key_values`` and ``cache_position`` from the attention's keyword arguments)."""

    def __init__(self, compression_ratio: float) -> None:
        self.compression_ratio = compression_ratio
        self.prefills = 0

    def post_init_from_model(self, model: torch.nn.Module) -> None:
        pass

    def forward_hook(self, module, args, kwargs, output):
        q_len = kwargs["hidden_states"].shape[1]
        if int(kwargs["cache_position"][-1]) + 1 != q_len:  # not the prefill
            return output
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        keep = max(1, round(layer.keys.shape[2] * (1 - self.compression_ratio)))
        layer.keys, layer.values = layer.keys[:, :, -keep:], layer.values[:, :, -keep:]
        self.prefills += 1
        return output
