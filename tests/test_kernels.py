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
from kvquant.quant.quantizer import BatchedKVQuantizer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rope_tables(max_pos: int, D: int, half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's cos/sin tables ``[max_pos, D]`` (``rotate_half`` layout), or their first halves ``[max_pos, D/2]``."""
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    e = f if half else torch.cat([f, f], -1)
    return e.cos().to(DEVICE), e.sin().to(DEVICE)


def build_caches(gen: torch.Generator, B: int, H: int, D: int, S: int, cfg: QuantConfig, dtype: torch.dtype,
                 n_decode: int = 2, pad: bool = True):
    """Prefill a padded batch (different lengths per row), then ``n_decode`` decode appends."""
    def rnd(*shape):
        x = torch.randn(*shape, generator=gen) * (0.5 + torch.rand(1, H, 1, D, generator=gen))
        return x.to(DEVICE, dtype)

    k, v = rnd(B, H, S, D), rnd(B, H, S, D)
    mask = torch.ones(B, S, dtype=torch.bool)
    if pad:
        for b in range(1, B):
            cut = int(torch.randint(1, S // 2, (1,), generator=gen))
            if b % 2:
                mask[b, :cut] = False  # left padding
            else:
                mask[b, S - cut:] = False  # right padding
    mask = mask.to(DEVICE)
    qz = BatchedKVQuantizer(cfg)
    kc, vc = qz.quantize_keys(k, mask), qz.quantize_values(v, mask)
    for _ in range(n_decode):
        kc.append(rnd(B, H, 1, D))
        vc.append(rnd(B, H, 1, D))
    return kc, vc


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def check(seed: int, B: int, Hkv: int, G: int, D: int, S: int, cfg: QuantConfig, dtype: torch.dtype,
          use_rope: bool, pages_per_split: int | None = None, n_decode: int = 2, half: bool = False,
          extra: bool = False, version: int | None = None) -> float:
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
    out = decode_attention(q, kc, vc, rope=rope, backend="triton", pages_per_split=pages_per_split,
                           extra_kv=extra_kv, version=version)
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


@pytest.mark.parametrize("version", [2, 3, "3b"])
@pytest.mark.parametrize("use_rope,half", [(False, False), (True, False), (True, True)])
def test_decode_versions_extra_token(seed: int, version: int, use_rope: bool, half: bool) -> None:
    """Both page-kernel versions, full and half RoPE tables, and the extra exact token (``extra_kv``)."""
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.05, n_sink=1, residual_length=3, page_size=64)
    check(seed, B=2, Hkv=2, G=2, D=32, S=90, cfg=cfg, dtype=torch.float32, use_rope=use_rope, half=half,
          extra=True, version=version)


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


@pytest.mark.parametrize("version", [2, 3, "3b"])
@pytest.mark.parametrize("groups_per_head", [1, 2])
def test_decode_outlier_heavy_heads(seed: int, version, groups_per_head: int) -> None:
    """Slots with entries in many heads, several heads with none, and whole heads of outliers; head runs read
    from per-(slot, group) counts with one or two groups per head (version 2: binary search)."""
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.02, n_sink=1, residual_length=3, page_size=32)
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, G, D, S = 2, 4, 2, 32, 70
    kc, vc = build_caches(gen, B, Hkv, D, S, cfg, torch.float32, n_decode=1)
    for c in (kc, vc):
        heavy_outliers(gen, c, D // groups_per_head)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(DEVICE)
    for rope in (None, (*rope_tables(S + 64, D, True), torch.randint(0, 60, (B,), generator=gen).to(DEVICE))):
        out = decode_attention(q, kc, vc, rope=rope, backend="triton", version=version)
        ref = decode_attention_reference(q, kc, vc, rope=rope)
        assert rel_err(out, ref) < TOL[torch.float32]


def test_decode_bad_extra_and_tables(seed: int) -> None:
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.01, n_sink=1, residual_length=0, page_size=32)
    gen = torch.Generator().manual_seed(seed)
    kc, vc = build_caches(gen, 2, 2, 32, 40, cfg, torch.float32)
    q = torch.randn(2, 4, 32, generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="extra_kv"):
        decode_attention(q, kc, vc, backend="triton", extra_kv=(q, q))
    cos, sin = rope_tables(64, 24)
    with pytest.raises(ValueError, match="rope tables"):
        decode_attention(q, kc, vc, backend="triton", rope=(cos, sin, torch.zeros(2, device=DEVICE)))
    with pytest.raises(ValueError, match="version"):
        decode_attention(q, kc, vc, backend="triton", version=1)


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


def test_backends_agree_on_torch(seed: int) -> None:
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.01, n_sink=1, residual_length=0, page_size=32)
    gen = torch.Generator().manual_seed(seed)
    kc, vc = build_caches(gen, 2, 2, 32, 50, cfg, torch.float32)
    q = torch.randn(2, 4, 32, generator=gen).to(DEVICE)
    ref = decode_attention_reference(q, kc, vc)
    assert torch.equal(decode_attention(q, kc, vc, backend="torch"), ref)
    if DEVICE == "cpu":
        assert torch.equal(decode_attention(q, kc, vc, backend="auto"), ref)  # auto = torch off CUDA
    with pytest.raises(ValueError):
        decode_attention(q, kc, vc, backend="cuda")
    with pytest.raises(ValueError):
        decode_attention(q[:, :3], kc, vc, backend="torch")


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


