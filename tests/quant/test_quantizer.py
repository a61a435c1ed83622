import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvquant import BatchedKVQuantizer, QuantConfig, create_heuristic_codebook
from kvquant.bench.synthetic import heavy_tailed_kv

QUANTIZED = ["nuq2", "nuq3", "nuq4", "int2", "int3", "int4"]


def random_mask(B, S, g, side):
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    pos = torch.arange(S)[None, :]
    if side == "right":
        return pos < lengths[:, None]
    return pos >= (S - lengths)[:, None]


def level_error_bound(datatype):
    """Largest distance from a point of [-1, 1] to its nearest level (normalised units)."""
    lv = create_heuristic_codebook(datatype).levels.double()
    gaps = (lv[1:] - lv[:-1]) / 2
    return float(torch.max(torch.cat([gaps, (lv[:1] + 1).abs(), (1 - lv[-1:]).abs()])))


@settings(max_examples=12, deadline=None)
@given(datatype=st.sampled_from(QUANTIZED), B=st.integers(1, 4), H=st.integers(1, 3),
       S=st.integers(1, 90), D=st.sampled_from([4, 8, 16]), frac=st.sampled_from([0.0, 0.01, 0.05]),
       seed=st.integers(0, 2**31 - 1))
def test_padding_invariance(datatype, B, H, S, D, frac, seed):
    """The same tokens give the same codes and values whatever padding surrounds them."""
    g = torch.Generator().manual_seed(seed)
    x = heavy_tailed_kv((B, H, S, D), seed)
    mask = random_mask(B, S, g, "left")
    q = BatchedKVQuantizer(datatype=datatype, outlier_fraction=frac, page_size=32, min_range_tokens=1)
    # Re-pad the same real tokens on the right, with garbage in the padding.
    lengths = mask.sum(1)
    order = torch.sort((~mask).int(), dim=1, stable=True).indices
    x_right = x.gather(2, order[:, None, :, None].expand_as(x))
    right = torch.arange(S)[None, :] < lengths[:, None]
    x_right = torch.where(right[:, None, :, None], x_right, 1e3 * torch.randn_like(x_right))
    x_left = torch.where(mask[:, None, :, None], x, -1e3 * torch.randn_like(x))
    for quantize in (q.quantize_keys, q.quantize_values):
        a, b = quantize(x_left, mask), quantize(x_right, right)
        assert torch.equal(a.codes(), b.codes())
        da, ma = a.dequantize()
        db, mb = b.dequantize()
        assert torch.equal(ma, mb) and torch.equal(da, db)
        # Each sequence alone gives the same result as inside the batch.
        for i in range(B):
            alone = quantize(x_right[i:i + 1, :, : int(lengths[i])])
            assert torch.equal(alone.dequantize()[0][0], da[i, :, : int(lengths[i])])


@settings(max_examples=12, deadline=None)
@given(datatype=st.sampled_from(QUANTIZED), S=st.integers(8, 80), D=st.sampled_from([8, 32]),
       frac=st.sampled_from([0.01, 0.1]), seed=st.integers(0, 2**31 - 1))
