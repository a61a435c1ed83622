"""The ops objects (``TorchOps`` / ``TritonOps``) and the one rule that resolves them."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")
from kvquant.config import QuantConfig  # noqa: E402
from kvquant.kernels.ops import TORCH, TorchOps, TritonOps, resolve_ops, store_ops  # noqa: E402
from kvquant.kernels.reference import decode_attention_reference  # noqa: E402
from kvquant.quant.codebook import create_heuristic_codebook  # noqa: E402
from kvquant.quant.store import QuantizedKVCache  # noqa: E402
from tests.kernels.caches import DEVICE, build_caches, rope_tables  # noqa: E402


def test_torch_ops_decode_attention_is_the_reference(seed: int) -> None:
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq3", outlier_fraction=0.01, n_sink=1, residual_length=0, page_size=32)
    gen = torch.Generator().manual_seed(seed)
    kc, vc = build_caches(gen, 2, 2, 64, 50, cfg, torch.float32)
    q = torch.randn(2, 4, 64, generator=gen).to(DEVICE)
    ref = decode_attention_reference(q, kc, vc)
    assert torch.equal(resolve_ops("torch", DEVICE, []).decode_attention(q, kc, vc), ref)
    if DEVICE == "cpu":  # auto = torch off CUDA
        assert torch.equal(resolve_ops("auto", DEVICE, []).decode_attention(q, kc, vc), ref)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_ops("cuda", DEVICE, [])
    with pytest.raises(ValueError, match="query heads"):
        TORCH.decode_attention(q[:, :3], kc, vc)
    with pytest.raises(ValueError, match="extra_kv"):
        TORCH.decode_attention(q, kc, vc, extra_kv=(q, q))


def test_triton_ops_decode_attention_matches_torch_ops(seed: int) -> None:
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq3", outlier_fraction=0.02, n_sink=1, residual_length=2, page_size=32)
    gen = torch.Generator().manual_seed(seed)
    kc, vc = build_caches(gen, 2, 2, 64, 45, cfg, torch.float32, n_decode=1)
    q = torch.randn(2, 4, 64, generator=gen).to(DEVICE)
    cos, sin = rope_tables(128, 64, half=True)
    rope = (cos, sin, torch.zeros(2, dtype=torch.int64, device=DEVICE))
    extra = tuple(torch.randn(2, 2, 64, generator=gen).to(DEVICE) for _ in range(2))
    got = resolve_ops("triton", DEVICE, []).decode_attention(q, kc, vc, rope=rope, extra_kv=extra)
    ref = TORCH.decode_attention(q, kc, vc, rope=rope, extra_kv=extra)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_resolve_ops_is_one_rule() -> None:
    assert resolve_ops("torch", "cuda", ["anything"]) is TORCH
    assert isinstance(resolve_ops("auto", "cuda", []), TritonOps)
    assert resolve_ops("auto", "cpu", []) is TORCH
    assert resolve_ops("auto", "cuda", ["head size 24"]) is TORCH
    assert isinstance(resolve_ops("triton", "cpu", []), TritonOps)  # explicit: runs even on CPU (interpreter)
    assert resolve_ops("triton", "cpu", []) is resolve_ops("auto", "cuda:0", [])  # one shared object
    with pytest.raises(ValueError, match="not possible: head size 24; fp16"):
        resolve_ops("triton", "cuda", ["head size 24", "fp16"])
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_ops("cuda", "cuda", [])
    assert [o.name for o in (TorchOps(), resolve_ops("triton", "cpu", []))] == ["torch", "triton"]


def test_stores_resolve_their_ops_once_when_built() -> None:
    cb = create_heuristic_codebook("nuq3")

    def store(backend: str, D: int = 64, datatype: str = "nuq3", ops=None) -> QuantizedKVCache:
        cfg = QuantConfig(min_range_tokens=1, datatype=datatype, backend=backend)
        return QuantizedKVCache("value", cfg, 1, 2, D, torch.float32, DEVICE, cb if datatype != "fp16" else None,
                                ops=ops)

    assert store("torch").ops is TORCH
    assert store("auto").ops.name == ("triton" if DEVICE == "cuda" else "torch")
    assert store("triton").ops.name == "triton"
    assert store("triton", datatype="fp16").ops is TORCH  # nothing to quantize: a copy
    assert store("auto", D=24).ops is TORCH  # the kernel cannot write head size 24: auto falls back
    with pytest.raises(ValueError, match="backend='triton' is not possible: head size 24"):
        store("triton", D=24)
    handed = resolve_ops("triton", DEVICE, [])
    assert store("auto", ops=handed).ops is handed  # a cache's ops are used as they are
    assert store("auto", D=24, ops=handed).ops is TORCH
    assert store_ops(store("torch"), TORCH) is TORCH


def test_invert_rope_agrees(seed: int) -> None:
    triton_ops = resolve_ops("triton", DEVICE, [])
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(2, 3, 5, 32, generator=gen).to(DEVICE, dtype)
        ang = torch.rand(2, 5, 16, generator=gen) * 10
        cos, sin = (torch.cat([f(ang), f(ang)], -1).to(DEVICE) for f in (torch.cos, torch.sin))
        a, b = TORCH.invert_rope(x, cos, sin), triton_ops.invert_rope(x, cos, sin)
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
