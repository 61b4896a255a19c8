"""Offline tuning: training the learned parts of ADO (``python -m adaptive_core.tune <command>``).

Not imported at run time: the sampler reads only the exported ONNX files and JSON manifests of ``policies/``.
"""
