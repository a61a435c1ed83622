"""Triton kernels vs their PyTorch references.

Without CUDA the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py before
triton is imported) on small shapes; with CUDA the same tests run compiled, plus ``@pytest.mark.gpu`` tests at
realistic shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")
from kvquant.config import QuantConfig  # noqa: E402
from kvquant.kernels.decode_attention import decode_attention  # noqa: E402
from kvquant.kernels.reference import decode_attention_reference  # noqa: E402
from tests.kernels.caches import DEVICE, TOL, build_caches, gpu, rel_err, rope_tables  # noqa: E402


def check(seed: int, B: int, Hkv: int, G: int, D: int, S: int, cfg: QuantConfig, dtype: torch.dtype,
          use_rope: bool, pages_per_split: int | None = None, n_decode: int = 2, half: bool = False,
          extra: bool = False) -> float:
    gen = torch.Generator().manual_seed(seed)
    kc, vc = build_caches(gen, B, Hkv, D, S, cfg, dtype, n_decode)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEVICE, dtype)
    rope = None
    if use_rope:
        cos, sin = rope_tables(S + n_decode + 64, D, half)
        rope = (cos, sin, torch.randint(0, 60, (B,), generator=gen).to(DEVICE))
    extra_kv = None
    if extra:
        extra_kv = tuple((3 * torch.randn(B, Hkv, D, generator=gen)).to(DEVICE, dtype) for _ in range(2))
    out = decode_attention(q, kc, vc, rope=rope, pages_per_split=pages_per_split, extra_kv=extra_kv)
    ref = decode_attention_reference(q, kc, vc, rope=rope, extra_kv=extra_kv)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"
    return err


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_decode_bits_gqa(seed: int, bits: int, G: int) -> None:
    cfg = QuantConfig(datatype=f"nuq{bits}", outlier_fraction=0.02, n_sink=1, residual_length=4, page_size=32)
    check(seed, B=3, Hkv=2, G=G, D=32, S=83, cfg=cfg, dtype=torch.float32, use_rope=bits == 3, half=G == 2)


@pytest.mark.parametrize("use_rope,half", [(False, False), (True, False), (True, True)])
def test_decode_extra_token(seed: int, use_rope: bool, half: bool) -> None:
    """Without RoPE, with full and with half RoPE tables, and the extra exact token (``extra_kv``)."""
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.05, n_sink=1, residual_length=3, page_size=64)
    check(seed, B=2, Hkv=2, G=2, D=32, S=90, cfg=cfg, dtype=torch.float32, use_rope=use_rope, half=half,
          extra=True)


def heavy_outliers(gen: torch.Generator, cache, group_size: int) -> None:
    """Replace the cache's outliers: per (token, head) none, a few or most of the ``D`` channels (all of them
    in every head of the first token), written in shuffled slot order with ``group_size``-channel groups."""
    o, H, D = cache.outliers, cache.num_heads, cache.head_dim
    q_len = cache.q_len.cpu()
    seq = torch.repeat_interleave(torch.arange(cache.batch), q_len)
    pos = torch.cat([torch.arange(int(n)) for n in q_len])
    page, off = cache.pages.locate(seq.to(DEVICE), pos.to(DEVICE))
    slots = (page * cache.config.page_size + off).cpu()
    n = slots.numel()
    mode = torch.randint(0, 3, (n, H, 1), generator=gen)  # 0: no entry, 1: ~10 %, 2: ~70 % of the channels
    mask = torch.rand(n, H, D, generator=gen) < torch.tensor([0.0, 0.1, 0.7])[mode]
    mask[0] = True
    vals = 4 * torch.randn(n, H * D, generator=gen)
    new = type(o)(o.n_inner, o.dtype, o.device, 16, 1, group_size=group_size)
    order = torch.randperm(n, generator=gen)
    for part in order.split(7):
        new.append_dense(slots[part].to(DEVICE), vals[part].to(DEVICE, o.dtype),
                         mask[part].reshape(-1, H * D).to(DEVICE))
    per_head = mask.sum(2)
    assert ((per_head == 0).sum(1) >= 2).any() and ((per_head > 0).sum(1) >= 3).any() and (per_head == D).any()
    cache.outliers = new


@pytest.mark.parametrize("groups_per_head", [1, 2])
def test_decode_outlier_heavy_heads(seed: int, groups_per_head: int) -> None:
    """Slots with entries in many heads, several heads with none, and whole heads of outliers; head runs read
    from per-(slot, group) counts with one or two groups per head."""
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.02, n_sink=1, residual_length=3, page_size=32)
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, G, D, S = 2, 4, 2, 32, 70
    kc, vc = build_caches(gen, B, Hkv, D, S, cfg, torch.float32, n_decode=1)
    for c in (kc, vc):
        heavy_outliers(gen, c, D // groups_per_head)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEVICE)
    for rope in (None, (*rope_tables(S + 64, D, True), torch.randint(0, 60, (B,), generator=gen).to(DEVICE))):
        out = decode_attention(q, kc, vc, rope=rope)
        ref = decode_attention_reference(q, kc, vc, rope=rope)
        assert rel_err(out, ref) < TOL[torch.float32]


def test_decode_bad_extra_and_tables(seed: int) -> None:
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.01, n_sink=1, residual_length=0, page_size=32)
    gen = torch.Generator().manual_seed(seed)
    kc, vc = build_caches(gen, 2, 2, 32, 40, cfg, torch.float32)
    q = torch.randn(2, 4, 32, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="extra_kv"):
        decode_attention(q, kc, vc, extra_kv=(q, q))
    cos, sin = rope_tables(64, 24)
    with pytest.raises(ValueError, match="rope tables"):
        decode_attention(q, kc, vc, rope=(cos, sin, torch.zeros(2, device=DEVICE)))


@pytest.mark.parametrize(
    "outliers,n_sink,residual",
    [(0.0, 0, 0), (0.05, 0, 0), (0.0, 3, 0), (0.0, 0, 7), (0.05, 2, 5)],
)
def test_decode_parts(seed: int, outliers: float, n_sink: int, residual: int) -> None:
    cfg = QuantConfig(datatype="int3", outlier_fraction=outliers, n_sink=n_sink, residual_length=residual,
                      page_size=64)
    check(seed, B=2, Hkv=2, G=2, D=32, S=101, cfg=cfg, dtype=torch.float32, use_rope=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_dtypes(seed: int, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter mis-computes tl.dot on bf16 operands (fine compiled on GPU)")
    cfg = QuantConfig(datatype="nuq4", outlier_fraction=0.01, n_sink=1, residual_length=8, page_size=32)
    check(seed, B=2, Hkv=2, G=4, D=64, S=77, cfg=cfg, dtype=dtype, use_rope=True)


def test_decode_many_splits(seed: int) -> None:
    """One page per split (empty splits for the shorter rows) and a row whose quantized part is empty."""
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.03, n_sink=1, residual_length=16, page_size=32)
    check(seed, B=3, Hkv=1, G=2, D=32, S=130, cfg=cfg, dtype=torch.float32, use_rope=False, pages_per_split=1)


def test_decode_only_exact_tokens(seed: int) -> None:
    """Everything fits in sink + residual: no quantized token at all."""
    cfg = QuantConfig(datatype="nuq2", outlier_fraction=0.01, n_sink=2, residual_length=64, page_size=32)
    check(seed, B=2, Hkv=2, G=1, D=32, S=40, cfg=cfg, dtype=torch.float32, use_rope=True, n_decode=1)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_gpu_realistic(seed: int, G: int, dtype: torch.dtype) -> None:
    """Llama-like heads (128 dims, 8 KV heads), a few thousand tokens, 3-bit with 1 % outliers."""
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.01, n_sink=4, residual_length=32, page_size=64)
    check(seed, B=4, Hkv=8, G=G, D=128, S=3000, cfg=cfg, dtype=dtype, use_rope=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_decode_gpu_fp32_bits(seed: int, bits: int) -> None:
    cfg = QuantConfig(datatype=f"nuq{bits}", outlier_fraction=0.01, n_sink=1, residual_length=16, page_size=128)
    check(seed, B=3, Hkv=4, G=2, D=128, S=1500, cfg=cfg, dtype=torch.float32, use_rope=True)
