"""GPU kernels (Triton) over the packed KV format, each with a pure-PyTorch reference; the ``@triton.jit`` bodies
are in :mod:`kvquant.kernels.jit`.

* :mod:`kvquant.kernels.decode_attention` — one query token per sequence attending over a quantized key/value
  :class:`~kvquant.quant.store.QuantizedKVCache` pair without materialising fp16 K/V
  (:func:`~kvquant.kernels.reference.decode_attention_reference` is the same function the slow way);
* :mod:`kvquant.kernels.encode` — the quantizing writers: keys token by token, values a page at a time;
* :mod:`kvquant.kernels.lut` — the byte-permute lookup that turns packed codes into levels;
* :mod:`kvquant.kernels.unrope` — pre-RoPE keys from the model's post-RoPE ones in one launch;
* :mod:`kvquant.kernels.ops` — the two backends as objects (``TorchOps``, ``TritonOps``) and the rule choosing one.
"""
