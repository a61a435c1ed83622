"""``BatchedKVQuantizer``: quantize the keys and values of a whole padded batch in one vectorised pass."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from kvquant.config import QuantConfig
from kvquant.quant.codebook import Codebook, codebook_for
from kvquant.quant.encode import range_to_scale_zero
from kvquant.quant.stats import channel_ranges
from kvquant.quant.store import QuantizedKVCache
from kvquant.quant.validate import check_kv, check_mask


class BatchedKVQuantizer:
    """Quantizes prefill K/V of variable-length prompts (left- or right-padded) without a loop over the
    batch or the sequence.

    Args:
        config: a :class:`QuantConfig`; keyword overrides (``datatype="nuq4"``, …) are applied on top.
        key_codebook, value_codebook: calibrated NUQ codebooks (default: the heuristic one).
        key_ranges: calibrated per-channel key ranges ``(lo, hi)``, each ``[H, D]``; default: computed
            from each prompt (padding and sink tokens excluded).
        ops: the kernels the stores write with (:mod:`kvquant.kernels.ops`; what
            :class:`~kvquant.cache.hf_cache.KVQuantCache` passes); default: resolved by each store from
            ``config.backend`` and its device.
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        *,
        key_codebook: Codebook | None = None,
        value_codebook: Codebook | None = None,
        key_ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
        ops: Any = None,
        **overrides,
    ) -> None:
        config = config or QuantConfig()
        self.config = replace(config, **overrides) if overrides else config
        self.key_codebook = codebook_for(self.config.datatype, key_codebook)
        self.value_codebook = codebook_for(self.config.datatype, value_codebook)
        self.key_ranges = key_ranges
        self.ops = ops

    def _key_scale_zero(
        self, keys: torch.Tensor, mask: torch.Tensor, ranges: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, _, D = keys.shape
        if ranges is not None:
            lo, hi = (torch.as_tensor(r, device=keys.device, dtype=torch.float32) for r in ranges)
            if lo.shape[-2:] != (H, D) or hi.shape != lo.shape:
                raise ValueError(f"key ranges must be [H, D] = [{H}, {D}] (or [B, H, D]), got "
                                 f"{tuple(lo.shape)} and {tuple(hi.shape)}")
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()) or (hi < lo).any():
                raise ValueError("key ranges must be finite with hi >= lo")
            return range_to_scale_zero(lo, hi)
        rank = mask.long().cumsum(1) - 1
        counted = mask & (rank >= self.config.n_sink)  # sinks are stored exactly: keep them out
        counted = torch.where(counted.any(1, keepdim=True), counted, mask)
        lo, hi = channel_ranges(keys, counted, self.config.outlier_fraction)
        return range_to_scale_zero(lo, hi)

    def quantize_keys(
        self,
        keys: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantizedKVCache:
        """Quantize keys per channel.

        Args:
            keys: ``[B, H, S, D]`` (pre-RoPE for KVQuant's accuracy; the quantizer does not care).
            attention_mask: ``[B, S]``, 1 = real token; ``None`` = no padding.
            key_ranges: per-channel ``(lo, hi)`` overriding the calibrated/prompt ranges.

        Returns:
            A :class:`QuantizedKVCache` of kind ``"key"`` holding the real tokens of each row.
        """
        check_kv(keys, "keys")
        mask = check_mask(attention_mask, keys.shape[0], keys.shape[2], keys.device)
        B, H, _, D = keys.shape
        scale = zero = None
        if self.config.is_quantized:
            scale, zero = self._key_scale_zero(keys, mask, key_ranges or self.key_ranges)
        cache = QuantizedKVCache("key", self.config, B, H, D, keys.dtype, keys.device, self.key_codebook,
                                 scale, zero, ops=self.ops)
        cache.append(keys, mask)
        return cache

    def quantize_values(self, values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> QuantizedKVCache:
        """Quantize values per token (``values [B, H, S, D]``, ``attention_mask [B, S]``)."""
        check_kv(values, "values")
        mask = check_mask(attention_mask, values.shape[0], values.shape[2], values.device)
        B, H, _, D = values.shape
        cache = QuantizedKVCache("value", self.config, B, H, D, values.dtype, values.device, self.value_codebook,
                                 ops=self.ops)
        cache.append(values, mask)
        return cache
