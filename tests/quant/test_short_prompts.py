"""Keys without calibrated ranges: a sequence holds its tokens exactly until it has ``min_range_tokens`` of them
past its sinks, then sets its per-channel ranges from all of them and quantizes them. The stored key outlier
fraction stays near the configured one for any prompt length (estimating the ``f/2`` quantile from ``M`` tokens
leaves about ``f + 2/M`` of the later tokens outside; ``M = ceil(4/f)`` by default: about ``1.5 f``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvquant import BatchedKVQuantizer, QuantConfig, create_heuristic_codebook
from kvquant.quant.stats import channel_ranges

LENGTHS = [1, 2, 3, 5, 8, 20, 50, 128, 200, 512]


def channel_scales(g: torch.Generator, H: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel spread (0.05 .. 3) and offset of synthetic keys: every channel on its own scale."""
    return 0.05 + 3 * torch.rand(1, H, 1, D, generator=g), torch.randn(1, H, 1, D, generator=g)


def sample(g: torch.Generator, spread_offset, B: int, n: int) -> torch.Tensor:
    spread, offset = spread_offset
    H, D = spread.shape[1], spread.shape[3]
    return (torch.randn(B, H, n, D, generator=g) * spread + offset).to(torch.float16)


def level_error_bound(datatype: str) -> float:
    """Largest distance from a point of [-1, 1] to its nearest level (normalised units)."""
    lv = create_heuristic_codebook(datatype).levels.double()
    gaps = (lv[1:] - lv[:-1]) / 2
    return float(torch.max(torch.cat([gaps, (lv[:1] + 1).abs(), (1 - lv[-1:]).abs()])))


def stored_fraction(store) -> float:
    return store.memory_report()["outlier_fraction"]


def run_lengths(n: int, f: float, decode: int, backend: str, seed: int, B: int = 2, H: int = 4, D: int = 128,
                **cfg):
    """Prefill ``n`` tokens per row, then ``decode`` one-token appends; the key store after each step and every
    exact key appended, ``[B, H, L, D]``."""
    g = torch.Generator().manual_seed(seed)
    so = channel_scales(g, H, D)
    q = BatchedKVQuantizer(QuantConfig(datatype="nuq3", outlier_fraction=f, backend=backend, page_size=64, **cfg))
    x = sample(g, so, B, n)
    ks = q.quantize_keys(x)
    seen = [x]
    yield ks, torch.cat(seen, 2)
    for _ in range(decode):
        t = sample(g, so, B, 1)
        ks.append(t)
        seen.append(t)
        yield ks, torch.cat(seen, 2)


def check_store(ks, exact: torch.Tensor, f: float) -> None:
    """Held sequences: no key outlier, every token exact. Quantized: outliers within ``2 f``, inliers within the
    nuq3 error bound, outliers exact."""
    M = ks.config.range_tokens
    n_sink = ks.config.n_sink
    counted = exact.shape[2] - n_sink
    deq, _ = ks.dequantize()
    if counted < M:
        assert not bool(ks.ranged.any())
        assert int(ks.q_len.sum()) == 0 and ks.outliers.nnz == 0
        assert torch.equal(deq, exact)
        return
    assert bool(ks.ranged.all())
    assert stored_fraction(ks) <= 2 * f, (exact.shape[2], stored_fraction(ks))
    # every quantized key within the level grid of its channel's range (outliers exactly)
    q0, q1 = n_sink, n_sink + int(ks.q_len[0])
    err = (deq[:, :, q0:q1].float() - exact[:, :, q0:q1].float()).abs()
    bound = ks.channel_scale[:, :, None, :] * level_error_bound("nuq3") * 1.001 + 2e-3 * exact[:, :, q0:q1].abs()
    assert bool((err <= bound + 1e-3).all())
    # the tokens past the quantized ones and the sinks are exact
    assert torch.equal(deq[:, :, :n_sink], exact[:, :, :n_sink])
    assert torch.equal(deq[:, :, q1:], exact[:, :, q1:])