def test_resolve_backend_is_one_rule() -> None:
    from kvquant.kernels._triton import resolve_backend

    assert resolve_backend("torch", ["anything"], True) == "torch"
    assert resolve_backend("auto", [], True) == "triton" and resolve_backend("auto", [], False) == "torch"
    assert resolve_backend("auto", ["head size 24"], True) == "torch"
    assert resolve_backend("triton", [], False) == "triton"  # explicit: runs even on CPU (interpreter)
    with pytest.raises(ValueError, match="not possible: head size 24; fp16"):
        resolve_backend("triton", ["head size 24", "fp16"], True)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", [], True)


@pytest.mark.parametrize("name", ["quanto4", "hqq4"])
def test_hf_quantized_cache_step_attends_over_every_token(name: str, seed: int) -> None:
    """The benchmark's transformers-QuantizedCache row really runs that cache: each step appends a token and
    attends over the whole dequantized context (close to exact attention at 4 bits)."""
    from kvquant.bench.kernels import hf_quantized_step
    from kvquant.eval.baselines import baseline_available

    ok, why = baseline_available(name)
    if not ok:
        pytest.skip(why)
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, L, D = 2, 4, 2, 300, 64
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    step, cache = hf_quantized_step(name, q, k, v)
    for n in range(1, 4):
        out = step()
        kk = torch.cat([k] + [k[:, :, -1:]] * n, 2)
        vv = torch.cat([v] + [v[:, :, -1:]] * n, 2)
        want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
        assert out.shape == want.shape and cache.get_seq_length() == L + n
        assert float((out - want).norm() / want.norm()) < 0.25


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,S,D", [(1, 1, 32), (3, 5, 64), (8, 2, 128)])
def test_unrope_kernel_is_bit_identical_to_torch(seed: int, dtype: torch.dtype, H: int, S: int, D: int) -> None:
    """The Triton inverse rotary embedding of incoming keys equals ``invert_rope(...).to(dtype)`` bit for bit,
    also for scaled tables (``cos^2 + sin^2 != 1``, e.g. YaRN attention scaling) and strided input."""
    from kvquant.cache.rope import invert_rope
    from kvquant.kernels.unrope import invert_rope_triton

    gen = torch.Generator().manual_seed(seed)
    B = 2
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.randint(0, 40000, (B, S), generator=gen).float()
    f = pos[..., None] * inv
    emb = torch.cat([f, f], -1)
    scale = 1.0 + 0.3 * torch.rand(B, S, 1, generator=gen)
    cos, sin = (emb.cos() * scale).to(DEVICE), (emb.sin() * scale).to(DEVICE)
    k = (torch.randn(B, S, H, D, generator=gen) * 3).to(DEVICE, dtype).transpose(1, 2)  # [B, H, S, D], strided
    want = invert_rope(k, cos, sin).to(dtype)
    got = invert_rope_triton(k, cos, sin)
    assert got.dtype == dtype and got.shape == k.shape
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    with pytest.raises(ValueError, match="cos/sin"):
        invert_rope_triton(k, cos[..., : D // 2], sin)
