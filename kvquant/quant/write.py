"""The PyTorch reference writes of a store (``TorchOps``, :mod:`kvquant.kernels.ops`).

* :func:`write_key_tokens`: keys token by token (or the raw tokens of an ``fp16`` store): codes into the token's
  units, outliers into their CSC slots;
* :func:`write_value_pages`: whole pages of values: codes, per-token scales and the page's CSR outlier block;
* :func:`seal_open_pages`: a static decode step's seal (the pages this step fills), read on the host here.

The Triton writers (:mod:`kvquant.kernels.encode`) store the same bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvquant.quant.encode import encode_keys, encode_value_pages
from kvquant.quant.packing import pack_units, unpack_units

if TYPE_CHECKING:
    from kvquant.quant.store import QuantizedKVCache


def write_key_tokens(store: QuantizedKVCache, seq: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor) -> None:
    """Store ``tokens [N, H, D]`` as quantized token ``pos[i]`` of sequence ``seq[i]`` (pages reserved): keys, or
    the raw tokens of an ``fp16`` store."""
    page, off = store.pages.locate(seq, pos)
    pools = store.pages.pools
    if not store.quantized:
        pools["raw"][page, :, off] = tokens
        return
    enc = encode_keys(tokens, store.channel_scale[seq], store.channel_zero[seq], store.codebook, store.keep_outliers)
    store_codes(store, page, off, enc.codes)
    if store.keep_outliers:
        T = store.config.page_size
        n = tokens.shape[0]
        store.outliers.append_dense(page * T + off, tokens.reshape(n, -1), enc.outliers.reshape(n, -1))


def store_codes(store: QuantizedKVCache, page: torch.Tensor, off: torch.Tensor, codes: torch.Tensor) -> None:
    """Write ``codes [N, H, D]`` of token ``off[i]`` of page ``page[i]`` into their units."""
    T, D, H = store.config.page_size, store.head_dim, store.num_heads
    pool = store.pages.pools["codes"]
    if D % 32 == 0:  # a token owns its units
        nu = D // 32
        units = off[:, None] * nu + torch.arange(nu, device=store.device)  # [N, nu]
        pool[page[:, None], :, :, units] = pack_units(codes, store.bits).permute(0, 3, 1, 2)
        return
    # units shared by 32 // D tokens: read-modify-write of the touched pages
    touched, inv = torch.unique(page, return_inverse=True)
    flat = unpack_units(pool[touched], store.bits).reshape(-1, H, T, D)
    flat[inv, :, off] = codes
    pool[touched] = pack_units(flat.reshape(-1, H, T * D), store.bits)


def write_value_pages(store: QuantizedKVCache, page: torch.Tensor, page_tokens: torch.Tensor) -> None:
    """Quantize ``page_tokens [n, H, T, D]`` into pages ``page [n]``: codes, per-token scales, outlier blocks."""
    n, H, T, D = page_tokens.shape
    pools = store.pages.pools
    enc = encode_value_pages(page_tokens, store.codebook, store.config.outlier_fraction)
    pools["codes"][page] = pack_units(enc.codes.reshape(n, H, T * D), store.bits)
    pools["scale"][page] = enc.scales.scale_code
    pools["zero"][page] = enc.scales.zero_code
    pools["vref"][page] = enc.scales.ref
    if store.keep_outliers:
        store.outliers.write_blocks(page, page_tokens, enc.outliers)


def seal_open_pages(store: QuantizedKVCache) -> None:
    """A static decode step's seal, read on the host (the reference of the Triton launch): each sequence whose open
    page this step fills (``(q_len + 1) % T == 0``, before the step's increment) has it quantized."""
    T = store.config.page_size
    full = [i for i, q in enumerate(store.q_len.tolist()) if (q + 1) % T == 0]
    if full:
        idx = torch.tensor(full, device=store.device)
        page = store.pages.table[idx, store.q_len[idx] // T].long()
        write_value_pages(store, page, store.open[idx])
