"""Triton kernels vs their PyTorch references.

Without CUDA the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py before
triton is imported) on small shapes; with CUDA the same tests run compiled, plus ``@pytest.mark.gpu`` tests at
realistic shapes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")
import kvquant.kernels.decode_attention as da  # noqa: E402
from kvquant.config import QuantConfig  # noqa: E402
from kvquant.kernels.decode_attention import decode_attention  # noqa: E402
from kvquant.kernels.reference import decode_attention_reference  # noqa: E402
from kvquant.quant.quantizer import BatchedKVQuantizer  # noqa: E402
from tests.kernels.caches import DEVICE, TOL, build_caches, gpu, rel_err, rope_tables  # noqa: E402


def check(seed: int, B: int, Hkv: int, G: int, D: int, S: int, cfg: QuantConfig, dtype: torch.dtype,
          use_rope: bool, pages_per_split: int | None = None, n_decode: int = 2, extra: bool = False) -> float:
    gen = torch.Generator().manual_seed(seed)
    kc, vc = build_caches(gen, B, Hkv, D, S, cfg, dtype, n_decode)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEVICE, dtype)
    rope = None
    if use_rope:
        cos, sin = rope_tables(S + n_decode + 64, D, half=True)
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


@pytest.mark.parametrize("bits,G,dtype", [(2, 1, torch.float16), (3, 1, torch.float16), (3, 2, torch.float32),
                                          (4, 4, torch.float16), (3, 4, torch.bfloat16)])
def test_decode_bits_gqa(seed: int, bits: int, G: int, dtype: torch.dtype) -> None:
    cfg = QuantConfig(min_range_tokens=1,
                      datatype=f"nuq{bits}", outlier_fraction=0.02, n_sink=1, residual_length=4, page_size=32)
    check(seed, B=3, Hkv=2, G=G, D=64, S=83, cfg=cfg, dtype=dtype, use_rope=bits != 2)


@pytest.mark.parametrize("datatype,dtype", [("k4v2", torch.float32), ("k2v4", torch.float16),
                                            ("int-k4v3", torch.float32)])
def test_decode_separate_key_value_widths(seed: int, datatype: str, dtype: torch.dtype) -> None:
    """Keys and values at different widths: the kernel reads each store at its own width (KBITS, VBITS)."""
    cfg = QuantConfig(min_range_tokens=1,
                      datatype=datatype, outlier_fraction=0.02, n_sink=1, residual_length=4, page_size=32)
    B, Hkv, D = 2, 2, 64
    kc, vc = build_caches(torch.Generator().manual_seed(seed), B, Hkv, D, 75, cfg, dtype, n_decode=2)
    assert (kc.bits, vc.bits) == (cfg.key_bits, cfg.value_bits) and kc.bits != vc.bits
    check(seed, B=B, Hkv=Hkv, G=2, D=D, S=75, cfg=cfg, dtype=dtype, use_rope=True)


@pytest.mark.parametrize("use_rope", [False, True])
def test_decode_extra_token(seed: int, use_rope: bool) -> None:
    """Without and with RoPE, and the extra exact token (``extra_kv``)."""
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq3", outlier_fraction=0.05, n_sink=1, residual_length=3, page_size=64)
    check(seed, B=2, Hkv=2, G=2, D=64, S=90, cfg=cfg, dtype=torch.float16, use_rope=use_rope, extra=True)


def heavy_key_tokens(gen: torch.Generator, B: int, H: int, n: int, D: int) -> torch.Tensor:
    """``[B, H, n, D]`` keys whose (token, head) rows hold no, a few or mostly far-out channels (every channel of
    every head in the first token): appended after a normal prefill, they become outliers of every shape."""
    mode = torch.randint(0, 3, (B, H, n, 1), generator=gen)  # 0: none, 1: ~10 %, 2: ~70 % of the channels
    far = torch.rand(B, H, n, D, generator=gen) < torch.tensor([0.0, 0.1, 0.7])[mode]
    far[:, :, 0] = True
    x = torch.randn(B, H, n, D, generator=gen)
    return torch.where(far, 40 * x.sign() + x, 0.3 * x).to(DEVICE)


@pytest.mark.parametrize("Hkv,G,per_round", [(4, 2, 16), (3, 3, 4), (5, 1, 8)])
def test_decode_outlier_heavy_heads(seed: int, Hkv: int, G: int, per_round: int, monkeypatch) -> None:
    """Key slots with entries in many heads, several heads with none, and whole heads of outliers; values with a
    fifth of every token's elements kept exact. Head and group counts that are not powers of two too; a token's
    key-outlier entries taken in one round or in many (``CORR_ROUND``: whole heads of 64 entries span rounds)."""
    monkeypatch.setattr(da, "CORR_ROUND", per_round)
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq3", outlier_fraction=0.02, n_sink=1, residual_length=3, page_size=32)
    B, D, S, n = 2, 64, 70, 40
    kc, _ = build_caches(torch.Generator().manual_seed(seed), B, Hkv, D, S, cfg, torch.float32, n_decode=0)
    _, vc = build_caches(torch.Generator().manual_seed(seed), B, Hkv, D, S, replace(cfg, outlier_fraction=0.2),
                         torch.float32, n_decode=0)
    gen = torch.Generator().manual_seed(seed + 1)
    kc.append(heavy_key_tokens(gen, B, Hkv, n, D))
    vc.append(torch.randn(B, Hkv, n, D, generator=gen).to(DEVICE))
    o = kc.outliers
    per_head = o.head_counts[: o.n_slots].long()
    assert ((per_head == 0).sum(1) >= 2).any() and ((per_head > 0).sum(1) >= 3).any() and (per_head == D).any()
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEVICE)
    for rope in (None, (*rope_tables(S + n + 64, D, True), torch.randint(0, 60, (B,), generator=gen).to(DEVICE))):
        out = decode_attention(q, kc, vc, rope=rope)
        ref = decode_attention_reference(q, kc, vc, rope=rope)
        assert rel_err(out, ref) < TOL[torch.float32]


def test_decode_value_outliers_skewed(seed: int) -> None:
    """Value outliers piled into two channels of every head (dozens of entries per channel and page) over many
    pages and splits, beside pages whose entries spread over every channel."""
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq3", outlier_fraction=0.1, n_sink=1, residual_length=0, page_size=32)
    B, Hkv, G, D, S = 2, 2, 2, 64, 300
    gen = torch.Generator().manual_seed(seed)
    kc, _ = build_caches(gen, B, Hkv, D, S, cfg, torch.float32, n_decode=0, pad=False)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    hot = torch.randint(0, D, (Hkv, 2), generator=gen)
    gain = torch.ones(Hkv, D).scatter_(1, hot, 30.0)
    v[:, :, : S // 2] *= gain[None, :, None, :]  # first half skewed, second half spread
    vc = BatchedKVQuantizer(cfg).quantize_values(v.to(DEVICE))
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEVICE)
    for pps in (None, 3):
        out = decode_attention(q, kc, vc, pages_per_split=pps)
        ref = decode_attention_reference(q, kc, vc)
        assert rel_err(out, ref) < TOL[torch.float32]


def test_decode_bad_extra_and_tables(seed: int) -> None:
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq3", outlier_fraction=0.01, n_sink=1, residual_length=0, page_size=32)
    gen = torch.Generator().manual_seed(seed)
    kc, vc = build_caches(gen, 2, 2, 64, 40, cfg, torch.float32)
    q = torch.randn(2, 4, 64, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="extra_kv"):
        decode_attention(q, kc, vc, extra_kv=(q, q))
    cos, sin = rope_tables(64, 24)
    with pytest.raises(ValueError, match="rope tables"):
        decode_attention(q, kc, vc, rope=(cos, sin, torch.zeros(2, device=DEVICE)))
    cos, sin = rope_tables(64, 64)  # full [max_pos, D] tables: the torch reference's job
    with pytest.raises(ValueError, match="equal halves"):
        decode_attention(q, kc, vc, rope=(cos, sin, torch.zeros(2, device=DEVICE)))
    k32, v32 = build_caches(gen, 2, 2, 32, 40, cfg, torch.float32)
    with pytest.raises(ValueError, match="head size 32"):
        decode_attention(torch.randn(2, 4, 32).to(DEVICE), k32, v32)


@pytest.mark.parametrize(
    "outliers,n_sink,residual",
    [(0.0, 0, 0), (0.05, 0, 0), (0.0, 3, 0), (0.0, 0, 7), (0.05, 2, 5)],
)
def test_decode_parts(seed: int, outliers: float, n_sink: int, residual: int) -> None:
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="int3", outlier_fraction=outliers, n_sink=n_sink, residual_length=residual,
                      page_size=64)
    check(seed, B=2, Hkv=2, G=2, D=64, S=101, cfg=cfg, dtype=torch.float16, use_rope=True)


def test_decode_many_splits(seed: int) -> None:
    """One page per split (empty splits for the shorter rows) and a row whose quantized part is empty."""
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq3", outlier_fraction=0.03, n_sink=1, residual_length=16, page_size=32)
    check(seed, B=3, Hkv=1, G=2, D=64, S=130, cfg=cfg, dtype=torch.float16, use_rope=False, pages_per_split=1)


@pytest.mark.parametrize("datatype,dtype,pps", [("nuq3", torch.float16, None), ("nuq2", torch.float32, 1),
                                                 ("k4v2", torch.bfloat16, 2)])
def test_decode_one_head_values_without_dots(seed: int, datatype: str, dtype: torch.dtype, pps: int | None) -> None:
    """One query head per KV head, whose values pass accumulates elementwise at the split's maximum: sealed pages,
    open pages, outliers, padding, empty splits, every width."""
    cfg = QuantConfig(min_range_tokens=1,
                      datatype=datatype, outlier_fraction=0.03, n_sink=1, residual_length=3, page_size=32)
    check(seed, B=3, Hkv=2, G=1, D=64, S=97, cfg=cfg, dtype=dtype, use_rope=True, pages_per_split=pps)


def test_decode_only_exact_tokens(seed: int) -> None:
    """Everything fits in sink + residual: no quantized token at all."""
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq2", outlier_fraction=0.01, n_sink=2, residual_length=64, page_size=32)
    check(seed, B=2, Hkv=2, G=1, D=64, S=40, cfg=cfg, dtype=torch.float32, use_rope=True, n_decode=1)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_gpu_realistic(seed: int, G: int, dtype: torch.dtype) -> None:
    """Llama-like heads (128 dims, 8 KV heads), a few thousand tokens, 3-bit with 1 % outliers; one query head per
    KV head (elementwise values pass) and four (dots)."""
    cfg = QuantConfig(min_range_tokens=1,
                      datatype="nuq3", outlier_fraction=0.01, n_sink=4, residual_length=32, page_size=64)
    check(seed, B=4, Hkv=8, G=G, D=128, S=3000, cfg=cfg, dtype=dtype, use_rope=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [2, 4])
def test_decode_gpu_fp32_bits(seed: int, bits: int) -> None:
    cfg = QuantConfig(min_range_tokens=1,
                      datatype=f"nuq{bits}", outlier_fraction=0.01, n_sink=1, residual_length=16, page_size=128)
    check(seed, B=3, Hkv=4, G=2, D=128, S=1500, cfg=cfg, dtype=torch.float32, use_rope=True)
