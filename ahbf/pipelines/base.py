"""The loader interface every data pipeline implements, and its config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    """``DataConfig.dtype`` -> torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    """digits (scikit-learn's bundled set, the default) | cifar10 | cifar100 | imagenet (class folders) | folder (your own images: train/, val/, test/ of class folders) | synthetic"""
    root: str = "data"
    """folder of the data set (CIFAR python format, or train/, val/ (and for folder test/) of class folders)"""
    backend: str = "auto"
    """auto | dali | torch: image-folder decoding with NVIDIA DALI or a torchvision DataLoader"""
    batch_size: int = 128
    """per-process training batch size"""
    eval_batch_size: int = 256
    """per-process evaluation batch size"""
    workers: int = 4
    """decoding threads (DALI) or DataLoader workers (torch)"""
    image_size: int = 0
    """training resolution; 0 = the data set's default (digits 32, CIFAR 32, ImageNet 224, folder 64)"""
    val_fraction: float = 0.1
    """fraction of the training set held out to choose the best checkpoint (never the test set; folder: only without root/val)"""
    download: bool = False
    """allow downloading CIFAR into root (off by default: nothing is fetched silently; an archive placed in root by hand is unpacked without it)"""
    skip_bad_images: bool = False
    """skip unreadable images and empty class folders (with a warning that counts them) instead of stopping"""
    check_images: str = "auto"
    """image-folder check before training: full (Pillow decode) | header (signature + JPEG end marker) | none | auto (full up to 100,000 images, else header)"""
    train_list: str = ""
    """text file of 'relative/path label' lines (relative to root) used instead of scanning root/train"""
    test_list: str = ""
    """text file of 'relative/path label' lines (relative to root) used instead of scanning root/val (folder: root/test)"""
    dtype: str = "float32"
    """dtype of the image batches: float32 | float16 | bfloat16 | float64 (what train.precision=fp64 sets)"""
    synthetic_classes: int = 10
    """number of classes of the synthetic data set"""
    synthetic_samples: int = 512
    """number of training images of the synthetic data set"""
    augment: bool = True
    """random crop (+ flip where it preserves the label) on training batches"""
    seed: int = 0
    """seed of the shuffling and augmentation streams (epoch e uses a stream derived from seed and e)"""


class Batches(Protocol):
    """An epoch-wise iterable of ``(images, labels)`` on the target device.

    ``images`` is float B x 3 x H x W in channels-last memory format, normalised; ``labels`` int64 B.
    ``set_epoch(e)`` must be called before iterating epoch e: the order and augmentation of an epoch
    are a function of (seed, e), so a resumed run restarts its epoch deterministically. ``start`` > 0 makes
    the next pass begin at batch ``start`` with exactly the batches (and augmentation) of a full pass.
    """

    num_samples: int

    def set_epoch(self, epoch: int, start: int = 0) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...


@dataclass
class DataBundle:
    train: Batches
    val: Batches | None
    test: Batches
    num_classes: int
    image_size: int
    sizes: dict[str, int] = field(default_factory=dict)
    """images per split over all ranks (train / val / test), before any padding of the shards"""
    backend: str = "memory"
    """what was chosen: memory (tensors on the device) | dali | torch"""
    check_images: str = "none"
    """the image check that ran (what ``check_images=auto`` became)"""

    def close(self) -> None:
        """Stop the loaders' worker processes now (at interpreter exit, DALI's exit hook would wait for them)."""
        for loader in (self.train, self.val, self.test):
            if hasattr(loader, "close"):
                loader.close()
