"""In-memory data sets as uint8 NHWC arrays: scikit-learn digits, CIFAR-10/100, synthetic."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .scan import holdout_size

# mean / std in [0, 1] units
STATS = {
    "digits": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


def digits_arrays(image_size: int = 32, test_fraction: float = 0.2):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), upscaled bilinearly to an RGB
    ``image_size`` image. The train/test split is fixed (seed 0, stratified) so results compare."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=0, stratify=d.target)
    return (x[tr], y[tr]), (x[te], y[te]), 10


def cifar_arrays(name: str, root: str, download: bool):
    """CIFAR-10/100 in the standard python format under ``root`` (torchvision's dataset classes); a missing set
    is unpacked from an archive placed in ``root``, or downloaded with ``download`` (``download.prepare_cifar``)."""
    from .download import cifar_class, offline_hint, prepare_cifar

    prepare_cifar(name, root, download)
    cls = cifar_class(name)
    try:
        train, test = cls(root, train=True), cls(root, train=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        folder = os.path.join(root, cls.base_folder)
        raise ValueError(f"{folder} is incomplete or corrupt (a batch file is missing or fails its MD5): delete it "
                         f"and run again with --download, or {offline_hint(name, root)}") from None
    arrays = [(torch.from_numpy(ds.data), torch.tensor(ds.targets, dtype=torch.int64)) for ds in (train, test)]
    return arrays[0], arrays[1], len(train.classes)


def synthetic_arrays(num_classes: int = 10, samples: int = 512, image_size: int = 32, seed: int = 0):
    """Learnable random data: each class is a fixed random colour pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, image_size, image_size, 3, generator=g) * 255

    def draw(n):
        y = torch.arange(n) % num_classes
        x = protos[y] * 0.6 + torch.rand(n, image_size, image_size, 3, generator=g) * 255 * 0.4
        return x.round().to(torch.uint8), y

    return draw(samples), draw(max(num_classes, samples // 4)), num_classes


def split_holdout(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int = 0):
    """Split off a held-out validation part of the training set (fixed by ``seed``)."""
    if fraction <= 0:
        return (x, y), None
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = holdout_size(len(y), fraction)
    return (x[perm[n_val:]], y[perm[n_val:]]), (x[perm[:n_val]], y[perm[:n_val]])
