"""kvquant: non-uniform, calibrated, dense-and-sparse KV-cache quantization for batched LLM inference."""

from kvquant.attention import PrefillQuantizedAttention
from kvquant.config import QuantConfig
from kvquant.energy import DetailedEnergyProfiler, EnergyMeasurement, EnergyMonitor
from kvquant.quant.codebook import (
    Codebook,
    compute_nuq_codebook,
    create_heuristic_codebook,
    create_uniform_codebook,
)
from kvquant.quant.datatypes import DATATYPES, parse_datatype
from kvquant.quant.packing import pack_bitplanes, pack_bits, unpack_bitplanes, unpack_bits
from kvquant.quant.quantizer import BatchedKVQuantizer
from kvquant.quant.store import QuantizedKVCache
from kvquant.sparse.blocked import BlockedCSCMatrix, BlockedCSRMatrix

__version__ = "0.1.0"

_LAZY = {  # need the optional `transformers` dependency (pip install kvquant[hf])
    "KVQuantCache": "kvquant.cache.hf_cache",
    "Calibration": "kvquant.calibration.format",
    "calibrate": "kvquant.calibration.calibrate",
    "register_cache_implementation": "kvquant.cache.register",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvquant' has no attribute {name!r}")

__all__ = [
    "DATATYPES",
    "BatchedKVQuantizer",
    "BlockedCSCMatrix",
    "BlockedCSRMatrix",
    "Calibration",
    "Codebook",
    "DetailedEnergyProfiler",
    "EnergyMeasurement",
    "EnergyMonitor",
    "KVQuantCache",
    "PrefillQuantizedAttention",
    "QuantConfig",
    "QuantizedKVCache",
    "calibrate",
    "compute_nuq_codebook",
    "create_heuristic_codebook",
    "create_uniform_codebook",
    "pack_bitplanes",
    "pack_bits",
    "register_cache_implementation",
    "parse_datatype",
    "unpack_bitplanes",
    "unpack_bits",
]
