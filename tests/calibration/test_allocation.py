"""Per-layer bit allocation: the exact optimum under the budget, on synthetic and on real calibration errors, the
file round trip, and a ``nuq-alloc`` cache storing each layer at its widths."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from kvquant import QuantConfig
from kvquant.calibration import Calibration, CalibrationError
from kvquant.quant.allocation import allocate_bits, candidate_pairs, mean_bits


def _random_tables(gen: torch.Generator, n: int) -> tuple[list[dict[int, float]], list[dict[int, float]]]:
    """Per layer and side, errors that fall with the width (about 4x per bit, as quantization noise does)."""
    out = []
    for _ in range(2):
        tables = []
        for _ in range(n):
            base = float(torch.rand(1, generator=gen)) * 10 ** float(torch.randint(-2, 3, (1,), generator=gen))
            tables.append({b: base * 4.0 ** (2 - b) * (0.5 + float(torch.rand(1, generator=gen))) for b in (2, 3, 4)})
        out.append(tables)
    return out[0], out[1]


def _brute_force(kerr, verr, budget):
    best = None
    for picks in itertools.product(candidate_pairs(), repeat=len(kerr)):
        if sum(k + v for k, v in picks) > 2 * len(kerr) * budget + 1e-9:
            continue
        e = sum(kerr[i][k] + verr[i][v] for i, (k, v) in enumerate(picks))
        if best is None or e < best[0]:
            best = (e, picks)
    return best


@pytest.mark.parametrize("budget", [2.0, 2.5, 3.0, 3.2, 3.75, 4.0, 5.0])
def test_allocation_is_the_least_error_within_the_budget(seed, budget):
    kerr, verr = _random_tables(torch.Generator().manual_seed(seed), 4)
    alloc = allocate_bits(kerr, verr, budget)
    assert len(alloc) == 4 and mean_bits(alloc) <= budget + 1e-12
    err = sum(kerr[i][k] + verr[i][v] for i, (k, v) in enumerate(alloc))
    best, _ = _brute_force(kerr, verr, budget)
    assert err == pytest.approx(best, rel=1e-12)
    if budget >= 4:
        assert alloc == [(4, 4)] * 4
    if budget == 2.0:
        assert alloc == [(2, 2)] * 4


def test_more_sensitive_layers_get_more_bits(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 6
    sens = torch.rand(n, generator=gen) * 100 + 1  # a layer's error scales with its sensitivity
    shape = {b: 4.0 ** (2 - b) for b in (2, 3, 4)}
    kerr = [{b: float(s) * 3 * e for b, e in shape.items()} for s in sens]  # keys: 3x the values' error
    verr = [{b: float(s) * e for b, e in shape.items()} for s in sens]
    alloc = allocate_bits(kerr, verr, 3.0)
    assert mean_bits(alloc) <= 3.0
    total = [k + v for k, v in alloc]
    for i in range(n):
        for j in range(n):
            if sens[i] > sens[j]:
                assert total[i] >= total[j], (sens.tolist(), alloc)
    assert all(k >= v for k, v in alloc)  # keys, with the larger error, never get fewer bits than values
    assert len(set(alloc)) > 1  # the budget forces a choice: not every layer at one width


def test_bad_allocation_inputs():
    kerr, verr = _random_tables(torch.Generator().manual_seed(0), 3)
    with pytest.raises(ValueError, match="below the narrowest candidate"):
        allocate_bits(kerr, verr, 1.9)
    with pytest.raises(ValueError, match="below the narrowest candidate"):
        allocate_bits(kerr, verr, 2.5, candidates=[(3, 3), (4, 4)])
    with pytest.raises(ValueError, match="one key and one value error table per layer"):
        allocate_bits(kerr, verr[:2], 3.0)
    with pytest.raises(ValueError, match="no measured value error at 4 bits"):
        allocate_bits(kerr, [{2: 1.0, 3: 0.5}] * 3, 3.0, candidates=[(4, 4), (2, 2)])
    with pytest.raises(ValueError, match="positive number of bits"):
        allocate_bits(kerr, verr, float("nan"))
    assert set(allocate_bits(kerr, verr, 3.0, candidates=[(4, 2), (3, 3)])) <= {(4, 2), (3, 3)}


# ----------------------------------------------------------------------------------------------------
# a real model: stories260k from ../shared


@pytest.fixture(scope="module")
def real(request):
    from tests.conftest import SHARED

    path = SHARED / "models" / "stories260k"
    if not path.is_dir():
        pytest.skip(f"the tiny real model is not at {path} (set KVQUANT_SHARED to the shared folder)")
    from kvquant.models import load_model

    model, tok, _ = load_model(str(path))
    text = (SHARED / "data" / "tinystories" / "sample.txt").read_text()
    ids = torch.tensor([1] + tok(text)["input_ids"][:1023])
    return model, ids


def test_real_model_allocation_file_and_cache(real, tmp_path, seed):
    from kvquant.cache.hf_cache import KVQuantCache
    from kvquant.calibration.calibrate import calibrate
    from tests.hf_tiny import greedy_generate, padded_batch

    model, ids = real
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - 128, (4,), generator=g)
    seqs = torch.stack([ids[s:s + 128] for s in starts.tolist()])
    cal = calibrate(model, seqs, QuantConfig(), sensitivity="fisher", bit_budget=3.0, model_id="stories260k",
                    progress=False)
    L = model.config.num_hidden_layers
    assert len(cal.allocation) == L and cal.bit_budget == 3.0 and cal.allocation_mean_bits <= 3.0
    for lc in cal.layers:  # the measured errors fall with the width, on both sides
        for errs in (lc.key_errors, lc.value_errors):
            assert errs[2] > errs[3] > errs[4] > 0
    # the exact optimum of the measured errors (brute force over every (K, V) pair per layer)
    kerr, verr = [lc.key_errors for lc in cal.layers], [lc.value_errors for lc in cal.layers]
    best, _ = _brute_force(kerr, verr, 3.0)
    got = sum(kerr[i][k] + verr[i][v] for i, (k, v) in enumerate(cal.allocation))
    assert got == pytest.approx(best, rel=1e-12)
    # a layer made far more sensitive takes the widest codes; the budget still holds
    boosted = [dict(e) for e in kerr]
    hot = int(torch.randint(0, L, (1,), generator=g))
    boosted[hot] = {b: e * 1e6 for b, e in boosted[hot].items()}
    hot_alloc = allocate_bits(boosted, [{b: e * (1e6 if i == hot else 1) for b, e in t.items()}
                                        for i, t in enumerate(verr)], 3.0)
    assert hot_alloc[hot] == (4, 4) and mean_bits(hot_alloc) <= 3.0

    # the file round trip keeps the allocation, the budget and the errors
    path = cal.save(tmp_path / "cal.safetensors")
    loaded = Calibration.load(path)
    assert loaded.allocation == cal.allocation and loaded.bit_budget == 3.0
    assert [lc.key_errors for lc in loaded.layers] == kerr and [lc.value_errors for lc in loaded.layers] == verr
    side = json.loads(path.with_name(path.name + ".json").read_text())
    assert side["allocation"] == [list(p) for p in cal.allocation] and side["bit_budget"] == 3.0
    # another budget from the same file, no recalibration
    assert loaded.with_allocation(2.5).allocation_mean_bits <= 2.5

    # the cache stores each layer at its widths
    cache = KVQuantCache(model, QuantConfig(datatype="nuq-alloc", page_size=32), calibration=loaded)
    out = greedy_generate(model, *padded_batch(seed, model.config.vocab_size, S=60), cache)
    assert out.sequences.shape[1] == 66
    for i, layer in enumerate(cache.layers):
        kb, vb = loaded.allocation[i]
        assert (layer.qkeys.bits, layer.qvalues.bits) == (kb, vb)
        assert cache.layer_config(i).datatype == QuantConfig().with_widths(kb, vb).datatype
        assert torch.equal(layer.qkeys.codebook.levels.cpu(), loaded.layers[i].key_codebooks[kb].levels)
        assert torch.equal(layer.qvalues.codebook.levels.cpu(), loaded.layers[i].value_codebooks[vb].levels)
        for store, bits in ((layer.qkeys, kb), (layer.qvalues, vb)):
            slots = store.pages.n_pages * store.num_heads * store.config.page_size * store.head_dim
            assert 8 * store.memory_report()["codes"] / slots == bits

    # refusals that name the problem
    with pytest.raises(ValueError, match="needs a calibration with a bit allocation"):
        KVQuantCache(model, QuantConfig(datatype="nuq-alloc"), calibration=calibrate(
            model, seqs[:1], QuantConfig(), bits=(2, 4), progress=False))
    with pytest.raises(ValueError, match="takes its per-layer widths from a calibration"):
        KVQuantCache(model, QuantConfig(datatype="nuq-alloc"))
    meta = loaded.metadata()
    meta["allocation"][0] = [4, 5]
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"kvquant": json.dumps(meta)})
    with pytest.raises(CalibrationError, match=r"layer 0 is allocated 4-bit keys and 5-bit values but the file has "
                                               r"codebooks for \[2, 3, 4\] bits only"):
        Calibration.load(bad)
    meta["allocation"] = meta["allocation"][1:]
    save_file(tensors, str(bad), metadata={"kvquant": json.dumps(meta)})
    with pytest.raises(CalibrationError, match=f"for each of the {L} layers"):
        Calibration.load(bad)
    del meta["errors"], meta["allocation"]
    save_file(tensors, str(bad), metadata={"kvquant": json.dumps(meta)})
    with pytest.raises(CalibrationError, match="no measured quantization errors"):
        Calibration.load(bad).with_allocation(3.0)
