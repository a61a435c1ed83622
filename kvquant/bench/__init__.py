"""Benchmarks: round-trip error, kernels, end-to-end generation (``kvquant bench ...``)."""
