"""A tiny Hugging Face model run through the cache: padded batches and greedy generation."""

from __future__ import annotations

import torch


def padded_batch(seed: int, vocab: int, B: int = 3, S: int = 21) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[B, S]`` and a mask with left padding in rows 1 and -1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :6] = 0
    mask[-1, :13] = 0
    return ids, mask


def greedy_generate(model, ids: torch.Tensor, mask: torch.Tensor, cache):
    """Six greedy tokens with ``cache``, scores kept."""
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              past_key_values=cache, output_scores=True, return_dict_in_generate=True,
                              pad_token_id=0)
