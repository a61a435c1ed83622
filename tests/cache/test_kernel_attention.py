"""The triton cache backend: ``model.generate`` decoding through the Triton kernel vs the torch backend.

On CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py before triton is imported)
with a tiny GQA Llama (head size 64, 2 layers); with CUDA the same tests run compiled, plus a ``gpu`` test
at realistic shapes (fp16, head size 128, longer prompts).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernel backend cannot be tested")
from transformers import DynamicCache  # noqa: E402

from kvquant import QuantConfig  # noqa: E402
from kvquant.cache import kernel_attention  # noqa: E402
from kvquant.cache.hf_cache import KVQuantCache  # noqa: E402
from kvquant.cache.hf_compat import cache_kwargs  # noqa: E402
from kvquant.models import tiny_llama  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CFG = QuantConfig(datatype="nuq3", outlier_fraction=0.03, n_sink=1, residual_length=3, page_size=32,
                  min_range_tokens=1)


@pytest.fixture(autouse=True)
def _topk_thresholds_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, find value thresholds with ``topk`` instead of the sort kernel: Triton's interpreter takes ~0.4 s per
    sort program. Both store the same bytes, which test_encode checks; these tests are about the attention path."""
    if DEVICE == "cpu":
        monkeypatch.setattr(importlib.import_module("kvquant.kernels.encode"), "LARGE_THRESHOLDS", 0)


