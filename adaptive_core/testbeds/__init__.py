"""Models with known answers: exact denoisers and reference ODE solutions for tests, bench and demo.

``make_testbed("gmm_digits", "flow")`` → a :class:`Testbed` named ``"gmm_digits-flow"``.
"""
from __future__ import annotations

from .analytic import AnalyticTestbed
from .base import Testbed
from .gaussian import PowerLawGaussian
from .gmm import DigitsGMM, GaussianMixture

_TESTBEDS = {"gaussian": PowerLawGaussian, "gmm_digits": DigitsGMM}

#: Names accepted by :func:`make_testbed`.
TESTBED_NAMES = tuple(_TESTBEDS)


def make_testbed(name: str, model_type: str = "ve", **params) -> Testbed:
    """The testbed ``name`` (one of :data:`TESTBED_NAMES`) in ``model_type`` ("ve" or "flow"), built with params."""
    if name not in _TESTBEDS:
        raise ValueError(f"unknown testbed {name!r}: expected one of {TESTBED_NAMES}")
    return _TESTBEDS[name](model_type=model_type, **params)


__all__ = ["AnalyticTestbed", "DigitsGMM", "GaussianMixture", "PowerLawGaussian", "TESTBED_NAMES", "Testbed",
           "make_testbed"]