def test_round_trip_error_bound_and_exact_outliers(datatype, S, D, frac, seed):
    """Inliers land within half a level gap (times their scale); outliers, sinks and the values' open page come
    back exactly."""
    x = heavy_tailed_kv((2, 2, S, D), seed, dtype=torch.float16)
    q = BatchedKVQuantizer(datatype=datatype, outlier_fraction=frac, n_sink=1, page_size=32, min_range_tokens=1)
    bound = level_error_bound(datatype)
    kc, vc = q.quantize_keys(x), q.quantize_values(x)
    T = 32
    for cache in (kc, vc):
        xd, _ = cache.dequantize()
        err = (xd.float() - x.float()).abs()
        assert torch.equal(xd[:, :, 0], x[:, :, 0])  # attention sink kept exactly
        q_tok = S - 1
        sealed = q_tok // T * T if cache.kind == "value" else q_tok  # values: full pages quantized, the rest exact
        assert torch.equal(xd[:, :, 1 + sealed:], x[:, :, 1 + sealed:])
        if sealed == 0:
            continue
        b, i = torch.meshgrid(torch.arange(2), torch.arange(sealed), indexing="ij")
        page, off = cache.pages.locate(b.flatten(), i.flatten())
        if cache.kind == "key":
            scale, zero = cache.channel_scale[:, :, None, :], cache.channel_zero[:, :, None, :]
        else:  # per token and head, [B, H, sealed, 1]
            scale, zero = (s.reshape(2, sealed, 2).transpose(1, 2)[..., None] for s in cache.value_scales(page, off))
        # nearest-level error, plus fp16 rounding of the stored scale/zero and of the output
        ref = x[:, :, 1:1 + sealed].float()
        tol = bound * scale + 2e-3 * (ref.abs() + scale + zero.abs()) + 1e-4
        assert bool((err[:, :, 1:1 + sealed] <= tol).all()), float((err[:, :, 1:1 + sealed] - tol).max())
        # outliers: exact (fp16 in, fp16 out)
        if cache.kind == "key":
            owner, ch, val = cache.outliers.entries_of(page * T + off)
            bo, io, ho, do = b.flatten()[owner], i.flatten()[owner] + 1, ch // D, ch % D
        else:
            pages = cache.pages.table[:, : sealed // T].long()
            owner, ho, do, tok, val = cache.outliers.entries(pages.reshape(-1))
            bo, io = owner // (sealed // T), (owner % (sealed // T)) * T + tok + 1
        assert val.numel() > 0 or (cache.kind == "value" and cache.per_side == 0)
        assert torch.equal(xd[bo, ho, io, do], x[bo, ho, io, do]) and torch.equal(val, x[bo, ho, io, do])


def test_nuq_beats_uniform_and_outliers_help_on_heavy_tails(seed):
    x = heavy_tailed_kv((1, 4, 512, 64), seed)

    def err(datatype, frac):
        q = BatchedKVQuantizer(datatype=datatype, outlier_fraction=frac, n_sink=0)
        k = q.quantize_keys(x).dequantize()[0]
        return float((k - x).norm() / x.norm())

    for bits in (2, 3, 4):
        assert err(f"nuq{bits}", 0.01) < err(f"int{bits}", 0.01)
        assert err(f"nuq{bits}", 0.01) < err(f"nuq{bits}", 0.0)
    assert err("nuq4", 0.01) < err("nuq3", 0.01) < err("nuq2", 0.01)


@pytest.mark.parametrize("kind", ["key", "value"])
def test_decode_appends_match_direct_quantization(kind, seed):
    """Appending tokens one by one gives what a single pass gives (keys with the same ranges)."""
    x = heavy_tailed_kv((3, 2, 77, 16), seed)
    q = BatchedKVQuantizer(datatype="nuq3", page_size=32)
    if kind == "key":
        once = q.quantize_keys(x)
        ranges = (once.channel_zero - once.channel_scale, once.channel_zero + once.channel_scale)
        steps = q.quantize_keys(x[:, :, :40], key_ranges=ranges)
    else:
        once = q.quantize_values(x)
        steps = q.quantize_values(x[:, :, :40])
    if kind == "key":
        once = q.quantize_keys(x, key_ranges=ranges)
    for t in range(40, 77):
        steps.append(x[:, :, t:t + 1])
    assert torch.equal(steps.codes(), once.codes())
    torch.testing.assert_close(steps.dequantize()[0], once.dequantize()[0], rtol=0, atol=1e-6)
    assert steps.outliers.nnz == once.outliers.nnz


@pytest.mark.parametrize("R", [1, 5, 64])
def test_residual_window_and_sinks(R, seed):
    x = heavy_tailed_kv((2, 2, 50, 8), seed)
    base = BatchedKVQuantizer(datatype="nuq2", n_sink=2, residual_length=0, page_size=32, min_range_tokens=1)
    win = BatchedKVQuantizer(datatype="nuq2", n_sink=2, residual_length=R, page_size=32, min_range_tokens=1)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, :9] = False
    a = win.quantize_values(x, mask)
    for t in range(6):  # decode steps push tokens out of the window
        a.append(x[:, :, t:t + 1] * 3)
    full = torch.cat([x, x[:, :, :6] * 3], 2)
    fmask = torch.cat([mask, torch.ones(2, 6, dtype=torch.bool)], 1)
    ref = base.quantize_values(full, fmask).dequantize_aligned(fmask)
    got = a.dequantize_aligned(fmask)
    for b in range(2):
        real = fmask[b].nonzero().flatten()
        L = real.numel()
        exact = torch.zeros(L, dtype=torch.bool)
        exact[:2] = True
        exact[max(2, L - R):] = True
        pos = real[exact]
        assert torch.equal(got[b, :, pos], full[b, :, pos])  # sinks and window exact
        pos = real[~exact]
        assert torch.equal(got[b, :, pos], ref[b, :, pos])  # the rest quantized as usual
    assert torch.equal(a.res_len, torch.tensor([min(R, 54), min(R, 45)]))


