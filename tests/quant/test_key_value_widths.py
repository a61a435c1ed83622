"""Separate key and value widths: datatype names (``k4v2``, ``int-k4v2``), stores at each side's width, the bytes
they hold, the round trip against the single-width datatypes, and the decode kernel."""

from __future__ import annotations

import pytest
import torch

from kvquant import BatchedKVQuantizer, QuantConfig, datatype_name, parse_datatype
from kvquant.flags import parse_datatypes


@pytest.mark.parametrize("name,canonical,kind,kb,vb", [
    ("nuq3", "nuq3", "nuq", 3, 3), ("k4v2", "k4v2", "nuq", 4, 2), ("K3V2", "k3v2", "nuq", 3, 2),
    ("k4v3", "k4v3", "nuq", 4, 3), ("k3v3", "nuq3", "nuq", 3, 3), ("int-k4v2", "int-k4v2", "int", 4, 2),
    ("nuq-k2v4", "k2v4", "nuq", 2, 4), ("int-k3v3", "int3", "int", 3, 3), ("int4", "int4", "int", 4, 4),
    ("fp16", "fp16", "fp", 16, 16),
])
def test_names(name, canonical, kind, kb, vb):
    dt = parse_datatype(name)
    assert (dt.name, dt.kind, dt.key_bits, dt.value_bits) == (canonical, kind, kb, vb)
    cfg = QuantConfig(datatype=name)
    assert (cfg.key_bits, cfg.value_bits) == (kb, vb)
    assert cfg.mean_bits == (kb + vb) / 2
    if kind != "fp":
        assert datatype_name(kind, kb, vb) == canonical
        assert parse_datatype(cfg.side_datatype("key")).bits == kb
        assert parse_datatype(cfg.side_datatype("value")).bits == vb
    if kb == vb:
        assert cfg.bits == kb
    else:  # one width is ambiguous for these: say so
        with pytest.raises(ValueError, match="key_bits / value_bits"):
            _ = cfg.bits


@pytest.mark.parametrize("bad,why", [
    ("k5v2", "widths must be 2, 3 or 4"), ("k4v1", "widths must be 2, 3 or 4"), ("nuq5", "unknown datatype"),
    ("k4", "unknown datatype"), ("k4v2x", "unknown datatype"), ("fp8-k4v2", "unknown datatype"),
    ("int-nuq3", "unknown datatype"), ("", "unknown datatype"),
])
def test_bad_names_are_rejected_with_the_reason(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_datatype(bad)
    with pytest.raises(ValueError, match=why):
        QuantConfig(datatype=bad)
    if bad:  # (an empty item of a list is skipped)
        with pytest.raises(ValueError, match="k<K>v<V>" if "unknown" in why else why):
            parse_datatypes(f"fp16,{bad}")


def test_per_layer_datatype_needs_a_layer():
    cfg = QuantConfig(datatype="nuq-alloc")
    assert cfg.per_layer and cfg.is_quantized
    with pytest.raises(ValueError, match="per-layer widths"):
        _ = cfg.key_bits
    with pytest.raises(ValueError, match="per-layer widths"):
        BatchedKVQuantizer(cfg)
    assert cfg.with_widths(4, 2).datatype == "k4v2" and cfg.with_widths(3, 3).datatype == "nuq3"
    assert QuantConfig(datatype="int3").with_widths(4, 2).datatype == "int-k4v2"


def _kv(seed: int, B: int = 2, H: int = 3, S: int = 150, D: int = 32):
    g = torch.Generator().manual_seed(seed)
    scale = 0.3 + 2 * torch.rand(1, H, 1, D, generator=g)
    k = torch.randn(B, H, S, D, generator=g) * scale + torch.randn(1, H, 1, D, generator=g)
    v = torch.randn(B, H, S, D, generator=g) * scale
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :37] = False
    return k, v, mask


@pytest.mark.parametrize("kind", ["nuq", "int"])
@pytest.mark.parametrize("kb,vb", [(4, 2), (3, 2), (2, 4)])
def test_each_side_is_the_single_width_datatype(seed, kind, kb, vb):
    """``k<K>v<V>`` keys are exactly ``<kind><K>``'s, its values exactly ``<kind><V>``'s: same bytes, same round
    trip."""
    k, v, mask = _kv(seed)
    base = dict(outlier_fraction=0.02, n_sink=1, page_size=32, min_range_tokens=1)
    mixed = BatchedKVQuantizer(QuantConfig(datatype=datatype_name(kind, kb, vb), **base))
    kq = BatchedKVQuantizer(QuantConfig(datatype=f"{kind}{kb}", **base))
    vq = BatchedKVQuantizer(QuantConfig(datatype=f"{kind}{vb}", **base))
    mk, mv = mixed.quantize_keys(k, mask), mixed.quantize_values(v, mask)
    rk, rv = kq.quantize_keys(k, mask), vq.quantize_values(v, mask)
    assert (mk.bits, mv.bits) == (kb, vb)
    xk, _ = mk.dequantize()
    xv, _ = mv.dequantize()
    assert torch.equal(xk, rk.dequantize()[0]) and torch.equal(xv, rv.dequantize()[0])
    assert mk.memory_report() == rk.memory_report() and mv.memory_report() == rv.memory_report()
    # and not the other width's: the comparison can fail
    other = BatchedKVQuantizer(QuantConfig(datatype=f"{kind}{vb}", **base)).quantize_keys(k, mask)
    assert not torch.equal(xk, other.dequantize()[0])
    # the bits a dense code takes, measured: code bytes over the code slots of the pages in use
    for store, bits in ((mk, kb), (mv, vb)):
        slots = store.pages.n_pages * store.num_heads * store.config.page_size * store.head_dim
        assert 8 * store.memory_report()["codes"] / slots == bits


def test_k4v2_cache_bytes(seed):
    """A k4v2 KVQuantCache holds 4-bit key codes and 2-bit value codes: its keys take the bytes of a nuq4 cache's
    keys, its values those of a nuq2 cache's values, and its bits per element sit between the two."""
    pytest.importorskip("transformers")
    from kvquant.cache.hf_cache import KVQuantCache
    from kvquant.models import tiny_llama
    from tests.hf_tiny import padded_batch

    model = tiny_llama(seed=0)
    ids, mask = padded_batch(seed, model.config.vocab_size, S=70)
    reports = {}
    for dt in ("k4v2", "nuq4", "nuq2"):
        cache = KVQuantCache(model, QuantConfig(datatype=dt, min_range_tokens=1), backend="torch")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        reports[dt] = cache.memory_report()
        if dt == "k4v2":  # every layer's code bits, measured from its bytes
            for layer in cache.layers:
                for store, bits in ((layer.qkeys, 4), (layer.qvalues, 2)):
                    slots = store.pages.n_pages * store.num_heads * store.config.page_size * store.head_dim
                    assert store.bits == bits and 8 * store.memory_report()["codes"] / slots == bits
    mixed, k4, v2 = reports["k4v2"], reports["nuq4"], reports["nuq2"]
    for key, value in mixed.items():
        if key.startswith("key_"):
            assert value == k4[key], key
        elif key.startswith("value_"):
            assert value == v2[key], key
    assert v2["bits_per_element"] < mixed["bits_per_element"] < k4["bits_per_element"]
    expect = 8 * (k4["key_allocated"] + v2["value_allocated"] + mixed["layer_buffers"]) / (
        mixed["key_elements"] + mixed["value_elements"])
    assert mixed["bits_per_element"] == pytest.approx(expect, rel=1e-12)
