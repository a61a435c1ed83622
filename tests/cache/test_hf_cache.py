"""``KVQuantCache`` inside ``model.generate``: fp16 equals DynamicCache, quantized stays close, pre-RoPE keys."""

import pytest
import torch
from transformers import DynamicCache

from kvquant import QuantConfig
from kvquant.cache.hf_cache import KVQuantCache
from kvquant.models import tiny_llama
from kvquant.quant.rope import apply_rope
from tests.hf_tiny import greedy_generate, padded_batch


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def test_fp16_matches_dynamic_cache_with_left_padding_and_gqa(model, seed):
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids, mask = padded_batch(seed, model.config.vocab_size)
    ref = greedy_generate(model, ids, mask, DynamicCache(config=model.config))
    got = greedy_generate(model, ids, mask, KVQuantCache(model, QuantConfig(datatype="fp16", page_size=32)))
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_quantized_generate_runs_and_stays_close(model, seed):
    ids, mask = padded_batch(seed, model.config.vocab_size)
    ref = greedy_generate(model, ids, mask, DynamicCache(config=model.config))
    errs = {}
    for dt in ("nuq4", "nuq2"):
        cache = KVQuantCache(model, QuantConfig(datatype=dt, page_size=32, min_range_tokens=1))
        got = greedy_generate(model, ids, mask, cache)
        assert got.sequences.shape == ref.sequences.shape
        # teacher-forced: prefill, then 8 more tokens reading the quantized cache (no divergence between runs)
        full = torch.cat([ids, torch.randint(0, model.config.vocab_size, (ids.shape[0], 8))], 1)
        fmask = torch.cat([mask, torch.ones(ids.shape[0], 8, dtype=mask.dtype)], 1)
        with torch.no_grad():
            exact = model(input_ids=full, attention_mask=fmask).logits[:, -8:]
            qc = KVQuantCache(model, QuantConfig(datatype=dt, page_size=32, min_range_tokens=1))
            model(input_ids=ids, attention_mask=mask, past_key_values=qc)
            quant = model(input_ids=full[:, -8:], attention_mask=fmask, past_key_values=qc).logits
        errs[dt] = float((quant - exact).abs().mean())
        rep = cache.memory_report()
        assert rep["total_bytes"] > 0 and rep["key_elements"] == rep["value_elements"]
        layer = cache.layers[0]
        assert torch.equal(layer.qkeys.lengths, mask.sum(1) + 5)  # prompt + 5 appended decode tokens
    assert 0 < errs["nuq4"] < errs["nuq2"]


def test_pre_rope_beats_post_rope_on_real_keys(shared_dir):
    """On a trained model's keys, pre-RoPE quantization reconstructs the keys attention sees (post-RoPE)
    better than quantizing after RoPE at the same bit width (summed over layers)."""
    from kvquant.models import load_model

    path = shared_dir / "models" / "stories260k"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    model, tok, _ = load_model(str(path))
    text = (shared_dir / "data" / "tinystories" / "sample.txt").read_text()
    ids = torch.tensor([[1] + tok(text)["input_ids"][:255]])
    S = ids.shape[1]
    errs = {}
    for pre in (True, False):
        cache = KVQuantCache(model, QuantConfig(datatype="nuq2", pre_rope=pre, outlier_fraction=0.0, n_sink=0))
        ref = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
            model(input_ids=ids, past_key_values=ref)
        num = den = 0.0
        for layer, rlayer in zip(cache.layers, ref.layers):
            kd = layer.qkeys.dequantize()[0]
            if pre:
                kd = apply_rope(kd, *cache.rotary(torch.arange(S)[None]))
            num += float((kd - rlayer.keys).norm() ** 2)
            den += float(rlayer.keys.norm() ** 2)
        errs[pre] = (num / den) ** 0.5
    assert errs[True] < errs[False], errs


def test_real_model_stories260k(shared_dir, seed):
    from transformers import LlamaForCausalLM

    path = shared_dir / "models" / "stories260k"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    model = LlamaForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 500, (2, 40))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ref = greedy_generate(model, ids, mask, DynamicCache(config=model.config))
    got = greedy_generate(model, ids, mask, KVQuantCache(model, QuantConfig(datatype="fp16")))
    assert torch.equal(ref.sequences, got.sequences)
    q = greedy_generate(model, ids, mask, KVQuantCache(model, QuantConfig(datatype="nuq4")))
    assert (q.sequences == ref.sequences).float().mean() > 0.8


def test_reserve_tokens_allocates_the_decode_budget_exactly(model, seed):
    ids, mask = padded_batch(seed, model.config.vocab_size)
    free = KVQuantCache(model, QuantConfig(datatype="nuq3", page_size=32))
    held = KVQuantCache(model, QuantConfig(datatype="nuq3", page_size=32), reserve_tokens=40)
    a, b = greedy_generate(model, ids, mask, free), greedy_generate(model, ids, mask, held)
    assert torch.equal(a.sequences, b.sequences)  # reserving changes where pages live, not what they hold
    for f_layer, h_layer in zip(free.layers, held.layers):
        f, h = f_layer.qkeys.pages, h_layer.qkeys.pages
        # pages for (real prompt tokens - 1 sink + 40) tokens per sequence, and the pools sized to exactly that
        want = (mask.sum(1) - 1 + 40 + 31) // 32
        assert torch.equal(h.pages_per_seq.cpu(), want.cpu())
        assert h.capacity == h.n_pages == int(want.sum())
        assert f.n_pages <= h.n_pages
    with pytest.raises(ValueError, match="reserve_tokens"):
        KVQuantCache(model, QuantConfig(datatype="nuq3"), reserve_tokens=-1)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_the_cache_resolves_its_ops_once_and_hands_them_to_every_store(model, seed, backend):
    from kvquant.kernels.ops import TORCH

    cache = KVQuantCache(model, QuantConfig(datatype="nuq3", backend=backend))
    assert cache.ops is TORCH and cache.backend == "torch"  # on CPU (and head size 16) auto is torch
    ids, mask = padded_batch(seed, model.config.vocab_size)
    greedy_generate(model, ids, mask, cache)
    assert all(s.ops is cache.ops for layer in cache.layers for s in (layer.qkeys, layer.qvalues))