def test_fp16_datatype_is_lossless_and_compact():
    x = torch.randn(2, 3, 40, 8)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :30] = False
    q = BatchedKVQuantizer(datatype="fp16", page_size=32)
    c = q.quantize_keys(x, mask)
    assert torch.equal(c.dequantize_aligned(mask), x * mask[:, None, :, None])
    assert c.pages.n_pages == 1 + 2  # 10 tokens -> 1 page, 40 tokens -> 2 pages: padding stores nothing


def test_bits_per_element_nuq3_4k():
    """nuq3 with 1 % outliers, 4K tokens, Llama-7B-like head shape: <= 3.6 bits per element."""
    x = heavy_tailed_kv((1, 32, 4096, 128), 1234, dtype=torch.float16)
    q = BatchedKVQuantizer(datatype="nuq3", outlier_fraction=0.01)
    k, v = q.quantize_keys(x), q.quantize_values(x)
    rk, rv = k.memory_report(), v.memory_report()
    bits = 8 * (rk["total"] + rv["total"]) / (rk["elements"] + rv["elements"])
    print(f"nuq3-1% bits/element: keys {rk['bits_per_element']:.3f} values {rv['bits_per_element']:.3f} "
          f"mean {bits:.3f}")
    assert bits <= 3.6
    assert 0.005 < rk["outlier_fraction"] < 0.02 and 0.005 < rv["outlier_fraction"] < 0.02
    assert k.nbytes_allocated() >= k.nbytes()


def test_select_for_beam_search(seed):
    x = heavy_tailed_kv((3, 2, 70, 8), seed)
    q = BatchedKVQuantizer(datatype="nuq3", page_size=32)
    c = q.quantize_values(x)
    idx = torch.tensor([2, 2, 0])
    s = c.select(idx)
    ref, _ = c.dequantize()
    got, _ = s.dequantize()
    assert torch.equal(got, ref[idx])
    new = torch.randn(3, 2, 1, 8)
    s.append(new)  # duplicated beams own separate pages: no collision
    got, _ = s.dequantize()
    assert torch.equal(got[0, :, :70], ref[2]) and torch.equal(got[1, :, :70], ref[2])
    assert not torch.equal(got[0, :, 70], got[1, :, 70])


