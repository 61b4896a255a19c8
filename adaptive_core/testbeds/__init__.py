"""Models with known answers: exact denoisers and reference ODE solutions for tests, bench and demo.

``make_testbed("gmm_digits", "flow")`` → a :class:`Testbed` named ``"gmm_digits-flow"``.
``make_testbed("mnist_unet", "ve")`` → the trained MNIST UNet (:class:`.trained.TrainedDenoiser`);
``make_testbed("photo_unet", "flow")`` → the unconditional UNet on photo patches (:class:`.trained.PhotoDenoiser`);
``make_testbed("digits_unet", "ve")`` → the class-conditional UNet on upsampled 8×8 digits
(:class:`.trained.DigitsDenoiser`); ``make_testbed("skimage_unet", "flow")`` → the unconditional UNet on patches of
scikit-image's sample images (:class:`.trained.SkimageDenoiser`); ``make_testbed("mpl_unet", "ve")`` → the
unconditional UNet on patches of matplotlib's sample images (:class:`.trained.MplDenoiser`).
Trained testbeds are listed in :data:`TRAINED_TESTBED_NAMES`, apart from :data:`TESTBED_NAMES`, and imported on
demand.  An analytic testbed's variant is named with its parameters after ``@``: ``make_testbed("gaussian@exponent=1.5",
"ve")`` is the Gaussian with spectrum exponent 1.5 (:func:`split_variant_name`).
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
TRAINED_TESTBED_NAMES = ("mnist_unet", "photo_unet", "digits_unet", "skimage_unet", "mpl_unet")
#: The trained testbeds that take class labels (and so classifier-free guidance).
CONDITIONAL_TESTBED_NAMES = ("mnist_unet", "digits_unet")


def split_variant_name(name: str) -> tuple[str, dict[str, float]]:
    """``"gaussian@exponent=1.5@shift=2"`` → ``("gaussian", {"exponent": 1.5, "shift": 2.0})``: an analytic testbed
    and the constructor parameters of its variant (none for a plain name).  Variants of other spectra and noise
    ranges are how a policy is taught more than the shipped testbeds (domain randomisation, Tobin et al. 2017).
    ValueError on an unknown testbed, a malformed part, a non-finite value or a variant of a trained testbed."""
    import math
    family, *parts = name.split("@")
    params: dict[str, float] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not eq or not key.isidentifier() or not math.isfinite(number):
            raise ValueError(f"testbed {name!r}: expected NAME@PARAM=NUMBER[@PARAM=NUMBER...], got part {part!r}")
        if key in params:
            raise ValueError(f"testbed {name!r}: parameter {key!r} given twice")
        params[key] = number
    if family not in TESTBED_NAMES + TRAINED_TESTBED_NAMES:
        raise ValueError(f"unknown testbed {name!r}: expected one of {TESTBED_NAMES + TRAINED_TESTBED_NAMES} "
                         "or an analytic variant NAME@PARAM=VALUE")
    if params and family in TRAINED_TESTBED_NAMES:
        raise ValueError(f"testbed {name!r}: only analytic testbeds {TESTBED_NAMES} take @PARAM=VALUE variants")
    return family, params


def make_testbed(name: str, model_type: str = "ve", **params) -> Testbed:
    """The testbed ``name`` (one of :data:`TESTBED_NAMES` or :data:`TRAINED_TESTBED_NAMES`, or an analytic variant
    ``NAME@PARAM=VALUE...``, :func:`split_variant_name`) in ``model_type`` ("ve" or "flow"), built with params.
    A variant's ``name`` attribute keeps its parameters (``gaussian@exponent=1.5-ve``)."""
    if name in TRAINED_TESTBED_NAMES:
        from .trained import TRAINED_FAMILIES
        return TRAINED_FAMILIES[name](model_type=model_type, **params)
    family, variant = split_variant_name(name)   # an analytic family here: a trained name returned above
    clash = sorted(set(variant) & set(params))
    if clash:
        raise ValueError(f"testbed {name!r}: {clash} given both in the name and as arguments")
    try:
        testbed = _TESTBEDS[family](model_type=model_type, **variant, **params)
    except TypeError as e:   # a parameter the family's constructor does not take
        raise ValueError(f"testbed {name!r}: {e}") from None
    if variant:
        testbed.name = f"{name}-{model_type}"
    return testbed


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
    "split_variant_name",
]