def _model(attn: str = "sdpa", dtype: torch.dtype = torch.float32, **kw):
    kw = {"num_layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "head_dim": 64, "vocab": 96, **kw}
    model = tiny_llama(seed=1, dtype=dtype, **kw).to(DEVICE)
    model.set_attn_implementation(attn)
    return model


def _batch(seed: int, vocab: int, B: int = 3, S: int = 45, pads: tuple[int, ...] = (0, 7, 19)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for b, p in enumerate(pads[:B]):
        mask[b, :p] = 0  # left padding
    return ids.to(DEVICE), mask.to(DEVICE)


class _Counter:
    """Counts calls of the kernel entry point (to check that decode steps really take the kernel path)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        da = importlib.import_module("kvquant.kernels.decode_attention")
        fn = da.decode_attention

        def counted(*a, **k):
            self.n += 1
            return fn(*a, **k)

        monkeypatch.setattr(da, "decode_attention", counted)


def _teacher_forced_logits(model, cache, ids, mask, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prefill, then one forward per decode token in ``steps`` (``[B, 1]`` each); logits of every step.

    The cache goes in under the name this transformers uses (``cache`` on 5.2x); the ``generate`` tests below pass
    ``past_key_values``, the name older code uses, so both reach the kernel path."""
    out = []
    with torch.no_grad():
        pos = (mask.cumsum(1) - 1).clamp_min(0)  # as generate does
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache), use_cache=True)
        out.append(res.logits[:, -1].float())
        for tok in steps:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = (mask.cumsum(1) - 1)[:, -1:]
            res = model(input_ids=tok, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache),
                        use_cache=True)
            out.append(res.logits[:, -1].float())
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_triton_backend_matches_torch_step_by_step(seed: int, attn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(attn)
    ids, mask = _batch(seed, model.config.vocab_size)
    g = torch.Generator().manual_seed(seed + 1)
    steps = [torch.randint(3, model.config.vocab_size, (ids.shape[0], 1), generator=g).to(DEVICE) for _ in range(3)]
    ref = _teacher_forced_logits(model, KVQuantCache(model, CFG, backend="torch"), ids, mask, steps)
    assert kernel_attention.current_implementation(model) == attn  # torch backend leaves the model alone
    calls = _Counter(monkeypatch)
    cache = KVQuantCache(model, CFG, backend="triton")
    assert kernel_attention.current_implementation(model) == f"kvquant_{attn}"
    got = _teacher_forced_logits(model, cache, ids, mask, steps)
    assert calls.n == len(steps) * model.config.num_hidden_layers  # every decode step of every layer
    for i, (a, b) in enumerate(zip(ref, got)):
        err = float((a - b).abs().max() / a.abs().max())
        assert err < 1e-4, f"step {i}: relative logit gap {err:.2e}"
    layer = cache.layers[1]
    assert torch.equal(layer.qkeys.lengths, mask.sum(1) + len(steps))
    # resolved once, when the cache was built, and handed to every store
    assert cache.ops.name == "triton" and all(s.ops is cache.ops for lay in cache.layers
                                              for s in (lay.qkeys, lay.qvalues))
    kernel_attention.uninstall_kernel_attention(model)
    assert kernel_attention.current_implementation(model) == attn


def test_triton_backend_greedy_generate_identical(seed: int) -> None:
    model = _model()
    ids, mask = _batch(seed, model.config.vocab_size, S=40)
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_scores": True,
          "return_dict_in_generate": True}
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, past_key_values=KVQuantCache(model, CFG,
                                                                                              backend="torch"), **kw)
        got = model.generate(input_ids=ids, attention_mask=mask, past_key_values=KVQuantCache(model, CFG,
                                                                                              backend="triton"), **kw)
        # the wrapper delegates everything else to sdpa: a DynamicCache run is unchanged
        dyn = model.generate(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config),
                             **kw)
        kernel_attention.uninstall_kernel_attention(model)
        dyn_plain = model.generate(input_ids=ids, attention_mask=mask,
                                   past_key_values=DynamicCache(config=model.config), **kw)
    assert torch.equal(ref.sequences, got.sequences)
    for a, b in zip(ref.scores, got.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(dyn.sequences, dyn_plain.sequences)
    for a, b in zip(dyn.scores, dyn_plain.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backend_selection_and_errors() -> None:
    model = _model()
    assert KVQuantCache(model, CFG, backend="torch").backend == "torch"
    auto = KVQuantCache(model, CFG)
    assert auto.backend == ("triton" if DEVICE == "cuda" else "torch")
    with pytest.raises(ValueError, match="backend must be"):
        KVQuantCache(model, CFG, backend="cuda")
    with pytest.raises(ValueError, match="not quantized"):
        KVQuantCache(model, QuantConfig(datatype="fp16"), backend="triton")
    assert KVQuantCache(model, QuantConfig(datatype="fp16")).backend == "torch"
    small = _model(head_dim=16)
    with pytest.raises(ValueError, match="head size 16"):
        KVQuantCache(small, CFG, backend="triton")
    kernel_attention.uninstall_kernel_attention(model)


def test_unconsumed_pending_token_is_an_error(seed: int) -> None:
    """If the model's attention is switched away from the wrapper mid-generation, the cache says so."""
    model = _model()
    ids, mask = _batch(seed, model.config.vocab_size, B=2, S=36)
    cache = KVQuantCache(model, CFG, backend="triton")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
              past_key_values=cache)
        layer = cache.layers[0]
        k = torch.randn(2, 2, 1, 64, device=DEVICE)
        kernel_attention.enter(cache)
        try:
            cache._set_step(torch.cat([mask, torch.ones_like(mask[:, :1])], 1), (mask.sum(1, keepdim=True)))
            out_k, _ = layer.update(k, k.clone(), 0)
            assert out_k is k and layer.has_pending_decode(k)  # kernel path: only the new token comes back
            with pytest.raises(RuntimeError, match="never attended"):
                layer.update(k, k, 0)
        finally:
            kernel_attention.leave()
    assert kernel_attention.ACTIVE_CACHE.get() is None
    kernel_attention.uninstall_kernel_attention(model)


@pytest.mark.gpu
@gpu
def test_gpu_realistic_greedy_and_logits(seed: int) -> None:
    """fp16, head size 128, GQA 8/2, prompts of ~600 tokens (left padded), 12 greedy tokens."""
    model = _model(dtype=torch.float16, num_layers=3, hidden=512, heads=8, kv_heads=2, head_dim=128, vocab=512,
                   max_pos=2048)
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.01, n_sink=1, residual_length=16, page_size=64,
                      min_range_tokens=1)
    ids, mask = _batch(seed, model.config.vocab_size, B=4, S=640, pads=(0, 37, 150, 401))
    g = torch.Generator().manual_seed(seed + 1)
    steps = [torch.randint(3, 512, (4, 1), generator=g).to(DEVICE) for _ in range(6)]
    ref = _teacher_forced_logits(model, KVQuantCache(model, cfg, backend="torch"), ids, mask, steps)
    got = _teacher_forced_logits(model, KVQuantCache(model, cfg, backend="triton"), ids, mask, steps)
    for i, (a, b) in enumerate(zip(ref, got)):
        err = float((a - b).norm() / a.norm())
        assert err < 2e-2, f"step {i}: relative logit error {err:.2e}"
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        a = model.generate(input_ids=ids, attention_mask=mask, past_key_values=KVQuantCache(model, cfg,
                                                                                            backend="torch"), **kw)
        b = model.generate(input_ids=ids, attention_mask=mask, past_key_values=KVQuantCache(model, cfg,
                                                                                            backend="triton"), **kw)
    assert torch.equal(a, b)
    kernel_attention.uninstall_kernel_attention(model)


def test_positional_arguments_after_the_mask_reach_the_base_function(seed: int) -> None:
    """A wrapper that passes ``dropout`` by position (kvpress patches every registered attention function so) must
    not collide with ``scaling``, and the scaling the kernel path would use is the call's own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from kvquant.cache.kernel_attention import _bound_scaling, _make_attention

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 1, False
    attn = _make_attention("sdpa")
    got, _ = attn(module, q, k, v, None, 0.0, scaling=0.3)  # dropout by position, as kvpress passes it
    want, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=0.3)
    torch.testing.assert_close(got, want)
    assert _bound_scaling(sdpa_attention_forward, module, q, k, v, None, (0.0, 0.25), {}) == 0.25
    assert _bound_scaling(eager_attention_forward, module, q, k, v, None, (0.5,), {"dropout": 0.0}) == 0.5
