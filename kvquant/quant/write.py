"""The PyTorch reference write of a store: quantized tokens into the packed pages and the sparse outliers.

``TorchOps.quantize_append`` (:mod:`kvquant.kernels.ops`) calls :func:`write_tokens`; the fused Triton kernel
(:mod:`kvquant.kernels.quantize_append`) writes byte-identical storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvquant.quant.encode import encode_keys, encode_values
from kvquant.quant.packing import pack_bitplanes, unpack_bitplanes

if TYPE_CHECKING:
    from kvquant.quant.store import QuantizedKVCache


def run_positions(store: QuantizedKVCache, counts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq, pos)`` of ``n`` tokens written as runs: ``counts[b]`` tokens of sequence ``b`` at positions
    ``q_len[b], q_len[b] + 1, ...``, sequences in order."""
    counts = counts.to(store.device, torch.int64)
    seq = torch.arange(counts.numel(), device=store.device).repeat_interleave(counts, output_size=n)
    first = torch.cumsum(counts, 0) - counts
    pos = store.q_len[seq] + torch.arange(n, device=store.device) - first[seq]
    return seq, pos


def write_tokens(store: QuantizedKVCache, seq: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor) -> None:
    """Store ``tokens [N, H, D]`` as quantized token ``pos[i]`` of sequence ``seq[i]`` (pages already reserved).

    Encodes them (:mod:`kvquant.quant.encode`), read-modify-writes the bit-planes of the pages touched and appends
    the outliers to the sparse matrix. Pages with an id >= ``store.fresh_from`` hold nothing yet (all zero): they
    are not read back.
    """
    fresh_from = store.fresh_from
    page, off = store.pages.locate(seq, pos)
    pools = store.pages.pools
    if not store.quantized:
        pools["raw"][page, :, off] = tokens
        return
    if store.kind == "key":
        enc = encode_keys(tokens, store.channel_scale[seq], store.channel_zero[seq], store.codebook,
                          store.keep_outliers)
    else:
        enc = encode_values(tokens, store.codebook, store.config.outlier_fraction, pools["scale"].dtype)
        pools["scale"][page, :, off] = enc.scale
        pools["zero"][page, :, off] = enc.zero
    # Read-modify-write of the pages touched: fresh pages start from zero codes.
    touched, inv = torch.unique(page, return_inverse=True)
    T = store.config.page_size
    buf = torch.zeros(touched.numel(), store.num_heads, store.head_dim, T, dtype=torch.uint8, device=store.device)
    old = touched < fresh_from
    if bool(old.any()):
        buf[old] = unpack_bitplanes(pools["planes"][touched[old]], store.bits)
    buf[inv, :, :, off] = enc.codes
    pools["planes"][touched] = pack_bitplanes(buf, store.bits)
    if store.keep_outliers:
        n = tokens.shape[0]
        store.outliers.append_dense(page * T + off, tokens.reshape(n, -1), enc.outliers.reshape(n, -1))
