"""Drop-in quantized KV cache for Hugging Face ``transformers`` models."""
