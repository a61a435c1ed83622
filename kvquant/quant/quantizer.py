"""``BatchedKVQuantizer``: quantize the keys and values of a whole padded batch in one vectorised pass."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from kvquant.config import QuantConfig
from kvquant.quant.codebook import Codebook, codebook_for
from kvquant.quant.encode import range_to_scale_zero
from kvquant.quant.store import QuantizedKVCache
from kvquant.quant.validate import check_kv, check_mask


class BatchedKVQuantizer:
    """Quantizes prefill K/V of variable-length prompts (left- or right-padded) without a loop over the
    batch or the sequence.

    Args:
        config: a :class:`QuantConfig`; keyword overrides (``datatype="nuq4"``, …) are applied on top.
        key_codebook, value_codebook: calibrated NUQ codebooks, each at its side's width
            (``config.key_bits`` / ``config.value_bits``; default: the heuristic one).
        key_ranges: calibrated per-channel key ranges ``(lo, hi)``, each ``[H, D]``; default: computed
            from each sequence's own tokens (padding and sink tokens excluded) once it has
            ``config.range_tokens`` of them, its tokens held exactly until then (see
            :attr:`~kvquant.config.QuantConfig.min_range_tokens`).
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
        # each side at its own width (k4v2: 4-bit key codes, 2-bit value codes)
        self.key_codebook = codebook_for(self.config.side_datatype("key"), key_codebook)
        self.value_codebook = codebook_for(self.config.side_datatype("value"), value_codebook)
        self.key_ranges = key_ranges
        self.ops = ops

    def hold_tokens(self, key_ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
        """Tokens past the sinks a sequence holds exactly before it is quantized: ``config.range_tokens`` when the
        keys take their ranges from the tokens (no ``key_ranges`` here or in the quantizer), else 0. The key and
        value stores of one layer take the same number (the decode kernel reads both with one layout)."""
        if not self.config.is_quantized or (key_ranges if key_ranges is not None else self.key_ranges) is not None:
            return 0
        return self.config.range_tokens

    @staticmethod
    def _key_scale_zero(keys: torch.Tensor, ranges: tuple[torch.Tensor, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        _, H, _, D = keys.shape
        lo, hi = (torch.as_tensor(r, device=keys.device, dtype=torch.float32) for r in ranges)
        if lo.shape[-2:] != (H, D) or hi.shape != lo.shape:
            raise ValueError(f"key ranges must be [H, D] = [{H}, {D}] (or [B, H, D]), got "
                             f"{tuple(lo.shape)} and {tuple(hi.shape)}")
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()) or (hi < lo).any():
            raise ValueError("key ranges must be finite with hi >= lo")
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
            A :class:`QuantizedKVCache` of kind ``"key"`` holding the real tokens of each row. Without ranges, a
            row with fewer than ``config.range_tokens`` tokens past its sinks holds them exactly until it has them
            (:meth:`hold_tokens`); a longer one takes the ranges from all of them at once.
        """
        # (the append refuses NaN/Inf and all-padding rows in the same device read as its other checks)
        check_kv(keys, "keys", finite=False)
        mask = check_mask(attention_mask, keys.shape[0], keys.shape[2], keys.device, allow_empty_rows=True)
        B, H, _, D = keys.shape
        scale = zero = None
        ranges = key_ranges if key_ranges is not None else self.key_ranges
        if self.config.is_quantized and ranges is not None:
            scale, zero = self._key_scale_zero(keys, ranges)
        cache = QuantizedKVCache("key", self.config, B, H, D, keys.dtype, keys.device, self.key_codebook,
                                 scale, zero, ops=self.ops, hold_tokens=self.hold_tokens(key_ranges))
        cache.append(keys, mask, every_row=True)
        return cache

    def quantize_values(self, values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        hold_tokens: int | None = None) -> QuantizedKVCache:
        """Quantize values per token (``values [B, H, S, D]``, ``attention_mask [B, S]``).

        ``hold_tokens``: the exact hold of the keys they pair with (``keys.hold_tokens``; default: that of keys
        quantized with this quantizer's own ranges, :meth:`hold_tokens`)."""
        check_kv(values, "values", finite=False)
        mask = check_mask(attention_mask, values.shape[0], values.shape[2], values.device, allow_empty_rows=True)
        B, H, _, D = values.shape
        hold = self.hold_tokens() if hold_tokens is None else hold_tokens
        cache = QuantizedKVCache("value", self.config, B, H, D, values.dtype, values.device, self.value_codebook,
                                 ops=self.ops, hold_tokens=hold)
        cache.append(values, mask, every_row=True)
        return cache
