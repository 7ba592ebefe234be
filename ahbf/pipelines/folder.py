"""ImageNet-style data: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or file lists), decoded by DALI
or by a torchvision DataLoader (``DataConfig.backend``), with the same batch format either way.

Splits: ``root/val`` is the *test* set (reported at the end); a fixed held-out part of ``root/train``
(``val_fraction``, seed 0) is the validation set that chooses the best checkpoint.
"""
from __future__ import annotations

import os

import torch

from .base import DataBundle, DataConfig, resolve_dtype
from .dali import DaliFolderLoader, dali_available
from .scan import FULL_CHECK_LIMIT, check_images, holdout_split, read_file_list, scan_folder
from .torch_folder import TorchFolderLoader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("auto", "dali", "torch")


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``dali`` when NVIDIA DALI imports, else ``torch``; an explicit ``dali`` without DALI fails."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if dali_available() else "torch"
    return backend


def load_split(cfg: DataConfig, split: str, list_path: str):
    """The images of ``root/<split>`` (or of ``list_path``), checked per ``cfg.check_images``."""
    images = (read_file_list(list_path, cfg.root) if list_path
              else scan_folder(os.path.join(cfg.root, split), skip_bad=cfg.skip_bad_images))
    return check_images(images, cfg.check_images, workers=cfg.workers, skip_bad=cfg.skip_bad_images,
                        what=f"{split} images")


def build_folder_data(cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
                      device: torch.device | str = "cpu") -> DataBundle:
    """Train / held-out val / test (``root/val``) loaders for an ImageNet-style folder."""
    backend, dtype = resolve_backend(cfg.backend), resolve_dtype(cfg.dtype)
    size = cfg.image_size or 224
    train = load_split(cfg, "train", cfg.train_list)
    test = load_split(cfg, "val", cfg.test_list)
    if not (cfg.train_list or cfg.test_list) and train.classes != test.classes:
        raise ValueError(f"class folders differ between {cfg.root}/train ({len(train.classes)}) and "
                         f"{cfg.root}/val ({len(test.classes)})")
    num_classes = max(len(train.classes), len(test.classes))
    check = cfg.check_images if cfg.check_images != "auto" else "full" if len(train.samples) <= FULL_CHECK_LIMIT else "header"
    train, val = holdout_split(train, cfg.val_fraction)
    sizes = {"train": len(train.samples), "val": 0 if val is None else len(val.samples), "test": len(test.samples)}
    loader = DaliFolderLoader if backend == "dali" else TorchFolderLoader
    common = dict(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=cfg.workers, seed=cfg.seed,
                  rank=rank, world_size=world_size, device=device, dtype=dtype)

    def evaluation(images):
        return None if images is None else loader(images, train=False, batch_size=cfg.eval_batch_size, **common)

    train_loader = loader(train, train=True, batch_size=cfg.batch_size, augment=cfg.augment, **common)
    return DataBundle(train_loader, evaluation(val), evaluation(test), num_classes, size, sizes, backend, check)
