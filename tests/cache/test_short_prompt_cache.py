"""Short prompts through ``KVQuantCache`` without calibration: tokens are held exactly until a sequence has
``min_range_tokens`` of them, then its key ranges are set and they are quantized (torch and triton backends)."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import DynamicCache

from kvquant import QuantConfig
from kvquant.cache.hf_cache import KVQuantCache
from kvquant.models import tiny_llama
from tests.hf_tiny import greedy_generate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def short_batch(seed: int, vocab: int, pads: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    S = max(pads) + 2
    ids = torch.randint(3, vocab, (len(pads), S), generator=g)
    mask = torch.ones(len(pads), S, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0  # left padding: prompts of S - p tokens
    return ids.to(DEVICE), mask.to(DEVICE)


def test_short_prompt_generation_is_exact_while_held(seed):
    """Prompts of 2..6 tokens and six new ones stay below the hold (400 tokens at 1 %): the cache holds the model's
    keys and values exactly, so greedy generation equals DynamicCache's, with no key outlier stored."""
    model = tiny_llama(seed=0)
    ids, mask = short_batch(seed, model.config.vocab_size, (0, 2, 4))
    ref = greedy_generate(model, ids, mask, DynamicCache(config=model.config))
    cache = KVQuantCache(model, QuantConfig(datatype="nuq3", page_size=32, backend="torch"))
    got = greedy_generate(model, ids, mask, cache)
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for layer in cache.layers:
        assert int(layer.qkeys.q_len.sum()) == 0 and layer.qkeys.outliers.nnz == 0
        assert torch.equal(layer.qkeys.lengths, mask.sum(1) + 5)
    rep = cache.memory_report()
    assert rep["total_bytes"] > 0 and rep["key_elements"] == rep["value_elements"]


def test_short_prompt_crosses_the_hold_during_generation(seed):
    """With a hold of 4 tokens the rows of a short padded batch set their ranges at different decode steps; the
    generation stays close to the exact one and the stores keep one layout."""
    model = tiny_llama(seed=0)
    ids, mask = short_batch(seed, model.config.vocab_size, (0, 2, 4))
    cfg = QuantConfig(datatype="nuq4", page_size=32, min_range_tokens=4, backend="torch")
    cache = KVQuantCache(model, cfg)
    got = greedy_generate(model, ids, mask, cache)
    ref = greedy_generate(model, ids, mask, DynamicCache(config=model.config))
    assert got.sequences.shape == ref.sequences.shape
    for layer in cache.layers:
        k, v = layer.qkeys, layer.qvalues
        assert bool(k.ranged.all()) and int(k.q_len.min()) > 0
        for name in ("sink_len", "q_len", "res_len"):
            assert torch.equal(getattr(k, name), getattr(v, name))
    assert all(torch.isfinite(s).all() for s in got.scores)


@pytest.mark.parametrize("pads", [(0, 3), (1, 4)])
def test_triton_backend_short_prompt_matches_torch(seed, pads, monkeypatch):
    """The triton backend (the decode kernel over held and quantized tokens; the quantize-append kernel at the
    transition) gives the torch backend's logits on a short prompt that crosses the hold while generating."""
    pytest.importorskip("triton", reason="triton is not installed")
    from kvquant.cache import kernel_attention

    if DEVICE == "cpu":  # topk thresholds instead of the interpreter's slow sort kernel (same bytes: test_encode)
        monkeypatch.setattr(importlib.import_module("kvquant.kernels.encode"), "LARGE_THRESHOLDS", 0)
    model = tiny_llama(seed=1, num_layers=2, hidden=128, heads=4, kv_heads=2, head_dim=64, vocab=96).to(DEVICE)
    ids, mask = short_batch(seed, model.config.vocab_size, pads)
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.05, page_size=32, min_range_tokens=5, residual_length=1)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "output_scores": True,
          "return_dict_in_generate": True}
    with torch.no_grad():
        ref_cache = KVQuantCache(model, cfg, backend="torch")
        ref = model.generate(input_ids=ids, attention_mask=mask, past_key_values=ref_cache, **kw)
        cache = KVQuantCache(model, cfg, backend="triton")
        got = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kw)
        kernel_attention.uninstall_kernel_attention(model)
    assert cache.ops.name == "triton"
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        assert float((a - b).abs().max() / a.abs().max()) < 1e-4
    for lt, lr in zip(cache.layers, ref_cache.layers):  # (the same up to the attention's rounding)
        assert bool(lt.qkeys.ranged.all()) and torch.equal(lt.qkeys.q_len, lr.qkeys.q_len)
        torch.testing.assert_close(lt.qkeys.channel_scale, lr.qkeys.channel_scale, rtol=1e-3, atol=1e-5)
