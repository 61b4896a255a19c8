"""Test-only ComfyUI nodes for ADO's server tests: a tiny model built in code, conditioning without a text
encoder, and an output node that ends a prompt on a LATENT.  Never shipped to users (lives under tests/)."""
from __future__ import annotations

import torch

from .tiny_model import KINDS, build


class ADOTestTinyModel:
    """MODEL: the tiny in-code denoiser (EPS, V_PREDICTION or FLOW)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (list(KINDS), {"default": "eps"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing/ADO"

    def load(self, kind):
        return (build(kind),)


class ADOTestConditioning:
    """CONDITIONING whose context is a constant tensor (the tiny model reads its mean)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing/ADO"

    def encode(self, value):
        return ([[torch.full((1, 3, 16), float(value)), {}]],)


class ADOTestLatentSink:
    """Output node: ends a prompt on a LATENT and reports its shape and whether it is finite."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "sink"
    OUTPUT_NODE = True
    CATEGORY = "testing/ADO"

    def sink(self, samples):
        x = samples["samples"]
        return {"ui": {"latent": [{"shape": list(x.shape), "finite": bool(torch.isfinite(x).all())}]}}


NODE_CLASS_MAPPINGS = {"ADOTestTinyModel": ADOTestTinyModel, "ADOTestConditioning": ADOTestConditioning,
                       "ADOTestLatentSink": ADOTestLatentSink}
