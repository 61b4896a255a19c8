"""Benchmark harness: ADO vs peer samplers on the same model and noises (``python -m adaptive_core.bench``)."""
