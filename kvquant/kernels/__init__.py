"""Kernels over the packed KV format: Triton kernels and their PyTorch references, behind one ops object.

* :mod:`kvquant.kernels.ops` — ``TorchOps`` / ``TritonOps`` and :func:`~kvquant.kernels.ops.resolve_ops`, the one
  rule that picks the backend (what a cache resolves once and hands to its stores and layers).
* :mod:`kvquant.kernels.decode_attention` — one query token per sequence attending over a quantized
  :class:`~kvquant.quant.store.QuantizedKVCache` pair without materialising fp16 K/V.
* :mod:`kvquant.kernels.quantize_append` — fused quantization of appended tokens straight into the packed pages and
  the sparse outlier store.
* :mod:`kvquant.kernels.unrope` — pre-RoPE keys from the model's post-RoPE ones in one launch.
* :mod:`kvquant.kernels.reference` — the same functions the slow way (dequantize everything, then attend).
* :mod:`kvquant.kernels.jit` — the ``@triton.jit`` bodies the modules above launch.
"""
