"""Datasets as uint8 tensors, the train/val split, and the in-memory batch loader with augmentation.

`load_data(name, root)` returns a `Data`: uint8 images (N, C, 32, 32), int64 labels, class names,
split into train / val / test. `Loader` slices batches from memory on the training device and
augments there (random translate with reflect padding, horizontal flip), with no per-image Python.
"""
import gzip
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DATASETS = ("cifar10", "fashion-mnist", "synthetic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable; the message says what to do."""


@dataclass
class Data:
    name: str
    classes: list           # class names, index = label
    train_x: torch.Tensor   # (N, C, 32, 32) uint8
    train_y: torch.Tensor   # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    templates: torch.Tensor = None  # synthetic only: (10, 3, 32, 32) float in [0, 1], the planted features

    @property
    def channels(self):
        return self.train_x.shape[1]

    def channel_stats(self):
        """Per-channel mean and std of the training images in [0, 1] (for the model's Normalize)."""
        x = self.train_x.float().div_(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
        return x.mean(1).tolist(), x.std(1).tolist()

    def __repr__(self):
        return (f"Data({self.name!r}, {self.channels} channel(s), train {len(self.train_y)}, "
                f"val {len(self.val_y)}, test {len(self.test_y)}, classes {self.classes})")


def data_dir(root=None):
    """DATA_DIR from the argument, else the environment, else ./data."""
    return Path(root or os.environ.get("DATA_DIR") or "data")


def load_data(name="cifar10", root=None, seed=0, val_size=None, **synthetic_kwargs):
    """Load a dataset by name and split its training set into train/val deterministically."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    templates = None
    if name == "cifar10":
        (x, y), (tx, ty), classes = load_cifar10(data_dir(root))
    elif name == "fashion-mnist":
        (x, y), (tx, ty), classes = load_fashion_mnist(data_dir(root))
    else:
        (x, y), (tx, ty), classes, templates = make_synthetic(seed=seed, **synthetic_kwargs)
    train_idx, val_idx = split_indices(len(y), val_size, seed)
    return Data(name, classes, x[train_idx], y[train_idx], x[val_idx], y[val_idx], tx, ty, templates)


def split_indices(n, val_size=None, seed=0):
    """Deterministic disjoint (train, val) index tensors: 5,000 val for 50,000 images, else 10%."""
    if val_size is None:
        val_size = 5000 if n == 50000 else max(1, round(0.1 * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _to_tensors(dset):
    x = torch.as_tensor(dset.data)
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]  # (N, C, H, W)
    return x.contiguous(), torch.as_tensor(dset.targets, dtype=torch.int64)


def load_cifar10(root):
    """CIFAR-10 through torchvision; downloads into root, or extracts cifar-10-python.tar.gz there."""
    from torchvision.datasets import CIFAR10

    try:
        train, test = (CIFAR10(root, train=t, download=True) for t in (True, False))
    except Exception as e:  # offline: URLError, OSError, RuntimeError...
        raise DatasetUnavailable(
            f"CIFAR-10 is not in {Path(root).resolve()} and could not be downloaded ({e}). "
            f"Put cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html) or its "
            f"extracted folder cifar-10-batches-py/ into {Path(root).resolve()}, or set DATA_DIR to the "
            f"folder that holds it. To work offline, use DATASET=fashion-mnist or DATASET=synthetic."
        ) from e
    return _to_tensors(train), _to_tensors(test), list(train.classes)


def load_fashion_mnist(root):
    """Fashion-MNIST through torchvision (also from the Debian package's files), padded to 32x32."""
    from torchvision.datasets import FashionMNIST

    raw = Path(root) / "FashionMNIST" / "raw"
    for gz in sorted(DEBIAN_FASHION_MNIST.glob("*-ubyte.gz")):
        target = raw / gz.name[:-3]
        if not target.exists():  # unpack the Debian copy: no download needed
            raw.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)
    try:
        train, test = (FashionMNIST(root, train=t, download=True) for t in (True, False))
    except Exception as e:
        raise DatasetUnavailable(
            f"Fashion-MNIST is not in {Path(root).resolve()} and could not be downloaded ({e}). "
            f"Install the Debian package (apt-get install dataset-fashion-mnist), or put the four "
            f"*-ubyte.gz files into {raw.resolve()}, or use DATASET=synthetic."
        ) from e
    pad = lambda t: F.pad(t, (2, 2, 2, 2))  # 28x28 -> 32x32, zero border like the background
    (x, y), (tx, ty) = _to_tensors(train), _to_tensors(test)
    return (pad(x), y), (pad(tx), ty), list(train.classes)


# ----------------------------------------------------------------------------- synthetic

SYNTHETIC_CLASSES = [
    "red horizontal stripes", "green vertical stripes", "blue checkerboard", "yellow disc",
    "cyan ring", "magenta cross", "orange diagonal X", "white corners", "purple blob", "teal fine grid",
]


def synthetic_templates():
    """The 10 planted features: (10, 3, 32, 32) in [0, 1], each a pattern in its own colour.

    Every pattern is symmetric under a horizontal flip, so flip augmentation keeps the class.
    """
    r = torch.arange(32, dtype=torch.float32) - 15.5
    yy, xx = r[:, None].expand(32, 32), r[None, :].expand(32, 32)
    rad = (yy ** 2 + xx ** 2).sqrt()
    two_pi = 2 * math.pi
    patterns = [
        torch.cos(two_pi * yy / 8),                                   # horizontal stripes
        torch.cos(two_pi * xx / 8),                                   # vertical stripes
        torch.sign(torch.cos(two_pi * yy / 8) * torch.cos(two_pi * xx / 8)),  # checkerboard
        (rad < 9).float() * 2 - 1,                                    # disc
        ((rad > 8) & (rad < 13)).float() * 2 - 1,                     # ring
        ((yy.abs() < 3) | (xx.abs() < 3)).float() * 2 - 1,           # cross
        (((yy - xx).abs() < 3) | ((yy + xx).abs() < 3)).float() * 2 - 1,  # diagonal X
        ((yy.abs() > 9) & (xx.abs() > 9)).float() * 2 - 1,           # corners
        torch.exp(-rad ** 2 / 60) * 2 - 1,                            # soft blob
        torch.cos(two_pi * yy / 4) * torch.cos(two_pi * xx / 4),      # fine grid
    ]
    colours = torch.tensor([
        [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [-1, 1, 1],
        [1, -1, 1], [1, 0, -1], [1, 1, 1], [0.2, -1, 1], [-1, 0.5, 0.2],
    ], dtype=torch.float32)
    patterns = torch.stack(patterns)  # (10, 32, 32) in [-1, 1]
    return (0.5 + 0.45 * patterns[:, None] * colours[:, :, None, None]).clamp(0, 1)


def make_synthetic(n_train=10000, n_test=2000, seed=0, noise=0.12):
    """A deterministic 10-class dataset whose defining feature per class is known (the templates).

    Each image is its class template at a random contrast on a random background tint, plus noise.
    """
    templates = synthetic_templates()
    gen = torch.Generator().manual_seed(seed)

    def draw(n):
        y = torch.arange(n) % 10
        y = y[torch.randperm(n, generator=gen)]
        contrast = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.1, generator=gen)
        tint = torch.empty(n, 3, 1, 1).uniform_(-0.1, 0.1, generator=gen)
        eps = torch.randn(n, 3, 32, 32, generator=gen) * noise
        x = 0.5 + contrast * (templates[y] - 0.5) + tint + eps
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return draw(n_train), draw(n_test), list(SYNTHETIC_CLASSES), templates


# ----------------------------------------------------------------------------- loader

class Loader:
    """Batches of (images in [0, 1], labels) sliced from uint8 tensors, augmented on their device.

    Augmentation (train only): random translate by up to `translate` px with reflect padding, and a
    random horizontal flip; both vectorized over the batch. Labels stay aligned with their images.
    """

    def __init__(self, x, y, batch_size=1024, shuffle=False, augment=False, translate=2,
                 drop_last=False, device="cpu", seed=0, channels_last=False):
        self.x, self.y = x.to(device), y.to(device)  # uint8 (N, C, H, W), int64 (N,)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.translate, self.drop_last, self.device = translate, drop_last, torch.device(device)
        self.channels_last = channels_last
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self):
        n = len(self.y) / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        n = len(self.y)
        order = (torch.randperm(n, generator=self.gen, device=self.device) if self.shuffle
                 else torch.arange(n, device=self.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = self.augment_batch(x)
            x = x.float().div_(255)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y[idx]

    def augment_batch(self, x):
        """Random translate (with reflection at the border) and horizontal flip, per image."""
        r = self.translate
        dy, dx = torch.randint(-r, r + 1, (2, len(x)), generator=self.gen, device=x.device)
        flip = torch.rand(len(x), generator=self.gen, device=x.device) < 0.5
        return shift(x, dy, dx, flip)


def shift(x, dy, dx, flip=None):
    """Translate each image (B, C, H, W) by its own (dy, dx) px, reflecting at the border, and mirror
    it where flip (B,) is True: one gather, any dtype, differentiable."""
    b, c, h, w = x.shape
    i = torch.arange(h, device=x.device).view(1, h, 1)
    j = torch.arange(w, device=x.device).view(1, 1, w)
    if flip is not None:
        j = torch.where(flip.view(b, 1, 1), w - 1 - j, j)  # (B, 1, W): a flip reverses the columns
    rows = _reflect(i - dy.view(b, 1, 1), h)  # (B, H, 1): output row i reads input row i - dy
    cols = _reflect(j - dx.view(b, 1, 1), w)  # (B, 1, W)
    index = (rows * w + cols).view(b, 1, h * w)
    return x.flatten(2).gather(2, index.expand(b, c, h * w)).view(b, c, h, w)


def _reflect(k, n):
    """Indices reflected into [0, n) like reflect padding: -1 -> 1, n -> n - 2."""
    k = k.abs()
    return torch.where(k >= n, 2 * (n - 1) - k, k)
