"""A small class-conditional UNet denoiser for 32×32 MNIST, with EDM preconditioning for both model types.

The network F (:class:`UNet`) is wrapped by :class:`Denoiser`, which applies the preconditioning of Karras et
al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM, Table 1 and Appendix B.6)
in its general form for x = α·x0 + σ·ε:

    D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise, class),
    c_in   = 1 / sqrt(α²σ_d² + σ²),
    c_skip = α·σ_d² / (α²σ_d² + σ²),
    c_out  = σ·σ_d / sqrt(α²σ_d² + σ²),         σ_d = 0.5 (the data standard deviation).

* ``"ve"`` (x = x0 + σ·ε, α = 1): exactly EDM, with c_noise = log(σ)/4.
* ``"flow"`` (x = (1 − t)·x0 + t·ε, α = 1 − t, t ∈ (0, 1]; rectified flow, Lipman et al. 2023, Esser et al.
  2024): F predicts a scaled x0 residual (the "x0 prediction" choice); D(x, t) is the predicted x0.  At t = 1
  the formulas give c_in = 1, c_skip = 0, c_out = σ_d: no division by 1 − t anywhere, so pure noise is a
  valid input.  c_noise = t.  Trained with the EDM weight 1/c_out², the loss is the velocity loss
  ‖v̂ − v‖² times (α²σ_d² + σ²)/σ_d², a factor between 1 and 4 over t ∈ [0, 1] (see :mod:`.train`).

The class embedding has 11 rows: the digits 0–9 and :data:`NULL_CLASS` = 10, the "no label" class used for
classifier-free guidance (Ho & Salimans 2022), trained by replacing 10 % of the labels with it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..schedules import check_model_type

#: Standard deviation of the data assumed by the preconditioning (EDM's σ_data; MNIST in [−1, 1] is ≈ 0.6).
SIGMA_DATA = 0.5
#: Class id that means "unconditional" (classifier-free guidance's null label).
NULL_CLASS = 10
#: Rows of the class embedding: 10 digits and the null class.
NUM_CLASSES = 11


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet` (stored with the weights as JSON)."""

    channels: tuple = (32, 64, 96)     # widths of the three levels (16, 8 and 4 px with patch = 2)
    patch: int = 2                     # pixel-unshuffle stem: the UNet runs on (C·patch², 32/patch, 32/patch)
    blocks_per_level: int = 1          # residual blocks per encoder level (the decoder has one more)
    emb_dim: int = 128                 # width of the noise-level + class embedding
    attention: bool = True             # one single-head self-attention block at the lowest resolution
    in_channels: int = 1
    num_classes: int = NUM_CLASSES

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


def _groups(ch: int) -> int:
    return min(8, ch // 4) if ch % 8 == 0 else 1


class FourierEmbedding(nn.Module):
    """Sinusoidal features of a scalar c_noise at fixed frequencies, geometric from 1 to 1000 (cf. EDM's
    positional embedding and the Transformer's)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), half)), persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        arg = c_noise[:, None].float() * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, embedding added as a per-channel shift, GroupNorm → SiLU → conv, plus skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a small feature map, with a residual connection."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj(a.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """F(x, c_noise, class): a three-level UNet (32 → 16 → 8 px) with skip connections by concatenation."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or UNetConfig()
        ch, e = cfg.channels, cfg.emb_dim
        self.noise_emb = FourierEmbedding(e)
        self.class_emb = nn.Embedding(cfg.num_classes, e)
        self.emb_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch ** 2, ch[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, c = [ch[0]], ch[0]
        for level, width in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResBlock(c, width, e))
                c = width
                skips.append(c)
            self.down.append(blocks)
            if level < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = ResBlock(c, c, e)
        self.mid_attn = SelfAttention(c) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(c, c, e)

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            blocks = nn.ModuleList()
            for _ in range(cfg.blocks_per_level + 1):
                blocks.append(ResBlock(c + skips.pop(), ch[level], e))
                c = ch[level]
            self.up.append(blocks)
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels * cfg.patch ** 2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.emb_mlp(self.noise_emb(c_noise) + self.class_emb(labels))
        h = self.conv_in(F.pixel_unshuffle(x, self.config.patch) if self.config.patch > 1 else x)
        hs = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.up) - 1:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.config.patch) if self.config.patch > 1 else out


def precondition(sigma: torch.Tensor, model_type: str, sigma_data: float = SIGMA_DATA):
    """EDM coefficients (c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` [B] (see the module doc)."""
    check_model_type(model_type)
    alpha = torch.ones_like(sigma) if model_type == "ve" else 1.0 - sigma
    var = alpha ** 2 * sigma_data ** 2 + sigma ** 2
    c_in = var.rsqrt()
    c_skip = alpha * sigma_data ** 2 / var
    c_out = sigma * sigma_data * c_in
    c_noise = sigma.log() / 4.0 if model_type == "ve" else sigma
    return c_skip, c_out, c_in, c_noise


class Denoiser(nn.Module):
    """D(x, σ, labels) = c_skip·x + c_out·F(c_in·x, c_noise, labels): the preconditioned UNet (EDM, Karras et
    al. 2022).  ``labels`` are class ids, :data:`NULL_CLASS` for unconditional."""

    def __init__(self, model_type: str, config: UNetConfig | None = None, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.model_type = check_model_type(model_type)
        self.sigma_data = sigma_data
        self.net = UNet(config)

    @property
    def config(self) -> UNetConfig:
        return self.net.config

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = precondition(sigma, self.model_type, self.sigma_data)
        view = (-1,) + (1,) * (x.ndim - 1)
        f = self.net(c_in.view(view) * x, c_noise, labels)
        return c_skip.view(view) * x + c_out.view(view) * f.to(x.dtype)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["Denoiser", "NULL_CLASS", "NUM_CLASSES", "SIGMA_DATA", "UNet", "UNetConfig", "count_parameters",
           "precondition"]
