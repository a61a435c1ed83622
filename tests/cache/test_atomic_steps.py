"""A forward that fails leaves every layer of a KVQuantCache as it was; poison is never read.

NaN is injected into one layer's keys or values (a forward hook on its projection) during a decode step. The step
must raise, every layer must be back to its state before the step, and a following clean step must leave the cache
exactly as a cache that never saw the bad step (same tokens per layer, same dequantized keys and values).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from kvquant import BatchedKVQuantizer, QuantConfig
from kvquant.cache.hf_cache import KVQuantCache
from kvquant.cache.hf_compat import cache_kwargs
from kvquant.models import tiny_llama

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model():
    return tiny_llama(seed=3, num_layers=3, hidden=128, heads=4, kv_heads=2, head_dim=64, vocab=96).to(DEVICE)


def _prompt(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (2, 37), generator=g).to(DEVICE)
    mask = torch.ones(2, 37, dtype=torch.long, device=DEVICE)
    mask[1, :5] = 0
    return ids, mask


def _forward(model, cache, ids, mask):
    pos = (mask.cumsum(1) - 1).clamp_min(0)[:, -ids.shape[1]:]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                     **cache_kwargs(model, cache)).logits


def _state(cache: KVQuantCache) -> list:
    out = []
    for layer in cache.layers:
        k, km = layer.qkeys.dequantize()
        v, vm = layer.qvalues.dequantize()
        out.append((layer.cumulative_length, layer.seen_mask.clone(), k, km, v, vm))
    return out


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x[0] == y[0], f"layer {i}: {x[0]} vs {y[0]} tokens"
        for t, u in zip(x[1:], y[1:]):
            assert torch.equal(t, u), f"layer {i} differs"


class _Poison:
    """Turns one projection's output NaN while armed."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.armed = False
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.armed:
            output = output.clone()
            output[..., 0] = float("nan")
            return output
        return None


@pytest.mark.parametrize("backend,layer,proj", [("torch", 0, "v_proj"), ("torch", 1, "k_proj"), ("torch", 2, "v_proj"),
                                                ("triton", 1, "k_proj")])
def test_a_failed_step_leaves_every_layer_as_before(seed: int, layer: int, proj: str, backend: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
        if DEVICE == "cpu":  # prefill thresholds by topk under the interpreter (same bytes; faster)
            monkeypatch.setattr(importlib.import_module("kvquant.kernels.encode"), "LARGE_THRESHOLDS", 0)
    model = _model()
    poison = _Poison(getattr(model.model.layers[layer].self_attn, proj))
    # row 0 (36 tokens past its sink) is quantized at the prefill; row 1 (31) is held and ends its hold at the
    # first step, the one that fails once
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.02, n_sink=1, residual_length=2, page_size=32,
                      min_range_tokens=32,
                      backend=backend)
    ids, mask = _prompt(seed)
    g = torch.Generator().manual_seed(seed + 1)
    steps = [torch.randint(3, 96, (2, 1), generator=g).to(DEVICE) for _ in range(2)]
    caches = []
    for bad in (True, False):
        cache = KVQuantCache(model, cfg)
        m = mask
        _forward(model, cache, ids, m)
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
        if bad:
            before = _state(cache)
            poison.armed = True
            with pytest.raises(ValueError, match="NaN or Inf"):
                _forward(model, cache, steps[0], m)
            poison.armed = False
            _assert_same(_state(cache), before)  # nothing of the failed step is left
        for tok in steps:
            _forward(model, cache, tok, m)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
        caches.append(cache)
    _assert_same(_state(caches[0]), _state(caches[1]))
    from kvquant.cache import kernel_attention

    kernel_attention.uninstall_kernel_attention(model)


def test_layers_out_of_step_are_refused(seed: int) -> None:
    model = _model()
    cache = KVQuantCache(model, QuantConfig(datatype="nuq3", backend="torch"))
    ids, mask = _prompt(seed)
    _forward(model, cache, ids, mask)
    cache.layers[1].cumulative_length += 1  # what a step that half-landed would leave
    with pytest.raises(RuntimeError, match="different numbers of tokens"):
        _forward(model, cache, ids[:, :1], torch.cat([mask, torch.ones_like(mask[:, :1])], 1))


def test_a_poisoned_store_is_never_read(seed: int) -> None:
    """Sync-free appends check NaN/Inf later; any read before that check raises instead of returning garbage."""
    q = BatchedKVQuantizer(QuantConfig(datatype="nuq4", backend="torch", residual_length=0,
                                                   min_range_tokens=1))
    store = q.quantize_keys(torch.randn(2, 2, 40, 64, generator=torch.Generator().manual_seed(seed)))
    store.append(torch.randn(2, 2, 1, 64))  # a clean sync-free append
    store.dequantize()
    bad = torch.randn(2, 2, 1, 64)
    bad[0, 1, 0, 5] = float("nan")
    store.append(bad)  # accepted without a sync
    for read in (store.dequantize, store.memory_report, lambda: store.select(torch.tensor([0]))):
        with pytest.raises(ValueError, match="NaN or Inf"):
            read()
