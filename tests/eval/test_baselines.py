"""transformers' QuantizedCache baselines (quanto / HQQ): availability, measured memory, perplexity rows."""

import pytest
import torch

from kvquant.eval.baselines import (
    baseline_available,
    baseline_memory,
    make_baseline_cache,
    parse_baseline,
    tensor_bytes,
)
from kvquant.eval.perplexity import evaluate_perplexity
from kvquant.models import tiny_llama


def test_parse_and_availability():
    assert parse_baseline("quanto4") == ("quanto", 4)
    assert parse_baseline("hqq2") == ("hqq", 2)
    assert parse_baseline("quanto4k") == ("quanto", 4) and parse_baseline("hqq4k") is None
    assert parse_baseline("nuq3") is None and parse_baseline("quanto") is None
    ok, why = baseline_available("quanto3")
    assert not ok and "2 and 4 bits" in why
    ok, why = baseline_available("nuq4")
    assert not ok and "not a baseline" in why
    with pytest.raises(ValueError, match="baseline nuq4"):
        make_baseline_cache("nuq4", torch.nn.Linear(1, 1))


def test_tensor_bytes_counts_each_storage_once(seed):
    a = torch.randn(10, 8)
    b = a[2:5]  # a view of the same storage
    c = torch.zeros(3, dtype=torch.float16)
    assert tensor_bytes([a, b, {"x": c}, (None, 3)]) == a.numel() * 4 + c.numel() * 2
    assert tensor_bytes(torch.empty(0)) == 0


@pytest.mark.parametrize("name", ["quanto4", "quanto2", "hqq4", "hqq2"])
def test_baseline_cache_memory_and_perplexity(name, seed):
    ok, why = baseline_available(name)
    if not ok:
        pytest.skip(why)
    model = tiny_llama(seed=seed % 1000, num_layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, vocab=256,
                       max_pos=1024).to(torch.float16)
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(seed))
    cache = make_baseline_cache(name, model)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    mem = baseline_memory(cache)
    nbits = parse_baseline(name)[1]
    # uniform codes plus a 16-bit scale and zero per group of 64: a bit more than nbits, far below fp16
    assert nbits < mem["bits_per_element"] < nbits + 2, mem
    assert mem["fp16_bytes"] == 2 * 2 * 2 * 400 * 32 * 2  # layers x (K,V) x heads x tokens x dim x 2 bytes
    res = {r.datatype: r for r in evaluate_perplexity(model.float(), ids[:, :300], ["fp16", name], chunk=50,
                                                      progress=False)}
    assert res[name].bits_per_element is not None and res[name].tokens == res["fp16"].tokens
    assert abs(res[name].delta_ppl_pct) < 50


def test_quanto_per_channel_keys_survive_offset_channels(seed):
    """quanto's default groups a token's channels: one key channel with a large offset (a k_proj bias, as in
    Qwen2) wrecks the others. ``quanto4k`` groups keys per channel (KIVI) and keeps them."""
    ok, why = baseline_available("quanto4k")
    if not ok:
        pytest.skip(why)
    model = tiny_llama(seed=0, num_layers=1, hidden=256, heads=2, kv_heads=2, head_dim=128, vocab=32, max_pos=1024)
    k = torch.randn(1, 2, 512, 128, generator=torch.Generator().manual_seed(seed))
    k[..., 5] += 80.0
    plain = [c for c in range(128) if c != 5]
    err = {}
    for name in ("quanto4", "quanto4k"):
        cache = make_baseline_cache(name, model)
        cache.update(k, k, 0)
        got, _ = cache.update(k[:, :, -1:], k[:, :, -1:], 0)
        diff = (got[:, :, :512] - k)[..., plain]
        err[name] = float(diff.norm() / k[..., plain].norm())
    assert err["quanto4k"] < 0.2 < 1.0 < err["quanto4"], err


@pytest.mark.parametrize("name", ["quanto4k", "hqq4"])
def test_baselines_run_at_any_length_and_batch(name):
    """5 prompts of 207 tokens on a stories260k-shaped model (4 KV heads x 8): 5 x 4 x 207 = 4140 is no multiple of
    the group size (64), which quanto's prefill rejected. Each sequence must also quantize as it does alone."""
    ok, why = baseline_available(name)
    if not ok:
        pytest.skip(why)
    model = tiny_llama(seed=0, num_layers=2, hidden=64, heads=8, kv_heads=4, head_dim=8, vocab=512, max_pos=512)
    ids = torch.randint(0, 512, (5, 207), generator=torch.Generator().manual_seed(1))
    cache = make_baseline_cache(name, model)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (5, 210)
    mem = baseline_memory(cache)
    assert mem["fp16_bytes"] == 2 * 2 * 5 * 4 * 209 * 8 * 2  # layers x (K,V) x B x heads x tokens x dim x 2 bytes
    if name.startswith("quanto"):  # hqq's default groups run over the flattened tensor, across sequences
        alone = make_baseline_cache(name, model)
        both = make_baseline_cache(name, model)
        k = torch.randn(2, 4, 207, 8, generator=torch.Generator().manual_seed(2))
        alone.update(k[1:], k[1:], 0)
        both.update(k, k, 0)
        a, _ = alone.update(k[1:, :, -1:], k[1:, :, -1:], 0)
        b, _ = both.update(k[:, :, -1:], k[:, :, -1:], 0)
        torch.testing.assert_close(a[0], b[1])
