"""``kvquant.cache.graphs.generate``: one greedy loop for KVQuantCache (static mode), StaticCache and DynamicCache.

Without CUDA the loop runs eagerly (``graph=False``); ``static=True`` runs exactly the code a CUDA graph captures
(device-side indices, in-place state), which must produce what the normal (eager) steps produce. On CUDA the graph
itself is tested against the eager loop.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernel backend cannot be tested")
from transformers import DynamicCache, StaticCache  # noqa: E402

from kvquant import QuantConfig  # noqa: E402
from kvquant.cache import kernel_attention  # noqa: E402
from kvquant.cache.graphs import generate  # noqa: E402
from kvquant.cache.hf_cache import KVQuantCache  # noqa: E402
from kvquant.models import tiny_llama  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CFG = QuantConfig(datatype="nuq4", outlier_fraction=0.02, n_sink=1, residual_length=2, page_size=32,
                  backend="triton", min_range_tokens=1)


@pytest.fixture(autouse=True)
def _topk_thresholds_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill value thresholds from ``topk`` on CPU (the interpreter's sort is slow; same bytes, see test_encode)."""
    if DEVICE == "cpu":
        monkeypatch.setattr(importlib.import_module("kvquant.kernels.encode"), "LARGE_THRESHOLDS", 0)


def _model(num_layers: int = 1, dtype: torch.dtype = torch.float32):
    model = tiny_llama(seed=1, num_layers=num_layers, hidden=128, heads=4, kv_heads=2, head_dim=64, vocab=128,
                       max_pos=512, dtype=dtype).to(DEVICE)
    return model


def _prompts(seed: int, B: int, S: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, : S // 4] = 0  # left padding
    return ids.to(DEVICE), mask.to(DEVICE)


def test_fp_caches_agree_and_bad_requests_are_errors(seed: int) -> None:
    model = _model()
    ids, mask = _prompts(seed, 2, 20, model.config.vocab_size)
    dyn = generate(model, ids, mask, DynamicCache(), 6, graph=False)
    sta = generate(model, ids, mask, StaticCache(config=model.config, max_cache_len=26), 6, graph=False)
    assert dyn.tokens.shape == (2, 6) and torch.equal(dyn.tokens, sta.tokens)
    with pytest.raises(ValueError, match="fewer than 20 \\+ 7"):
        generate(model, ids, mask, StaticCache(config=model.config, max_cache_len=26), 7, graph=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, mask, DynamicCache(), 0, graph=False)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA"):
            generate(model, ids, mask, DynamicCache(), 4, graph=True)
    else:
        with pytest.raises(ValueError, match="DynamicCache"):
            generate(model, ids, mask, DynamicCache(), 4, graph=True)


def test_static_steps_generate_what_eager_steps_generate(seed: int) -> None:
    """The captured step's code (static mode), run eagerly, picks the same tokens as normal decode steps, and leaves
    the cache as they do (lengths, the dequantized tokens of every layer)."""
    model = _model(num_layers=2)
    ids, mask = _prompts(seed, 2, 40, model.config.vocab_size)
    caches = [KVQuantCache(model, CFG) for _ in range(2)]
    eager = generate(model, ids, mask, caches[0], 5, graph=False, static=False)
    static = generate(model, ids, mask, caches[1], 5, graph=False, static=True)
    assert torch.equal(eager.tokens, static.tokens)
    assert not caches[1].static
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.seen_mask, b.seen_mask)
        for sa, sb in ((a.qkeys, b.qkeys), (a.qvalues, b.qvalues)):
            assert torch.equal(sa.lengths, sb.lengths)
            (da, ma), (db, mb) = sa.dequantize(), sb.dequantize()
            assert torch.equal(ma, mb) and torch.equal(da, db)
    kernel_attention.uninstall_kernel_attention(model)


def test_static_mode_needs_the_triton_backend_and_a_prefill(seed: int) -> None:
    model = _model()
    with pytest.raises(ValueError, match="triton backend"):
        KVQuantCache(model, QuantConfig(datatype="nuq4", backend="torch")).begin_static(4)
    with pytest.raises(ValueError, match="prefill"):
        KVQuantCache(model, CFG).begin_static(4)
    kernel_attention.uninstall_kernel_attention(model)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_replay_generates_what_eager_steps_generate(seed: int, dtype: torch.dtype) -> None:
    model = _model(num_layers=2, dtype=dtype)
    ids, mask = _prompts(seed, 3, 200, model.config.vocab_size)
    eager = generate(model, ids, mask, KVQuantCache(model, CFG), 40, graph=False, static=False)
    graph = generate(model, ids, mask, KVQuantCache(model, CFG), 40, graph=True)
    assert graph.mode == "graph" and torch.equal(eager.tokens, graph.tokens)
    sta = StaticCache(config=model.config, max_cache_len=240)
    fp_eager = generate(model, ids, mask, DynamicCache(), 40, graph=False)
    fp_graph = generate(model, ids, mask, sta, 40, graph=True)
    assert torch.equal(fp_eager.tokens, fp_graph.tokens)
    kernel_attention.uninstall_kernel_attention(model)
