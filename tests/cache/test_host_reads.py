"""How often a chunk of a chunked prefill makes the host read the device (each read waits for the GPU's queue, and
the GPU idles while the host catches up): counted on the CPU with the Triton backend (interpreter), the operations
that would sync on a GPU caught at dispatch (``item``, ``nonzero``, ...) and ``Tensor.tolist`` patched."""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

from kvquant import QuantConfig  # noqa: E402
from kvquant.cache.graphs import generate  # noqa: E402
from kvquant.cache.hf_cache import KVQuantCache  # noqa: E402
from kvquant.models import tiny_llama  # noqa: E402

READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default",
         "aten.masked_select.default", "aten._unique2.default"}


class HostReads(TorchDispatchMode):
    """Counts device reads by the kvquant line that made them (``repeat_interleave`` without ``output_size`` too)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter = collections.Counter()

    def record(self) -> None:
        frames = [f for f in traceback.extract_stack() if "/kvquant/" in f.filename]
        where = f"{frames[-1].filename.split('/kvquant/')[-1]}:{frames[-1].lineno}" if frames else "?"
        if not where.startswith("quant/codebook.py"):  # (a codebook's levels are host tensors: no device read)
            self.where[where] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in READS or (name.startswith("aten.repeat_interleave") and kwargs.get("output_size") is None):
            self.record()
        return func(*args, **kwargs)


def test_a_prefill_and_its_chunks_read_the_device_a_few_times_per_layer(seed: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    layers = 2
    model = tiny_llama(seed=seed % 1000, num_layers=layers, hidden=128, heads=4, kv_heads=2, head_dim=64, vocab=96)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (3, 120), generator=g)
    mask = torch.ones(3, 120, dtype=torch.long)
    mask[1, :9] = 0
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.02, page_size=32, min_range_tokens=1, backend="triton")
    counter = HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counter.record()
        return tolist(self)

    # the first chunk (the prefill: quantize the prompt) and the two chunks after it (read the past, append)
    chunks: list[collections.Counter] = []
    from kvquant.cache import layer as layer_module

    real_update = layer_module.KVQuantLayer.update

    prefill: list[collections.Counter] = []

    def update(self, key_states, value_states, *args, **kwargs):
        into = prefill if self.qkeys is None else chunks
        before = counter.where.copy()
        with counter:
            monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
            try:
                return real_update(self, key_states, value_states, *args, **kwargs)
            finally:
                monkeypatch.setattr(torch.Tensor, "tolist", tolist)
                into.append(counter.where - before)

    monkeypatch.setattr(layer_module.KVQuantLayer, "update", update)
    cache = KVQuantCache(model, cfg)
    generate(model, ids, mask, cache, 1, graph=False, prefill_chunk=40)
    assert len(chunks) == 2 * layers
    per_layer = [sum(c.values()) for c in chunks]
    total = collections.Counter()
    for c in chunks:
        total += c
    # one read per store (every count the append's host decisions need, the NaN/Inf check included), the key
    # writer's exact outlier count, and the position check once per step
    assert max(per_layer) <= 4, (per_layer, total)
    # the prefill: one read per store (the NaN/Inf and all-padding checks with it), the key writer's count, and
    # one per store allocating the rest of the chunked prompt (reserve_tokens)
    assert len(prefill) == layers and max(sum(c.values()) for c in prefill) <= 5, prefill
    assert sum(per_layer) <= 2 * (3 * layers + 1), (per_layer, total)


def test_a_prompt_of_padding_only_is_refused_before_anything_is_stored(seed: int) -> None:
    model = tiny_llama(seed=seed % 1000, num_layers=2, hidden=128, heads=4, kv_heads=2, head_dim=64, vocab=96)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1] = 0
    cache = KVQuantCache(model, QuantConfig(datatype="nuq3", page_size=32, min_range_tokens=1, backend="torch"))
    with pytest.raises(ValueError, match=r"rows \[1\] have no real tokens"):
        generate(model, ids, mask, cache, 1, graph=False)
    assert all(layer.qkeys is None and layer.cumulative_length == 0 for layer in cache.layers)
