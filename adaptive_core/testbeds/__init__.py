"""Models with known answers: exact denoisers and reference ODE solutions for tests, bench and demo.

``make_testbed("gmm_digits", "flow")`` → a :class:`Testbed` named ``"gmm_digits-flow"``.
``make_testbed("mnist_unet", "ve")`` → the trained MNIST UNet (:class:`.trained.TrainedDenoiser`);
``make_testbed("photo_unet", "flow")`` → the unconditional UNet on photo patches (:class:`.trained.PhotoDenoiser`);
``make_testbed("digits_unet", "ve")`` → the class-conditional UNet on upsampled 8×8 digits
(:class:`.trained.DigitsDenoiser`).
Trained testbeds are listed in :data:`TRAINED_TESTBED_NAMES`, apart from :data:`TESTBED_NAMES`, and imported on
demand.
"""
from __future__ import annotations

from .analytic import AnalyticTestbed
from .base import Testbed
from .gaussian import PowerLawGaussian
from .gmm import DigitsGMM, GaussianMixture

_TESTBEDS = {"gaussian": PowerLawGaussian, "gmm_digits": DigitsGMM}

#: Names of the exact (analytic) testbeds accepted by :func:`make_testbed`; the benchmark runs these.
TESTBED_NAMES = tuple(_TESTBEDS)
#: Names of the trained testbeds (networks with a fine-solve reference), also accepted by :func:`make_testbed`.
TRAINED_TESTBED_NAMES = ("mnist_unet", "photo_unet", "digits_unet")
#: The trained testbeds that take class labels (and so classifier-free guidance).
CONDITIONAL_TESTBED_NAMES = ("mnist_unet", "digits_unet")


def make_testbed(name: str, model_type: str = "ve", **params) -> Testbed:
    """The testbed ``name`` (one of :data:`TESTBED_NAMES` or :data:`TRAINED_TESTBED_NAMES`) in ``model_type``
    ("ve" or "flow"), built with params."""
    if name in TRAINED_TESTBED_NAMES:
        from .trained import TRAINED_FAMILIES
        return TRAINED_FAMILIES[name](model_type=model_type, **params)
    if name not in _TESTBEDS:
        raise ValueError(f"unknown testbed {name!r}: expected one of {TESTBED_NAMES + TRAINED_TESTBED_NAMES}")
    return _TESTBEDS[name](model_type=model_type, **params)


__all__ = [
    "CONDITIONAL_TESTBED_NAMES",
    "TESTBED_NAMES",
    "TRAINED_TESTBED_NAMES",
    "AnalyticTestbed",
    "DigitsGMM",
    "GaussianMixture",
    "PowerLawGaussian",
    "Testbed",
    "make_testbed",
]
