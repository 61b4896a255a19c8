"""Adaptive Diffusion Optimizer (ADO): an adaptive-step sampler for diffusion and flow models.

The public entry point is :func:`sample_adaptive` (k-diffusion signature); :class:`Trace` records what a
run did and :func:`replay_sigmas` turns a trace into a σ grid for any fixed-step sampler.
"""
from .sampler import sample_adaptive
from .trace import Trace, replay_sigmas

__all__ = ["sample_adaptive", "Trace", "replay_sigmas"]
__version__ = "0.1.0"
