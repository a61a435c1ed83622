"""GPU kernels (Triton) over the packed KV format, each with a pure-PyTorch reference.

* :func:`decode_attention` — one query token per sequence attending over a quantized
  :class:`~kvquant.quant.store.QuantizedKVCache` (keys + values) without materialising fp16 K/V.
* :func:`decode_attention_reference` — the same function the slow way (dequantize everything, then attend).
"""

from kvquant.kernels.decode_attention import decode_attention, triton_available
from kvquant.kernels.reference import apply_rope, decode_attention_reference

__all__ = ["apply_rope", "decode_attention", "decode_attention_reference", "triton_available"]
