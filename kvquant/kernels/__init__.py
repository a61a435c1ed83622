"""GPU kernels (Triton) over the packed KV format, each with a pure-PyTorch reference.

* :func:`decode_attention` — one query token per sequence attending over a quantized
  :class:`~kvquant.quant.store.QuantizedKVCache` (keys + values) without materialising fp16 K/V.
* :func:`decode_attention_reference` — the same function the slow way (dequantize everything, then attend).
* :func:`quantize_append` — fused quantization of appended tokens straight into the packed pages and the
  sparse outlier store (what ``QuantizedKVCache`` uses when ``QuantConfig.backend`` resolves to triton).
* :func:`invert_rope_triton` — pre-RoPE keys from the model's post-RoPE ones in one launch, bit-identical to
  :func:`kvquant.cache.rope.invert_rope`.
"""

from kvquant.kernels.decode_attention import decode_attention, triton_available
from kvquant.kernels.quantize_append import quantize_append
from kvquant.kernels.reference import apply_rope, decode_attention_reference
from kvquant.kernels.unrope import invert_rope_triton

__all__ = ["apply_rope", "decode_attention", "decode_attention_reference", "invert_rope_triton", "quantize_append",
           "triton_available"]
