"""Accuracy evaluation: perplexity through the quantized cache."""
