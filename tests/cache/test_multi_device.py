"""``KVQuantCache`` with layers on several devices (``device_map="auto"``), tested without GPUs: calibration copied
lazily to the device each layer asks for (``meta`` stands in for a second device), stores on the device of the
K/V a layer receives, ``memory_report()["by_device"]``, kernel launches under the tensor's CUDA device."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from kvquant import QuantConfig
from kvquant.cache.hf_cache import KVQuantCache
from kvquant.cache.parallel import device_key, tensors_bytes_by_device
from kvquant.cache.rope import RotaryTables
from kvquant.calibration.calibrate import calibrate
from kvquant.kernels import ops as ops_mod
from kvquant.models import tiny_llama
from kvquant.quant.codebook import codebook_for
from tests.hf_tiny import greedy_generate, padded_batch


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def calibration(model):
    seqs = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    return calibrate(model, seqs, QuantConfig(), bits=(4,), model_id="tiny", progress=False)


def _store_tensors(store) -> list[torch.Tensor]:
    """Every tensor a store holds (its own fields, its page pools and table, its outlier matrix)."""
    out = [v for v in vars(store).values() if isinstance(v, torch.Tensor)]
    out += list(store.pages.pools.values()) + [store.pages.table]
    out += [v for v in vars(store.outliers).values() if isinstance(v, torch.Tensor)]
    out.append(store.codebook.levels)
    return out


def test_calibration_is_copied_lazily_to_each_layers_device(model, calibration):
    cache = KVQuantCache(model, QuantConfig(datatype="nuq4"), calibration=calibration)
    H = cache.num_kv_heads
    assert cache._quantizers == {}  # nothing moved before a layer asks
    on_meta = cache.quantizer_for(1, torch.device("meta"), H)
    on_cpu = cache.quantizer_for(0, torch.device("cpu"), H)
    assert len(cache._quantizers) == 2  # only the two layers that asked
    for r in on_meta.key_ranges:
        assert r.device.type == "meta" and r.shape == (H, cache.head_dim)
    assert on_meta.key_codebook.levels.device.type == "meta"
    assert on_meta.value_codebook.levels.device.type == "meta"
    assert all(r.device.type == "cpu" for r in on_cpu.key_ranges)
    torch.testing.assert_close(on_cpu.key_ranges[0], calibration.layers[0].key_lo)
    # the calibration itself stays where it was loaded; a second ask reuses the copy
    assert calibration.layers[1].key_lo.device.type == "cpu"
    assert cache.quantizer_for(1, "meta", H) is on_meta


def test_each_layer_stores_on_the_device_of_its_kv(model, calibration, seed, monkeypatch):
    cache = KVQuantCache(model, QuantConfig(datatype="nuq4", page_size=32), calibration=calibration)
    asked: dict[int, tuple] = {}
    seen: dict[int, torch.device] = {}
    real_quantizer_for, real_update = cache.quantizer_for, type(cache.layers[0]).update

    def spy_quantizer_for(layer_idx, device=None, num_heads=None):
        asked[layer_idx] = (device, num_heads)
        return real_quantizer_for(layer_idx, device, num_heads)

    def spy_update(self, key_states, value_states, *args, **kwargs):
        seen.setdefault(self.layer_idx, key_states.device)
        return real_update(self, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(cache, "quantizer_for", spy_quantizer_for)
    monkeypatch.setattr(type(cache.layers[0]), "update", spy_update)
    ids, mask = padded_batch(seed, model.config.vocab_size)
    greedy_generate(model, ids, mask, cache)
    assert sorted(asked) == list(range(cache.num_layers))
    for layer in cache.layers:
        dev = seen[layer.layer_idx]
        assert asked[layer.layer_idx] == (dev, cache.num_kv_heads)  # its own K/V's device, its own head count
        for store in (layer.qkeys, layer.qvalues):
            assert store.device == dev
            assert {t.device for t in _store_tensors(store)} == {dev}
        q = real_quantizer_for(layer.layer_idx, dev, cache.num_kv_heads)
        assert {t.device for t in q.key_ranges} == {dev}


def test_memory_report_by_device_sums_to_the_total(model, seed, monkeypatch):
    cache = KVQuantCache(model, QuantConfig(datatype="nuq4", page_size=32, min_range_tokens=1))
    ids, mask = padded_batch(seed, model.config.vocab_size)
    greedy_generate(model, ids, mask, cache)
    plain = cache.memory_report()
    assert plain["by_device"] == {"cpu": plain["total_bytes"]}
    # a device_map placement: the first half of the layers on cuda:0, the others on cuda:1 (the stores' device)
    assert cache.num_layers >= 2
    split = {i: ("cuda:0" if i < cache.num_layers // 2 else "cuda:1") for i in range(cache.num_layers)}
    for layer in cache.layers:
        for store in (layer.qkeys, layer.qvalues):
            monkeypatch.setattr(store, "device", torch.device(split[layer.layer_idx]))
    rep = cache.memory_report()
    by = rep["by_device"]
    assert set(by) == {"cuda:0", "cuda:1", "cpu"}  # (the layers' masks are real CPU tensors here)
    assert sum(by.values()) == rep["total_bytes"] == plain["total_bytes"]
    for dev in ("cuda:0", "cuda:1"):
        want = sum(layer.qkeys.nbytes_allocated() + layer.qvalues.nbytes_allocated()
                   for layer in cache.layers if split[layer.layer_idx] == dev)
        assert by[dev] == want > 0
    assert by["cpu"] == rep["layer_buffers"]
    # every field that was there before is still there, with the same value
    assert {k: v for k, v in rep.items() if k != "by_device"} == {k: v for k, v in plain.items() if k != "by_device"}


def test_tensors_bytes_by_device_counts_shared_storage_once():
    a = torch.zeros(10)
    got = tensors_bytes_by_device([a, a[2:], torch.zeros(3, dtype=torch.int64), torch.zeros(4, device="meta")])
    assert got == {"cpu": 40 + 24, "meta": 16}
    assert device_key("cuda:1") == "cuda:1" and device_key(torch.device("cpu")) == "cpu"


def test_triton_launches_run_under_the_tensors_cuda_device(monkeypatch):
    current: list[str] = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        current.append(str(device))
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    calls: list[tuple[str, str | None]] = []

    def record(name):
        return lambda *a, **k: calls.append((name, current[-1] if current else None))

    ops = object.__new__(ops_mod.TritonOps)
    ops._enc = types.SimpleNamespace(write_keys=record("write_keys"), write_value_pages=record("write_value_pages"),
                                     seal_open_pages=record("seal_open_pages"))
    ops._da = types.SimpleNamespace(decode_attention=record("decode_attention"))
    ops._unrope = types.SimpleNamespace(invert_rope_triton=record("invert_rope"))
    on1 = types.SimpleNamespace(device=torch.device("cuda:1"))
    q = types.SimpleNamespace(device=torch.device("cuda:1"))
    ops.write_keys(on1, None, None, None)
    ops.write_value_pages(on1, None, None)
    ops.seal_open_pages(on1)
    ops.decode_attention(q, on1, on1)
    ops.invert_rope(q, None, None)
    ops.write_keys(types.SimpleNamespace(device=torch.device("cpu")), None, None, None)  # off CUDA: no guard
    assert calls == [("write_keys", "cuda:1"), ("write_value_pages", "cuda:1"), ("seal_open_pages", "cuda:1"),
                     ("decode_attention", "cuda:1"), ("invert_rope", "cuda:1"), ("write_keys", None)]
    assert current == []


def test_rotary_tables_come_back_on_the_positions_device():
    class CpuRotary(torch.nn.Module):  # a rotary module dispatched to another device than the layer asking
        def forward(self, x, position_ids):
            pos = torch.zeros(position_ids.shape, dtype=torch.float16)
            return pos[..., None].expand(*pos.shape, 4), pos[..., None].expand(*pos.shape, 4)

    cos, sin = RotaryTables(CpuRotary())(torch.zeros(1, 3, dtype=torch.long, device="meta"))
    assert cos.device.type == sin.device.type == "meta" and cos.dtype == torch.float32


def test_codebook_to_another_device_keeps_levels_and_skips_revalidation():
    cb = codebook_for("nuq3")
    assert cb.to("cpu") is cb
    moved = cb.to("meta")
    assert moved.levels.device.type == "meta" and moved.name == cb.name and moved.bits == 3
    assert cb.levels.device.type == "cpu"
