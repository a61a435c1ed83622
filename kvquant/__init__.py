"""kvquant: non-uniform, calibrated, dense-and-sparse KV-cache quantization for batched LLM inference.

The names here are the library. Tools built on it live in their own packages: the ``kvquant`` command
(:mod:`kvquant.cli`), benchmarks (:mod:`kvquant.bench`), GPU energy measurement (:mod:`kvquant.energy`), reports
(:mod:`kvquant.report`), model and text resolution (:mod:`kvquant.models`, :mod:`kvquant.data`).
"""

from kvquant.attention import PrefillQuantizedAttention
from kvquant.config import QuantConfig
from kvquant.datatypes import DATATYPES, datatype_name, parse_datatype
from kvquant.kernels import ops as _ops  # noqa: F401  (provides the stores' write backends)
from kvquant.quant.calibration_file import Calibration
from kvquant.quant.codebook import (
    Codebook,
    compute_nuq_codebook,
    create_heuristic_codebook,
    create_uniform_codebook,
)
from kvquant.quant.packing import pack_bits, pack_units, unpack_bits, unpack_units
from kvquant.quant.quantizer import BatchedKVQuantizer
from kvquant.quant.store import QuantizedKVCache
from kvquant.sparse.blocked import BlockedCSCMatrix, BlockedCSRMatrix
from kvquant.version import __version__  # noqa: F401

_LAZY = {  # need the optional `transformers` dependency (pip install kvquant[hf])
    "KVQuantCache": "kvquant.cache.hf_cache",
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
    "KVQuantCache",
    "PrefillQuantizedAttention",
    "QuantConfig",
    "QuantizedKVCache",
    "calibrate",
    "compute_nuq_codebook",
    "create_heuristic_codebook",
    "create_uniform_codebook",
    "datatype_name",
    "pack_units",
    "pack_bits",
    "parse_datatype",
    "register_cache_implementation",
    "unpack_units",
    "unpack_bits",
]
