"""The one configuration object of kvquant: how a KV cache is quantized."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from kvquant.datatypes import DataType, datatype_name, parse_datatype

BACKENDS = ("auto", "torch", "triton")
"""Values of :attr:`QuantConfig.backend` (see :func:`kvquant.kernels.ops.resolve_ops`)."""

ROTATIONS = ("none", "hadamard", "random")
"""Values of :attr:`QuantConfig.rotation` (the matrices: :func:`kvquant.quant.rotation.rotation_matrix`)."""


@dataclass(frozen=True)
class QuantConfig:
    """How keys and values are stored.

    Attributes:
        datatype: ``fp16`` (no quantization: the plumbing baseline), ``nuq2|nuq3|nuq4`` (non-uniform
            codebooks, heuristic or calibrated) or ``int2|int3|int4`` (uniform baseline at equal bits), keys and
            values at the same width; ``k<K>v<V>`` (``k4v2``: NUQ, ``K``-bit keys, ``V``-bit values) or
            ``int-k<K>v<V>`` (uniform) for different widths; ``nuq-alloc``: NUQ with per-layer widths from the
            calibration's bit allocation (a :class:`~kvquant.cache.hf_cache.KVQuantCache` gives each layer its
            :meth:`with_widths` config). See :mod:`kvquant.datatypes`.
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
        rotation: an orthogonal rotation of every head's channels before quantization (:mod:`kvquant.quant.rotation`):
            ``"none"``, ``"hadamard"`` (randomized Walsh–Hadamard, head size a power of two) or ``"random"`` (random
            orthogonal). Keys (pre-RoPE with ``pre_rope``) and values are stored as ``x R`` (codebooks, key ranges and
            outlier thresholds all in the rotated basis: a calibration must be fitted with the same rotation) and read
            back as ``x R^T``. It spreads outlier channels over all channels. The Triton decode kernel does not read
            rotated caches (the torch path runs). Only meaningful for lossy datatypes.
        rotation_seed: seed of the rotation's random signs (``hadamard``) or Gaussian matrix (``random``).
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
    rotation: str = "none"
    rotation_seed: int = 0

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
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")

    @property
    def dtype_info(self) -> DataType:
        """The parsed :attr:`datatype`."""
        return parse_datatype(self.datatype)

    @property
    def bits(self) -> int:
        """Bits per dense code when keys and values share one width (16 for ``fp16``); a ``ValueError`` for
        datatypes with different key and value widths (``k4v2``: use :attr:`key_bits` / :attr:`value_bits`) or
        per-layer widths (``nuq-alloc``)."""
        return self.dtype_info.bits

    @property
    def key_bits(self) -> int:
        """Bits per dense key code (16 for ``fp16``; a ``ValueError`` for ``nuq-alloc``)."""
        return self.bits_for("key")

    @property
    def value_bits(self) -> int:
        """Bits per dense value code (16 for ``fp16``; a ``ValueError`` for ``nuq-alloc``)."""
        return self.bits_for("value")

    @property
    def mean_bits(self) -> float:
        """Average dense code width of a key and a value element, what a bit budget counts."""
        return self.dtype_info.mean_bits

    def bits_for(self, kind: str) -> int:
        """Bits per dense code of the ``"key"`` or ``"value"`` side."""
        dt = self.dtype_info
        if kind not in ("key", "value"):
            raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
        bits = dt.key_bits if kind == "key" else dt.value_bits
        if bits is None:
            raise ValueError(f"datatype {self.datatype} has per-layer widths chosen by the calibration's bit "
                             "allocation: build the cache with KVQuantCache and a calibration that holds one")
        return bits

    def side_datatype(self, kind: str) -> str:
        """The single-width datatype the ``"key"`` or ``"value"`` side is stored in (``k4v2``: ``nuq4`` keys,
        ``nuq2`` values)."""
        self.bits_for(kind)  # the clear error for per-layer widths
        return self.dtype_info.side(kind)

    @property
    def per_layer(self) -> bool:
        """Whether the widths are chosen per layer by a calibration (``nuq-alloc``)."""
        return self.dtype_info.per_layer

    def with_widths(self, key_bits: int, value_bits: int) -> QuantConfig:
        """This config with keys at ``key_bits`` and values at ``value_bits`` (same kind of codes; ``nuq-alloc``
        becomes NUQ): what one layer of a per-layer allocation runs with."""
        dt = self.dtype_info
        if dt.kind == "fp":
            raise ValueError("datatype fp16 has no code widths to set")
        return replace(self, datatype=datatype_name(dt.kind, key_bits, value_bits))

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

    @property
    def rotated(self) -> bool:
        """Whether stored tokens are rotated (:attr:`rotation` set and a lossy datatype)."""
        return self.rotation != "none" and self.is_quantized

    def to_dict(self) -> dict:
        return asdict(self)
