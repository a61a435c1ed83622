"""Reading a store back a group of heads at a time gives the same numbers as slicing the whole read (what bounds the
temporaries of a multi-token step), and a layer's grouped read is the all-heads read."""

from __future__ import annotations

import pytest
import torch

from kvquant import QuantConfig
from kvquant.cache.hf_cache import KVQuantCache
from kvquant.models import tiny_llama
from kvquant.quant import read as read_mod
from kvquant.quant.quantizer import BatchedKVQuantizer
from tests.hf_tiny import padded_batch


def _stores(seed: int, cfg: QuantConfig):
    gen = torch.Generator().manual_seed(seed)
    B, H, S, D = 3, 4, 77, 32
    k = torch.randn(B, H, S, D, generator=gen) * (0.3 + torch.rand(1, H, 1, D, generator=gen))
    v = torch.randn(B, H, S, D, generator=gen)
    k[:, :, :, 3] *= 12  # an outlier channel
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :9] = False  # left padding
    mask[2, S - 20:] = False  # right padding
    qz = BatchedKVQuantizer(cfg)
    kc, vc = qz.quantize_keys(k, mask), qz.quantize_values(v, mask)
    for _ in range(3):  # decode appends: open pages, residual window
        kc.append(torch.randn(B, H, 1, D, generator=gen))
        vc.append(torch.randn(B, H, 1, D, generator=gen))
    return kc, vc


@pytest.mark.parametrize("datatype,outliers,sink,residual", [("nuq3", 0.05, 1, 0), ("int2", 0.02, 2, 5),
                                                                ("nuq4", 0.0, 0, 3), ("fp16", 0.0, 1, 0)])
def test_head_slices_equal_the_whole(seed: int, datatype: str, outliers: float, sink: int, residual: int) -> None:
    cfg = QuantConfig(datatype=datatype, outlier_fraction=outliers, n_sink=sink, residual_length=residual,
                      page_size=32, min_range_tokens=1)
    for store in _stores(seed, cfg):
        whole, mask = store.dequantize()
        for heads in ((0, 1), (1, 3), (3, 4), (0, 4)):
            part, pmask = store.dequantize(heads)
            assert torch.equal(part, whole[:, heads[0]:heads[1]]) and torch.equal(pmask, mask)
        aligned_mask = torch.zeros(store.batch, int(store.lengths.max()) + 4, dtype=torch.bool)
        for b, n in enumerate(store.lengths.tolist()):
            aligned_mask[b, 4 - b: 4 - b + n] = True
        aligned = store.dequantize_aligned(aligned_mask)
        assert torch.equal(store.dequantize_aligned(aligned_mask, (2, 4)), aligned[:, 2:4])
        with pytest.raises(ValueError, match="heads must be a range"):
            store.dequantize((2, 2))
        with pytest.raises(ValueError, match="heads must be a range"):
            store.dequantize((0, 5))


def test_layer_reads_the_past_a_head_at_a_time(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt fed in chunks: with one head per group the logits and the stored bytes equal the all-heads read."""
    model = tiny_llama(seed=0)
    ids, mask = padded_batch(seed, model.config.vocab_size)
    cfg = QuantConfig(datatype="nuq3", page_size=32, min_range_tokens=1, backend="torch")

    def run() -> tuple[list[torch.Tensor], KVQuantCache]:
        cache = KVQuantCache(model, cfg)
        logits = []
        first = int(mask.long().argmax(1).max()) + 1  # every row has a real token in the first chunk
        bounds = [0, *range(first, ids.shape[1], 5), ids.shape[1]]
        with torch.no_grad():
            for c0, c1 in zip(bounds[:-1], bounds[1:]):
                out = model(input_ids=ids[:, c0:c1], attention_mask=mask[:, :c1], past_key_values=cache)
                logits.append(out.logits)
        assert len(logits) >= 3
        return logits, cache

    ref, ref_cache = run()
    monkeypatch.setattr(read_mod, "READ_GROUP_ELEMENTS", 1)  # one head per group
    got, got_cache = run()
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    for la, lb in zip(ref_cache.layers, got_cache.layers):
        assert torch.equal(la.qkeys.dequantize()[0], lb.qkeys.dequantize()[0])
        assert torch.equal(la.qvalues.dequantize()[0], lb.qvalues.dequantize()[0])


def test_kernel_read_of_the_past_matches_the_reference(seed: int) -> None:
    """A prompt fed in chunks through the Triton backend (its past read by :mod:`kvquant.kernels.read_past`) gives the
    torch backend's logits (same stored bytes, the past rounded once instead of twice) and the same stored tokens."""
    pytest.importorskip("triton", reason="triton is not installed")
    model = tiny_llama(seed=1, num_layers=2, hidden=128, heads=4, kv_heads=2, head_dim=64, vocab=96)
    ids, mask = padded_batch(seed, model.config.vocab_size, S=40)

    def run(backend: str) -> tuple[list[torch.Tensor], KVQuantCache]:
        cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.05, page_size=32, min_range_tokens=1, backend=backend)
        cache = KVQuantCache(model, cfg)
        assert cache.ops.name == backend
        logits = []
        bounds = [0, 14, 23, 31, ids.shape[1]]
        with torch.no_grad():
            for c0, c1 in zip(bounds[:-1], bounds[1:]):
                out = model(input_ids=ids[:, c0:c1], attention_mask=mask[:, :c1], past_key_values=cache)
                logits.append(out.logits)
        return logits, cache

    ref, ref_cache = run("torch")
    got, got_cache = run("triton")
    for a, b in zip(ref, got):
        assert float((a - b).norm() / a.norm()) < 1e-5
    for la, lb in zip(ref_cache.layers, got_cache.layers):
        assert torch.equal(la.qkeys.dequantize()[0], lb.qkeys.dequantize()[0])
        assert torch.equal(la.qvalues.dequantize()[0], lb.qvalues.dequantize()[0])
