"""Quantization core: datatypes, codebooks, bit-packing, encoding, paged quantized storage."""
