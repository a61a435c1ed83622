"""A calibration is refused by a model of the same shape with other weights, by the cache as by the command line."""

from __future__ import annotations

import pytest
import torch

from kvquant.cache.hf_cache import KVQuantCache
from kvquant.cache.identity import (
    FINGERPRINT_BITS,
    MATCH_FRACTION,
    check_calibration_model,
    fingerprint_agreement,
    model_fingerprint,
    sample_indices,
    split_model_id,
)
from kvquant.calibration import Calibration, CalibrationError
from kvquant.calibration.calibrate import calibrate
from kvquant.config import QuantConfig
from kvquant.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def calibrated() -> tuple[torch.nn.Module, Calibration]:
    model = tiny_llama(seed=0)
    seqs = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    return model, calibrate(model, seqs, QuantConfig(), bits=(3,), model_id="tiny-a", progress=False)


def test_fingerprint_is_stable_across_dtypes_and_differs_between_weights() -> None:
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    fa = model_fingerprint(a)
    assert len(fa) == FINGERPRINT_BITS // 4 and fa == model_fingerprint(tiny_llama(seed=0))
    assert fingerprint_agreement(fa, model_fingerprint(a.to(torch.float16))) >= MATCH_FRACTION
    assert fingerprint_agreement(fa, model_fingerprint(a.to(torch.bfloat16))) >= MATCH_FRACTION
    assert fingerprint_agreement(fa, model_fingerprint(b)) < MATCH_FRACTION


def test_calibration_records_name_and_fingerprint(calibrated, tmp_path) -> None:
    model, cal = calibrated
    assert split_model_id(cal.model_id) == ("tiny-a", model_fingerprint(model))
    cal.save(tmp_path / "cal.safetensors")
    assert Calibration.load(tmp_path / "cal.safetensors").model_id == cal.model_id


def test_cache_refuses_a_calibration_of_another_model_of_the_same_shape(calibrated) -> None:
    model, cal = calibrated
    other = tiny_llama(seed=1)
    with pytest.raises(CalibrationError, match="another model .tiny-a.*check_model=False"):
        KVQuantCache(other, QuantConfig(datatype="nuq3"), calibration=cal)
    KVQuantCache(other, QuantConfig(datatype="nuq3"), calibration=cal, check_model=False)  # the explicit opt-out
    KVQuantCache(model, QuantConfig(datatype="nuq3"), calibration=cal)
    KVQuantCache(tiny_llama(seed=0, dtype=torch.float16), QuantConfig(datatype="nuq3"), calibration=cal)


def test_names_decide_only_without_fingerprints(calibrated) -> None:
    model, cal = calibrated
    check_calibration_model(cal, model, name="a path to the same weights")  # the weights decide
    old = Calibration(cal.layers, "tiny-a", cal.outlier_fraction, cal.n_sink, cal.pre_rope, cal.num_kv_heads,
                      cal.head_dim)  # a file from before fingerprints
    check_calibration_model(old, tiny_llama(seed=1))
    check_calibration_model(old, model, name="tiny-a")
    with pytest.raises(CalibrationError, match="'tiny-a' != 'tiny-b'"):
        check_calibration_model(old, model, name="tiny-b")


def test_sample_places_stay_inside_large_tensors() -> None:
    """Float spacing loses integers past 2**24: a 49152 x 576 embedding (SmolLM2) must still be sampled inside."""
    for numel in (1, 7, 2**24 + 1, 49152 * 576, 128256 * 4096):
        idx = sample_indices(numel, 32)
        assert idx.dtype == torch.int64 and int(idx[0]) == 0 and int(idx[-1]) == numel - 1
        assert bool((idx[1:] >= idx[:-1]).all())
