"""The public ``kvquant`` namespace is the library; energy profilers live in ``kvquant.energy``."""

import pytest


def test_public_api_importable_from_package():
    import kvquant

    for name in ("BatchedKVQuantizer", "QuantizedKVCache", "BlockedCSCMatrix", "BlockedCSRMatrix",
                 "PrefillQuantizedAttention", "create_heuristic_codebook", "compute_nuq_codebook",
                 "create_uniform_codebook", "Codebook", "KVQuantCache", "Calibration", "calibrate", "QuantConfig",
                 "register_cache_implementation", "DATATYPES", "parse_datatype", "pack_bits", "unpack_bits",
                 "pack_units", "unpack_units"):
        assert getattr(kvquant, name) is not None, name
        assert name in kvquant.__all__, name
    assert kvquant.__version__
    with pytest.raises(AttributeError):
        kvquant.does_not_exist  # noqa: B018


def test_energy_classes_live_in_kvquant_energy():
    import kvquant
    import kvquant.energy

    for name in ("EnergyMonitor", "DetailedEnergyProfiler", "EnergyMeasurement"):
        assert getattr(kvquant.energy, name) is not None
        assert name not in kvquant.__all__
        with pytest.raises(AttributeError):
            getattr(kvquant, name)
