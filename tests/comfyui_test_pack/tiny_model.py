"""A tiny denoiser built in code, wrapped as a real ComfyUI MODEL (hosts.md §4.2); tests only.

``build(kind)`` returns a ``comfy.model_patcher.ModelPatcher`` around a ``comfy.model_base.BaseModel`` of
model type EPS, V_PREDICTION or FLOW whose diffusion model is :class:`TinyUNet` (a few seeded convolutions
that read the timestep and the cross-attention context).  No checkpoint, no download; ComfyUI is imported
lazily, so the module itself imports anywhere.
"""
from __future__ import annotations

import torch

KINDS = ("eps", "v", "flow")


class TinyUNet(torch.nn.Module):
    """Output = 0.5·tanh(conv(x)) shifted by the context mean and a smooth function of the timestep.

    Constructed by ``BaseModel`` as ``unet_model(**unet_config, device=, operations=)``; counts forwards.
    """

    def __init__(self, in_channels=4, device=None, operations=None, dtype=None, **kwargs):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.conv1 = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, in_channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.forwards = 0
        self.dtype = torch.float32  # BaseModel reads diffusion_model.dtype

    def forward(self, x, timesteps=None, context=None, control=None, transformer_options={}, **kwargs):
        self.forwards += 1
        h = torch.nn.functional.silu(self.conv1(x))
        out = 0.5 * torch.tanh(self.conv2(h))
        t = timesteps.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) if timesteps is not None else 0.0
        out = out + 0.05 * torch.cos(t / 300.0)
        if context is not None:
            out = out + 0.2 * context.to(x.dtype).mean(dim=(1, 2)).reshape(-1, *([1] * (x.ndim - 1)))
        return out


def build(kind: str = "eps"):
    """A real ComfyUI ModelPatcher of the tiny model; ``kind`` is "eps", "v" or "flow" (CONST)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {KINDS}")
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models_base

    class TinyConfig(comfy.supported_models_base.BASE):
        unet_config = {"in_channels": 4}
        unet_extra_config = {}
        latent_format = comfy.latent_formats.SD15  # has latent_rgb_factors: previews work
        sampling_settings = {"shift": 1.0} if kind == "flow" else {}

    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION,
                  "flow": comfy.model_base.ModelType.FLOW}[kind]
    cpu = torch.device("cpu")
    config = TinyConfig({"in_channels": 4})
    base = comfy.model_base.BaseModel(config, model_type=model_type, device=cpu, unet_model=TinyUNet)
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
