"""The Triton writers store exactly the bytes the PyTorch writers store.

Each test runs the same appends (a padded prefill, then decode steps, eager or static) on two stores, one written by
:class:`~kvquant.kernels.ops.TorchOps` and one by :class:`~kvquant.kernels.ops.TritonOps`, and compares every
buffer: code units, value scales/zeros, key outliers (values, channel indices, slot starts, per-head counts), value
outlier blocks (values, tokens, per-channel counts, head starts), the open value pages, sinks, residual, lengths.
Without CUDA the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py) on small
shapes; the ``gpu`` tests use realistic ones.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")
from kvquant.bench.synthetic import heavy_tailed_kv  # noqa: E402
from kvquant.config import QuantConfig  # noqa: E402
from kvquant.kernels.ops import TORCH, resolve_ops  # noqa: E402
from kvquant.quant.quantizer import BatchedKVQuantizer  # noqa: E402
from kvquant.quant.store import QuantizedKVCache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def storage(c: QuantizedKVCache) -> dict[str, torch.Tensor]:
    """Every used byte a store holds, by name."""
    P = c.pages.n_pages
    out = {f"pool.{k}": v[:P] for k, v in c.pages.pools.items()}
    out.update({"table": c.pages.table, "sink": c.sink, "residual": c.residual, "q_len": c.q_len,
                "res_len": c.res_len, "sink_len": c.sink_len, "ranged": c.ranged})
    if c.channel_scale is not None:
        out.update({"channel_scale": c.channel_scale, "channel_zero": c.channel_zero})
    o = c.outliers
    if c.kind == "key" and o is not None:
        n, s = o.nnz, o.n_slots
        out.update({"out.values": o.values[:n], "out.indices": o.indices[:n], "out.slot_start": o.slot_start[:s],
                    "out.head_counts": o.head_counts[:s], "out.sizes": torch.tensor([n, s])})
    elif c.kind == "value" and o is not None:
        out.update({f"out.{f}": getattr(o, f)[:P] for f in ("values", "tokens", "counts", "head_start")})
        out["open"] = c.open
    return out


def assert_same(a: QuantizedKVCache, b: QuantizedKVCache, what: str) -> None:
    sa, sb = storage(a), storage(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k], sb[k]
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}: {k} {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        if not torch.equal(x, y):
            bad = (x != y).nonzero()
            pytest.fail(f"{what}: {k} differs at {bad.shape[0]} places, first {bad[:3].tolist()}")
    da, ma = a.dequantize()
    db, mb = b.dequantize()
    assert torch.equal(ma, mb) and torch.equal(da, db), what


def padded_mask(B: int, S: int, lengths: list[int]) -> torch.Tensor:
    """Row ``b`` has ``lengths[b]`` real tokens: left padding on odd rows, right padding on even ones."""
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if b % 2:
            mask[b, S - n:] = True
        else:
            mask[b, :n] = True
    return mask.to(DEVICE)


def run_both(seed: int, cfg: QuantConfig, B: int, H: int, D: int, S: int, lengths: list[int], n_decode: int,
             dtype: torch.dtype, static: bool = False) -> None:
    """Prefill + decode appends of keys and values written by both ops; storage must be identical after each."""
    triton_ops = resolve_ops("triton", DEVICE, [])
    x = heavy_tailed_kv((B, H, S, D), seed, dtype=dtype).to(DEVICE)
    mask = padded_mask(B, S, lengths)
    steps = [heavy_tailed_kv((B, H, 1, D), seed + 1 + t, dtype=dtype).to(DEVICE) for t in range(n_decode)]
    for kind in ("keys", "values"):
        stores = []
        for ops in (TORCH, triton_ops):
            qz = BatchedKVQuantizer(cfg, ops=ops)
            stores.append(getattr(qz, f"quantize_{kind}")(x, mask))
        assert_same(*stores, f"{kind} prefill")
        if static:
            for s in stores:
                s.begin_static(n_decode)
        for t, step in enumerate(steps):
            for s in stores:
                s.append(step)
            if not static:
                assert_same(*stores, f"{kind} decode step {t}")
        if static:
            for s in stores:
                s.end_static()
            assert_same(*stores, f"{kind} after {n_decode} static steps")


CASES = [  # datatype, outliers, sinks, residual, page, dtype
    ("nuq3", 0.05, 1, 0, 32, torch.float16),
    ("nuq4", 0.02, 0, 3, 64, torch.bfloat16),
    ("nuq2", 0.1, 2, 1, 32, torch.float32),
    ("int4", 0.0, 1, 0, 32, torch.float16),
]


@pytest.mark.parametrize("datatype,frac,n_sink,residual,page,dtype", CASES)
def test_writers_store_the_same_bytes(seed: int, datatype, frac, n_sink, residual, page, dtype):
    cfg = QuantConfig(min_range_tokens=1,
                      datatype=datatype, outlier_fraction=frac, n_sink=n_sink, residual_length=residual,
                      page_size=page)
    # rows 0 and 1 seal a value page within the decode steps; row 2 starts inside its sinks/residual window
    run_both(seed, cfg, B=3, H=2, D=64, S=90, lengths=[90, 60, 2], n_decode=10, dtype=dtype)


@pytest.mark.parametrize("static", [False, True])
def test_exact_hold_and_its_end_store_the_same_bytes(seed: int, static: bool):
    """Rows held exactly until they have 8 tokens past their sinks, ending their hold at different steps (eagerly),
    or all at once when a static run begins: the same ranges and bytes on both ops."""
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.1, n_sink=1, residual_length=1, page_size=32,
                      min_range_tokens=8)
    run_both(seed, cfg, B=3, H=2, D=64, S=12, lengths=[12, 5, 2], n_decode=6, dtype=torch.float16, static=static)


def test_prefill_thresholds_from_topk_store_the_same_bytes(seed: int, monkeypatch: pytest.MonkeyPatch):
    """Long appends take their value thresholds from ``torch.topk`` instead of the thresholds kernel: same bytes."""
    import importlib

    monkeypatch.setattr(importlib.import_module("kvquant.kernels.encode"), "LARGE_THRESHOLDS", 0)
    cfg = QuantConfig(min_range_tokens=1, datatype="nuq3", outlier_fraction=0.05, n_sink=1, page_size=32)
    run_both(seed, cfg, B=2, H=2, D=64, S=100, lengths=[100, 70], n_decode=0, dtype=torch.float16)


@pytest.mark.parametrize("residual", [0, 2])
def test_static_steps_store_what_eager_steps_store(seed: int, residual: int):
    """A static (graph-capturable) decode run writes what eager appends write, on both ops, across page seals."""
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq3", outlier_fraction=0.05, n_sink=1, residual_length=residual, page_size=32)
    run_both(seed, cfg, B=2, H=2, D=64, S=70, lengths=[70, 61], n_decode=12, dtype=torch.float16, static=True)
    triton_ops = resolve_ops("triton", DEVICE, [])
    x = heavy_tailed_kv((2, 2, 70, 64), seed, dtype=torch.float16).to(DEVICE)
    for ops in (TORCH, triton_ops):
        qz = BatchedKVQuantizer(cfg, ops=ops)
        for kind in ("keys", "values"):
            eager, static = (getattr(qz, f"quantize_{kind}")(x) for _ in range(2))
            static.begin_static(12)
            for t in range(12):
                y = heavy_tailed_kv((2, 2, 1, 64), seed + 100 + t, dtype=torch.float16).to(DEVICE)
                eager.append(y)
                static.append(y)
            static.end_static()
            (de, me), (ds, ms) = eager.dequantize(), static.dequantize()
            assert torch.equal(me, ms) and torch.equal(de, ds), (ops.name, kind)


def test_static_key_outlier_overflow_is_reported(seed: int):
    """A static run whose key outliers outgrow the reserved headroom raises at ``end_static`` (never silently
    drops them)."""
    cfg = QuantConfig(min_range_tokens=1, datatype="nuq3", outlier_fraction=0.01, page_size=32)
    qz = BatchedKVQuantizer(cfg, ops=resolve_ops("triton", DEVICE, []))
    store = qz.quantize_keys(heavy_tailed_kv((1, 2, 40, 64), seed, dtype=torch.float16).to(DEVICE))
    room = store.outliers.capacity_nnz - store.outliers.nnz
    steps = room // (2 * 64) + 2  # more outliers than the store has room for
    store.begin_static(steps, outlier_headroom=0.0)
    assert store.outliers.capacity_nnz - store.outliers.nnz < steps * 2 * 64
    for _ in range(steps):  # every element far out of the calibrated range: every one is an outlier
        store.append(torch.full((1, 2, 1, 64), 1e4, dtype=torch.float16, device=DEVICE))
    with pytest.raises(RuntimeError, match="outlier"):
        store.end_static()


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_writers_store_the_same_bytes_at_model_shapes(seed: int, dtype):
    cfg = QuantConfig(min_range_tokens=1, datatype="nuq3", outlier_fraction=0.01, n_sink=1, page_size=64)
    run_both(seed, cfg, B=4, H=8, D=128, S=3000, lengths=[3000, 2500, 17, 1200], n_decode=70, dtype=dtype)


def test_chunk_appends_hold_no_chunk_headroom(seed: int):
    """Multi-token appends (prefill chunks) on the Triton writer count their key outliers exactly: the capacity
    held stays within the amortized growth of what is stored (the sync-free decode path reserves a whole step's
    elements; a chunk's worth held after every chunk multiplied the key bytes held at short contexts), and the bytes
    are the torch writer's."""
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.01, n_sink=1, residual_length=0, page_size=32,
                      min_range_tokens=1)
    B, H, D, S, chunk, n_chunks = 2, 2, 64, 64, 32, 6
    x = heavy_tailed_kv((B, H, S + chunk * n_chunks, D), seed, dtype=torch.float16).to(DEVICE)
    mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    stores = [BatchedKVQuantizer(cfg, ops=ops).quantize_keys(x[:, :, :S], mask)
              for ops in (TORCH, resolve_ops("triton", DEVICE, []))]
    for c in range(n_chunks):
        part = x[:, :, S + c * chunk:S + (c + 1) * chunk]
        for s in stores:
            s.append(part, torch.ones(B, chunk, dtype=torch.bool, device=DEVICE))
    assert_same(*stores, "keys after chunk appends")
    o = stores[1].outliers
    assert o.nnz > 0
    assert o.capacity_nnz <= 1.25 * o.nnz + 2 * o.block_nnz, (o.capacity_nnz, o.nnz)