@pytest.mark.parametrize(
    "make, exc, msg",
    [
        (lambda: torch.randn(2, 3, 4), ValueError, "rank 4"),
        (lambda: torch.randint(0, 3, (1, 2, 3, 4)), TypeError, "float16"),
        (lambda: torch.zeros(0, 2, 3, 4), ValueError, "empty batch"),
        (lambda: torch.tensor(float("nan")).expand(1, 2, 3, 4).clone(), ValueError, "NaN"),
        (lambda: torch.full((1, 2, 3, 4), float("inf")), ValueError, "NaN or Inf"),
        (lambda: [[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_tensors(make, exc, msg):
    q = BatchedKVQuantizer()
    with pytest.raises(exc, match=msg):
        q.quantize_keys(make())
    with pytest.raises(exc, match=msg):
        q.quantize_values(make())


def test_bad_masks_and_configs():
    q = BatchedKVQuantizer()
    x = torch.randn(2, 2, 5, 4)
    with pytest.raises(ValueError, match=r"shape \[B, S\]"):
        q.quantize_keys(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"rows \[1\] have no real tokens"):
        q.quantize_values(x, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"rows \[0\] have no real tokens"):
        q.quantize_keys(x, torch.tensor([[0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]))
    with pytest.raises(TypeError, match="bool or integer"):
        q.quantize_keys(x, torch.ones(2, 5) * 0.5)
    with pytest.raises(ValueError, match="0 and 1"):
        q.quantize_keys(x, torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="unknown datatype"):
        BatchedKVQuantizer(datatype="nuq5")
    with pytest.raises(ValueError, match="page_size"):
        QuantConfig(page_size=48)
    with pytest.raises(ValueError, match="outlier_fraction"):
        QuantConfig(outlier_fraction=0.7)
    c = q.quantize_keys(x)
    with pytest.raises(ValueError, match="heads"):
        c.append(torch.randn(2, 3, 1, 4))
    with pytest.raises(ValueError, match="batch"):
        c.append(torch.randn(3, 2, 1, 4))
    with pytest.raises(ValueError, match="real tokens per row"):
        c.dequantize_aligned(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key ranges"):
        q.quantize_keys(x, key_ranges=(torch.zeros(3, 4), torch.ones(3, 4)))


def test_same_device_treats_bare_cuda_as_the_current_one(monkeypatch: pytest.MonkeyPatch):
    from kvquant.quant.validate import same_device

    assert same_device("cpu", torch.device("cpu")) and not same_device("cpu", "meta")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # no GPU needed: only the index logic
    assert same_device("cuda", "cuda:1") and same_device(torch.device("cuda:1"), "cuda")
    assert not same_device("cuda", "cuda:0") and not same_device("cuda:0", "cuda:1")
    assert same_device("cuda", "cuda") and not same_device("cuda", "cpu")
    # an appended tensor on another device is a clear error (the check the GPU run tripped over with 'cuda:0')
    c = BatchedKVQuantizer().quantize_keys(torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="lives on"):
        c.append(torch.randn(1, 2, 1, 4, device="meta"))


@pytest.mark.parametrize("residual, n_sink, frac", [(0, 1, 0.01), (3, 2, 0.01), (0, 0, 0.0), (5, 1, 0.05)])
def test_decode_fast_path_equals_the_general_path(seed: int, residual: int, n_sink: int, frac: float):
    """``append(x)`` (no mask: the sync-free decode path once sinks and residual are full) stores exactly what
    ``append(x, all-ones mask)`` (the general path) stores, step after step, across page boundaries."""
    from dataclasses import replace

    gen = torch.Generator().manual_seed(seed)
    B, H, D = 3, 2, 32
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=frac, n_sink=n_sink, residual_length=residual, page_size=32,
                      min_range_tokens=1,
                      backend="torch")
    x = torch.randn(B, H, 20, D, generator=gen)
    mask = torch.ones(B, 20, dtype=torch.bool)
    mask[1, :7] = False
    mask[2, :19] = False  # a row shorter than the residual window: not steady at first
    for kind in ("keys", "values"):
        fast, slow = (getattr(BatchedKVQuantizer(replace(cfg)), f"quantize_{kind}")(x, mask) for _ in range(2))
        for step in range(45):
            t = torch.randn(B, H, 1 + step % 2, D, generator=gen)
            fast.append(t)
            slow.append(t, torch.ones(B, t.shape[2], dtype=torch.bool))
            for name in ("q_len", "res_len", "sink_len", "sink", "residual"):
                assert torch.equal(getattr(fast, name), getattr(slow, name)), (kind, step, name)
            assert torch.equal(fast.dequantize()[0], slow.dequantize()[0]), (kind, step)
        assert fast._steady  # the fast path was taken
        assert int(fast.outliers.nnz) == int(slow.outliers.nnz)
        assert fast.pages.n_pages == slow.pages.n_pages


def test_decode_fast_path_reports_nan_within_the_check_interval():
    from kvquant.quant.store import DEFERRED_CHECK_EVERY

    cfg = QuantConfig(datatype="nuq4", backend="torch", min_range_tokens=1)
    c = BatchedKVQuantizer(cfg).quantize_values(torch.randn(2, 2, 8, 16))
    c.append(torch.randn(2, 2, 1, 16))
    bad = torch.randn(2, 2, 1, 16)
    bad[1, 0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        for _ in range(DEFERRED_CHECK_EVERY + 1):
            c.append(bad)
            bad = torch.randn(2, 2, 1, 16)
    with pytest.raises(ValueError, match="cannot be used further"):
        c.append(torch.randn(2, 2, 1, 16))
    # the general path (a mask given) still checks at once
    c2 = BatchedKVQuantizer(cfg).quantize_values(torch.randn(2, 2, 8, 16))
    with pytest.raises(ValueError, match="NaN"):
        c2.append(torch.full((2, 2, 1, 16), float("inf")), torch.ones(2, 1, dtype=torch.bool))