@pytest.mark.parametrize("n", LENGTHS)
def test_key_outlier_fraction_stays_near_the_configured_one_for_any_prompt_length(n, seed):
    """5 % outliers (M = 80): every prompt length, followed by 100 decode steps; held tokens are exact and hold no
    outlier, quantized ones keep at most 2 f of their entries as outliers."""
    f = 0.05
    assert QuantConfig(outlier_fraction=f).range_tokens == 80
    for step, (ks, exact) in enumerate(run_lengths(n, f, 100, "torch", seed)):
        if step % 10 == 0 or step == 100 or exact.shape[2] - 1 in (79, 80, 81):
            check_store(ks, exact, f)
    assert int(ks.q_len.min()) > 0


@pytest.mark.parametrize("n", [1, 20, 200, 512])
def test_default_one_percent_outliers(n, seed):
    """1 % outliers: 400 tokens are held, then ranges from all of them; at most 2 % of the entries after that."""
    f = 0.01
    assert QuantConfig().range_tokens == 400
    steps = max(0, 450 - n)
    last = None
    for step, (ks, exact) in enumerate(run_lengths(n, f, steps, "torch", seed, H=2)):
        if step in (0, steps) or exact.shape[2] == 400:
            check_store(ks, exact, f)
        last = ks
    assert int(last.q_len.min()) > 0


def test_explicit_ranges_and_fp16_hold_nothing(seed):
    g = torch.Generator().manual_seed(seed)
    x = sample(g, channel_scales(g, 2, 32), 2, 5)
    lo, hi = torch.full((2, 32), -3.0), torch.full((2, 32), 3.0)
    q = BatchedKVQuantizer(QuantConfig(datatype="nuq3", page_size=32), key_ranges=(lo, hi))
    assert q.hold_tokens() == 0
    ks = q.quantize_keys(x)
    assert int(ks.q_len.sum()) == 2 * 4 and bool(ks.ranged.all())
    assert q.quantize_values(x).hold_tokens == 0
    ks = BatchedKVQuantizer(QuantConfig(datatype="nuq3", page_size=32)).quantize_keys(x, key_ranges=(lo, hi))
    assert ks.hold_tokens == 0 and int(ks.q_len.sum()) == 8
    assert BatchedKVQuantizer(QuantConfig(datatype="fp16")).hold_tokens() == 0


def test_config_validation():
    with pytest.raises(ValueError, match="min_range_tokens"):
        QuantConfig(min_range_tokens=-1)
    assert QuantConfig(min_range_tokens=7).range_tokens == 7
    assert QuantConfig(outlier_fraction=0.0).range_tokens == 64
    assert QuantConfig(outlier_fraction=0.02).range_tokens == 200
    assert QuantConfig(outlier_fraction=0.03).range_tokens == math.ceil(4 / 0.03)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3), M=st.integers(1, 24),
       R=st.integers(0, 6), n_sink=st.integers(0, 2), decode=st.integers(0, 30), seed=st.integers(0, 2**31 - 1))
def test_hold_then_ranges_equal_a_prefill_of_the_same_tokens(lengths, M, R, n_sink, decode, seed):
    """Rows of different lengths in one padded batch: each row holds its tokens exactly until it has ``M`` past its
    sinks; its ranges are then those of all its tokens at that moment (as one prefill would set them), and the key
    and value stores keep one layout."""
    B, H, D, S = len(lengths), 2, 32, max(lengths)
    f = 0.1
    g = torch.Generator().manual_seed(seed)
    so = channel_scales(g, H, D)
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=f, n_sink=n_sink, residual_length=R, page_size=32,
                      min_range_tokens=M, backend="torch")
    q = BatchedKVQuantizer(cfg)
    x = sample(g, so, B, S)
    mask = torch.arange(S)[None, :] >= (S - torch.tensor(lengths))[:, None]  # left padding
    ks, vs = q.quantize_keys(x, mask), q.quantize_values(x, mask)
    rows = [x[b, :, S - lengths[b]:] for b in range(B)]  # each row's real tokens [H, n, D]
    for _ in range(decode):
        t = sample(g, so, B, 1)
        ks.append(t)
        vs.append(t)
        rows = [torch.cat([r, t[b]], 1) for b, r in enumerate(rows)]
    for name in ("sink_len", "q_len", "res_len", "ranged"):
        assert torch.equal(getattr(ks, name), getattr(vs, name)), name
    assert ks.residual.shape == vs.residual.shape
    deq, _ = ks.dequantize()
    for b, r in enumerate(rows):
        counted = r.shape[1] - n_sink
        assert bool(ks.ranged[b]) == (counted >= M)
        if counted < M:
            assert int(ks.q_len[b]) == 0
            assert torch.equal(deq[b, :, : r.shape[1]], r)
            continue
        assert int(ks.res_len[b]) == min(R, counted)
        # the ranges: from the row's first max(M, prompt) tokens past its sinks
        first = max(M, lengths[b] - n_sink)
        toks = r[None, :, n_sink: n_sink + first]
        lo, hi = channel_ranges(toks, torch.ones(1, toks.shape[2], dtype=torch.bool), f)
        assert torch.equal(ks.channel_scale[b], ((hi - lo) * 0.5).clamp_min(1e-6)[0])
        assert torch.equal(ks.channel_zero[b], ((hi + lo) * 0.5)[0])


