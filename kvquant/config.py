"""The one configuration object of kvquant: how a KV cache is quantized."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from kvquant.datatypes import parse_datatype

BACKENDS = ("auto", "torch", "triton")
"""Values of :attr:`QuantConfig.backend` (see :func:`kvquant.kernels.ops.resolve_ops`)."""


@dataclass(frozen=True)
class QuantConfig:
    """How keys and values are stored.

    Attributes:
        datatype: ``fp16`` (no quantization: the plumbing baseline), ``nuq2|nuq3|nuq4`` (non-uniform
            codebooks, heuristic or calibrated) or ``int2|int3|int4`` (uniform baseline at equal bits).
        outlier_fraction: fraction of values kept exactly in sparse storage (dense-and-sparse). Keys:
            per-channel thresholds at the ``f/2`` and ``1-f/2`` quantiles; values: per-token thresholds
            over all heads. ``0`` disables the sparse part (out-of-range values are clamped).
        n_sink: the first ``n_sink`` tokens of every sequence are kept exactly (attention sinks).
        residual_length: the most recent ``residual_length`` tokens of every sequence are kept exactly
            and quantized only when they leave the window (0 = quantize every token at once).
        pre_rope: quantize keys before the rotary embedding (KVQuant), re-rotating when read. Only
            meaningful for lossy datatypes: ``fp16`` stores keys as the model produced them.
        page_size: tokens per storage page (multiple of 32). Padding costs at most one partial page
            per sequence.
        block_nnz: allocation granularity (entries) of the sparse outlier stores.
        min_range_tokens: keys without calibrated (or explicit) ranges take their per-channel ranges from the
            tokens themselves, per sequence, once it has this many tokens past its sinks; until then its tokens
            (keys and values alike, so both stores keep one layout) are held exactly in the residual window, then
            the ranges are set from all of them and they are quantized. Estimating the ``f/2`` quantile from ``M``
            tokens leaves about ``f + 2/M`` of later tokens outside the range, so ``0`` (the default) means
            ``ceil(4 / outlier_fraction)`` (about ``1.5 f`` stored; 400 tokens at 1 %), or 64 without outliers.
            ``1`` sets the ranges from whatever the first append brings.
        backend: the kernels the cache runs, chosen once when it is built. ``"triton"``: the fused
            quantize-append kernel for appends, decode attention straight over the packed cache and the RoPE
            inversion in one launch (:mod:`kvquant.kernels.ops`); ``"torch"``: the PyTorch reference everywhere;
            ``"auto"``: triton when it imports, the tensors are on CUDA and nothing else stops it, else torch.
            Both write byte-identical storage.
    """

    datatype: str = "nuq3"
    outlier_fraction: float = 0.01
    n_sink: int = 1
    residual_length: int = 0
    pre_rope: bool = True
    page_size: int = 64
    block_nnz: int = 1024
    backend: str = "auto"
    min_range_tokens: int = 0

    def __post_init__(self) -> None:
        parse_datatype(self.datatype)
        if not (0.0 <= self.outlier_fraction < 0.5):
            raise ValueError(f"outlier_fraction must be in [0, 0.5), got {self.outlier_fraction}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.residual_length < 0:
            raise ValueError(f"residual_length must be >= 0, got {self.residual_length}")
        if self.page_size <= 0 or self.page_size % 32:
            raise ValueError(f"page_size must be a positive multiple of 32, got {self.page_size}")
        if self.block_nnz <= 0:
            raise ValueError(f"block_nnz must be positive, got {self.block_nnz}")
        if self.min_range_tokens < 0:
            raise ValueError(f"min_range_tokens must be >= 0 (0: automatic), got {self.min_range_tokens}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def bits(self) -> int:
        """Bits per dense code (16 for ``fp16``)."""
        return parse_datatype(self.datatype).bits

    @property
    def range_tokens(self) -> int:
        """Tokens past the sinks a sequence holds exactly before its key ranges are set from them (the resolved
        :attr:`min_range_tokens`)."""
        if self.min_range_tokens:
            return self.min_range_tokens
        return math.ceil(4.0 / self.outlier_fraction - 1e-9) if self.outlier_fraction > 0 else 64

    @property
    def is_quantized(self) -> bool:
        return parse_datatype(self.datatype).kind != "fp"

    def to_dict(self) -> dict:
        return asdict(self)
