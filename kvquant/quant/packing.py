"""Bit-packing of 2/3/4-bit codes into int32 *units* of 32 codes.

A unit's codes ``c[0..31]`` take exactly ``bits`` int32 words (no bit wasted for any width), arranged so that
the decode kernels turn them into 16-bit levels with a byte-permute lookup table (PTX ``prmt``): the codes
are grouped by 8 (group ``g`` = ``c[8g .. 8g+7]``), and each group becomes one *selector* word whose nibble
``i`` is ``c[8g+i]``:

* 2 bits: ``W0`` holds groups 0 and 1 (nibble ``i``: bits 0-1 = ``c[i]``, bits 2-3 = ``c[8+i]``), ``W1`` groups
  2 and 3; selector ``g`` is ``(W[g // 2] >> 2 * (g % 2)) & 0x33333333``.
* 3 bits: ``W0``, ``W1`` as for 2 bits with the low two bits of each code; ``W2`` holds the third bit of
  ``c[8g+i]`` at bit ``4i + g``; selector ``g`` adds ``(W2 << (2 - g)) & 0x44444444``.
* 4 bits: ``Wg`` is group ``g``'s selector word (code ``c[8g+i]`` at nibble ``i``).

Codes are packed along the last axis: ``[..., n]`` (``n`` a multiple of 32) becomes ``[..., bits, n // 32]``,
word ``j`` of every unit in one contiguous row (coalesced loads of one word of many units).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; expected one of {SUPPORTED_BITS}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in ``[0, 2**32)`` -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_units(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along the last axis.

    Args:
        codes: ``[..., n]`` integer codes in ``[0, 2**bits)``, ``n`` a multiple of 32.

    Returns:
        ``[..., bits, n // 32]`` int32.
    """
    _check_bits(bits)
    n = codes.shape[-1]
    if n % 32:
        raise ValueError(f"last axis must be a multiple of 32 to pack, got {n}")
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], n // 32, 4, 8)  # [..., U, group, i]
    nib = torch.arange(8, device=codes.device) * 4
    if bits == 4:
        words = (c << nib).sum(-1)  # [..., U, 4]
    else:
        low = c & 3
        words = ((low[..., 0::2, :] << nib) + (low[..., 1::2, :] << (nib + 2))).sum(-1)  # [..., U, 2]
        if bits == 3:
            g = torch.arange(4, device=codes.device)[:, None]
            high = (((c >> 2) & 1) << (nib + g)).sum((-1, -2))  # [..., U]
            words = torch.cat([words, high[..., None]], -1)
    return _to_int32(words).movedim(-1, -2).contiguous()


def unpack_units(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_units`: ``[..., bits, U]`` int32 -> ``[..., 32 * U]`` uint8."""
    _check_bits(bits)
    if words.shape[-2] != bits:
        raise ValueError(f"expected {bits} words per unit in axis -2, got {words.shape[-2]}")
    w = (words.to(torch.int64) & 0xFFFFFFFF).movedim(-2, -1)  # [..., U, bits]
    nib = torch.arange(8, device=words.device) * 4
    if bits == 4:
        c = (w[..., :, None] >> nib) & 15  # [..., U, 4, 8]
    else:
        g = torch.arange(4, device=words.device)
        c = (w[..., g // 2, None] >> (nib[None, :] + 2 * (g % 2)[:, None])) & 3
        if bits == 3:
            c = c | (((w[..., 2:3, None] >> (nib[None, :] + g[:, None])) & 1) << 2)
    return c.reshape(*words.shape[:-2], 32 * words.shape[-1]).to(torch.uint8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes of any length along the last axis (zero-padded to a multiple of 32), checking their range:
    ``[..., N]`` -> ``[..., bits, ceil(N / 32)]`` int32 (see :func:`pack_units`)."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(codes.min())}, {int(codes.max())}]")
    pad = (-codes.shape[-1]) % 32
    if pad:
        codes = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    return pack_units(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[..., bits, U]`` -> ``[..., length]`` uint8."""
    return unpack_units(packed, bits)[..., :length]


def lut_words(levels: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The byte tables a ``prmt`` lookup reads: ``levels [2**bits]`` rounded to the 16-bit ``dtype`` of a kernel's
    dot operands -> ``[8]`` int32: low bytes of levels 0-3, 4-7, 8-11, 12-15, then their high bytes (unused entries
    zero)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"lookup tables hold float16 or bfloat16 levels, not {dtype}")
    bits16 = levels.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    b = torch.zeros(16, dtype=torch.int64, device=levels.device)
    b[: bits16.numel()] = bits16
    lo, hi = (b & 0xFF).reshape(4, 4), (b >> 8).reshape(4, 4)
    shift = torch.arange(4, device=levels.device) * 8
    words = torch.cat([(lo << shift).sum(-1), (hi << shift).sum(-1)])
    return _to_int32(words)