def test_long_prompt_matches_prompt_ranges(seed):
    """A prompt of at least ``M`` tokens sets its ranges from the whole prompt at once, as it always did."""
    g = torch.Generator().manual_seed(seed)
    x = sample(g, channel_scales(g, 2, 64), 2, 120)
    q = BatchedKVQuantizer(QuantConfig(datatype="nuq3", outlier_fraction=0.05, page_size=32))
    ks = q.quantize_keys(x)
    lo, hi = channel_ranges(x[:, :, 1:], torch.ones(2, 119, dtype=torch.bool), 0.05)
    assert torch.equal(ks.channel_scale, ((hi - lo) * 0.5).clamp_min(1e-6))
    assert int(ks.q_len.min()) == 119 and ks.residual.shape[2] == 0


def test_settle_checkpoint_select_and_static(seed):
    """``settle`` (what ``begin_static`` does first) sets the ranges from the tokens seen so far; a checkpoint taken
    before a transition restores the held state; ``select`` keeps each row's hold."""
    g = torch.Generator().manual_seed(seed)
    so = channel_scales(g, 2, 32)
    cfg = QuantConfig(datatype="nuq3", outlier_fraction=0.05, residual_length=2, page_size=32, min_range_tokens=10,
                      backend="torch")
    q = BatchedKVQuantizer(cfg)
    x = sample(g, so, 2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :8] = False  # row 1: 4 tokens, held; row 0: 12, quantized
    ks = q.quantize_keys(x, mask)
    assert ks.ranged.tolist() == [True, False] and ks.q_len.tolist() == [9, 0] and ks.res_len.tolist() == [2, 3]

    picked = ks.select(torch.tensor([1, 1, 0]))
    assert picked.ranged.tolist() == [False, False, True]
    assert torch.equal(picked.dequantize()[0][2], ks.dequantize()[0][0])

    eager = ks.select(torch.arange(2))
    before = {k: getattr(ks, k) for k in ("ranged", "channel_scale", "channel_zero", "residual", "q_len", "res_len")}
    deq_before = ks.dequantize()[0]
    ck = ks.checkpoint(6)
    ks.append(sample(g, so, 2, 6))  # row 1 reaches 9 tokens past its sink: still held
    ks.append(sample(g, so, 2, 1))  # 10: its ranges are set, the window quantized down to 2
    assert ks.ranged.all() and ks.res_len.tolist() == [2, 2] and ks.residual.shape[2] == 2
    ks.restore(ck)
    for k, v in before.items():
        assert torch.equal(getattr(ks, k), v), k
    assert torch.equal(ks.dequantize()[0], deq_before)

    ks.begin_static(4)  # settles row 1 from its 3 tokens past the sink
    eager.settle()
    assert ks.ranged.all() and ks.residual.shape[2] == 2 and ks.q_len.tolist() == [9, 1]
    assert torch.equal(ks.channel_scale, eager.channel_scale)
    for _ in range(4):
        t = sample(g, so, 2, 1)
        ks.append(t)
        eager.append(t)
    ks.end_static()
    assert torch.equal(ks.dequantize()[0], eager.dequantize()[0])
    assert stored_fraction(ks) == stored_fraction(eager)
