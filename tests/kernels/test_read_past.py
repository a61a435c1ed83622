"""The past read of a multi-token step (:func:`kvquant.kernels.read_past.read_past`) against the torch reference
(:func:`kvquant.quant.read.read_past`): keys rotated back with RoPE and values, sinks, residual tokens, open value
pages, key and value outliers (heavy ones too), every width, padding on either side and in the middle."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be tested")
import kvquant.kernels.read_past as rp  # noqa: E402
from kvquant.config import QuantConfig  # noqa: E402
from kvquant.kernels.read_past import column_of_token, read_past, unsupported_reason  # noqa: E402
from kvquant.quant import read as reference  # noqa: E402
from tests.kernels.caches import DEVICE, build_caches, rel_err, rope_tables  # noqa: E402
from tests.kernels.test_decode_attention import heavy_key_tokens  # noqa: E402

# relative error allowed: the reference rounds the keys to the store's dtype before RoPE and after, the kernel once
READ_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def layout(gen: torch.Generator, lengths: list[int], extra: int) -> torch.Tensor:
    """``[B, max + extra]`` bool: row ``b`` has ``lengths[b]`` real positions, placed left, right or scattered."""
    S = max(lengths) + extra
    mask = torch.zeros(len(lengths), S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if b % 3 == 0:
            mask[b, S - n:] = True  # left padding
        elif b % 3 == 1:
            mask[b, :n] = True  # right padding
        else:
            mask[b, torch.randperm(S, generator=gen)[:n].sort().values] = True
    return mask.to(DEVICE)


def both(store, mask: torch.Tensor, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kernel, reference)`` reads into ``[B, H, S, D]`` views of buffers with more columns (as a layer's are)."""
    B, S = mask.shape
    shape = (B, store.num_heads, S + 3, store.head_dim)
    got = torch.full(shape, float("nan"), dtype=store.dtype, device=DEVICE)
    ref = torch.full(shape, float("nan"), dtype=store.dtype, device=DEVICE)
    read_past(store, mask, got[:, :, :S], rope)
    reference.read_past(store, mask, ref[:, :, :S], rope)
    assert torch.isnan(got[:, :, S:]).all(), "wrote past the view"
    return got[:, :, :S], ref[:, :, :S]


def check(store, mask: torch.Tensor, rope, dtype: torch.dtype) -> None:
    got, ref = both(store, mask, rope)
    pad = ~mask[:, None, :, None].expand_as(got)
    assert (got[pad] == 0).all(), "padding must be zeros"
    err = rel_err(got, ref)
    assert err < READ_TOL[dtype], f"{store.kind}: relative error {err:.2e}"


@pytest.mark.parametrize("datatype,dtype,residual", [("nuq3", torch.float16, 0), ("nuq2", torch.float32, 3),
                                                     ("nuq4", torch.bfloat16, 5), ("int3", torch.float32, 0)])
def test_read_past_matches_reference(seed: int, datatype: str, dtype: torch.dtype, residual: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    cfg = QuantConfig(datatype=datatype, outlier_fraction=0.03, n_sink=1, residual_length=residual, page_size=32,
                      min_range_tokens=1)
    B, H, D, S = 4, 3, 64, 77
    kc, vc = build_caches(gen, B, H, D, S, cfg, dtype, n_decode=3)
    lengths = kc.lengths.tolist()
    assert vc.deferred and any(q % 32 for q in vc.q_len.tolist()), "some value page must be open"
    mask = layout(gen, lengths, extra=5)
    cos, sin = rope_tables(S + 64, D)
    pos = torch.randint(0, 40, (B,), generator=gen).to(DEVICE)
    rank = (mask.long().cumsum(1) - 1).clamp_min(0)
    rope = (cos[pos[:, None] + rank], sin[pos[:, None] + rank])
    check(kc, mask, rope, dtype)
    check(kc, mask, None, dtype)
    check(vc, mask, None, dtype)


def test_read_past_heavy_key_outliers(seed: int, monkeypatch) -> None:
    """Tokens whose heads hold no, some or mostly outliers (every channel of every head in the first one); the
    per-head counts read two at a time, so a lane's lookup takes several rounds (``HEAD_COUNTS_AT_ONCE``; the other
    tests read them in one)."""
    monkeypatch.setattr(rp, "HEAD_COUNTS_AT_ONCE", 2)
    gen = torch.Generator().manual_seed(seed)
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.02, n_sink=1, residual_length=0, page_size=32,
                      min_range_tokens=1)
    B, H, D, S, n = 2, 3, 128, 45, 40
    kc, _ = build_caches(gen, B, H, D, S, cfg, torch.float32, n_decode=0)
    kc.append(heavy_key_tokens(gen, B, H, n, D))
    assert (kc.outliers.head_counts[: kc.outliers.n_slots] == D).any()
    mask = layout(gen, kc.lengths.tolist(), extra=2)
    cos, sin = rope_tables(S + n + 8, D)
    rank = (mask.long().cumsum(1) - 1).clamp_min(0)
    check(kc, mask, (cos[rank], sin[rank]), torch.float32)


def test_read_past_values_only_open_pages_and_no_outliers(seed: int) -> None:
    """Sequences shorter than a page (values all in the open page) and a store without outliers."""
    gen = torch.Generator().manual_seed(seed)
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.0, n_sink=2, residual_length=0, page_size=64,
                      min_range_tokens=1)
    kc, vc = build_caches(gen, 3, 2, 64, 20, cfg, torch.float16, n_decode=1)
    mask = layout(gen, kc.lengths.tolist(), extra=0)
    check(kc, mask, None, torch.float16)
    check(vc, mask, None, torch.float16)


def test_column_of_token_and_refusals(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = layout(gen, [3, 5, 2], extra=2)
    cols = column_of_token(mask)
    for b in range(3):
        real = mask[b].nonzero().squeeze(1)
        assert torch.equal(cols[b, : real.numel()], real)
    cfg = QuantConfig(datatype="nuq3", page_size=32, min_range_tokens=1, rotation="hadamard")
    kc, _ = build_caches(gen, 2, 2, 64, 40, cfg, torch.float32, n_decode=0)
    assert "rotated" in unsupported_reason(kc)
    m = torch.ones(2, int(kc.lengths.max()), dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=r"out must be \[B, H, S, D\]"):
        read_past(kc, m, torch.empty(2, 2, 3, 64, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_read_past_value_outliers_exact(seed: int, dtype: torch.dtype) -> None:
    """Every stored value outlier lands, bit for bit, at its (sequence, head, column, channel): several sealed pages
    per sequence, heavy outliers (8 %), sinks and scattered padding; pages past a sequence's sealed ones add nothing."""
    gen = torch.Generator().manual_seed(seed)
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.08, n_sink=2, residual_length=0, page_size=32,
                      min_range_tokens=1)
    B, H, D, S = 3, 4, 64, 150
    _, vc = build_caches(gen, B, H, D, S, cfg, dtype, n_decode=5)
    assert int((vc.sealed_len // 32).max()) >= 3 and vc.outliers.nnz > 0
    mask = layout(gen, vc.lengths.tolist(), extra=7)
    got, ref = both(vc, mask)
    b_idx, head, pos, chan, v = vc.outlier_entries()
    col = column_of_token(mask)[b_idx, vc.sink_len[b_idx] + pos]
    assert torch.equal(got[b_idx, head, col, chan], v.to(dtype))
    assert torch.equal(ref[b_idx, head, col, chan], v.to(dtype))
    assert rel_err(got, ref) < READ_TOL[dtype]
