"""Image folders: ``--dataset imagenet`` (``root/train/<class>/*``, ``root/val/<class>/*``, or file lists) and
``--dataset folder`` (your own images: ``root/train``, optional ``root/val`` and ``root/test``), decoded by
DALI or by a torchvision DataLoader (``DataConfig.backend``), with the same batch format either way.

Splits (``scan.split_sources``): for ``imagenet``, ``root/val`` is the *test* set (reported at the end) and a
fixed held-out part of ``root/train`` (``val_fraction``, seed 0) is the validation set that chooses the best
checkpoint. For ``folder``, ``root/val`` is the validation set when it exists (else the held-out part) and
``root/test`` the test set when it exists (else the val split stands in, and the run log says so).
"""
from __future__ import annotations

import os

import torch

from .base import DataBundle, DataConfig, resolve_dtype
from .dali import DaliFolderLoader, dali_available
from .scan import (FULL_CHECK_LIMIT, ImageSet, check_images, holdout_split, read_file_list, scan_folder,
                   split_sources)
from .torch_folder import TorchFolderLoader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("auto", "dali", "torch")
DEFAULT_SIZE = {"imagenet": 224, "folder": 64}  # image_size 0; ahbf/recipes/folder.yaml states its 64


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``dali`` when NVIDIA DALI imports, else ``torch``; an explicit ``dali`` without DALI fails."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if dali_available() else "torch"
    return backend


def load_images(cfg: DataConfig, folder: str, list_path: str = "") -> ImageSet:
    """The images of ``folder`` (or of ``list_path``), checked per ``cfg.check_images``."""
    images = read_file_list(list_path, cfg.root) if list_path else scan_folder(folder, skip_bad=cfg.skip_bad_images)
    return check_images(images, cfg.check_images, workers=cfg.workers, skip_bad=cfg.skip_bad_images,
                        what=f"{os.path.basename(folder)} images")


def same_classes(train: ImageSet, other: ImageSet, train_dir: str, other_dir: str) -> None:
    """Scanned folders must hold the same class folders (a class index means the same class in every split)."""
    if train.classes == other.classes:
        return
    only = [f"{sorted(set(a.classes) - set(b.classes))[:3]} only in {d}"
            for a, b, d in ((train, other, train_dir), (other, train, other_dir)) if set(a.classes) - set(b.classes)]
    raise ValueError(f"class folders differ between {train_dir} ({len(train.classes)}) and {other_dir} "
                     f"({len(other.classes)}): {'; '.join(only)}")


def check_folder_root(cfg: DataConfig) -> None:
    """``--dataset folder``: a missing root names the expected layout."""
    if not os.path.isdir(os.path.join(cfg.root, "train")) and not cfg.train_list:
        raise FileNotFoundError(f"image folder not found: {os.path.join(cfg.root, 'train')} (--dataset folder reads "
                                f"<--data-dir>/train/<class>/<image>, and val/, test/ beside train/ if present)")


def build_folder_data(cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
                      device: torch.device | str = "cpu") -> DataBundle:
    """Train / val / test loaders for an image folder (module docstring: where each split comes from)."""
    backend, dtype = resolve_backend(cfg.backend), resolve_dtype(cfg.dtype)
    size = cfg.image_size or DEFAULT_SIZE.get(cfg.dataset, 224)
    src, train_dir = split_sources(cfg), os.path.join(cfg.root, "train")
    if cfg.dataset == "folder":
        check_folder_root(cfg)
        if not src.val and src.test == "val":
            raise ValueError(f"nothing to evaluate on: add {cfg.root}/val or {cfg.root}/test, or set "
                             f"data.val_fraction > 0 to hold out part of {train_dir}")
    train = load_images(cfg, train_dir, cfg.train_list)
    val = None if src.val in ("", "holdout") else load_images(cfg, src.val)
    test = None if src.test == "val" else load_images(cfg, src.test, cfg.test_list)
    for folder, images in ((src.val, val), (src.test, None if cfg.test_list else test)):
        if images is not None and not cfg.train_list:
            same_classes(train, images, train_dir, folder)
    num_classes = max(len(s.classes) for s in (train, val, test) if s is not None)
    if num_classes < 2:
        raise ValueError(f"{cfg.train_list or train_dir}: {num_classes} class; classification needs at least 2 "
                         "(one class folder per class)")
    check = cfg.check_images if cfg.check_images != "auto" else "full" if len(train.samples) <= FULL_CHECK_LIMIT else "header"
    if val is None:  # held out of train (val_fraction 0: no val split)
        train, val = holdout_split(train, cfg.val_fraction)
    sizes = {"train": len(train.samples), "val": 0 if val is None else len(val.samples)}
    sizes["test"] = sizes["val"] if test is None else len(test.samples)
    loader = DaliFolderLoader if backend == "dali" else TorchFolderLoader
    common = dict(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=cfg.workers, seed=cfg.seed,
                  rank=rank, world_size=world_size, device=device, dtype=dtype)

    def evaluation(images):
        return None if images is None else loader(images, train=False, batch_size=cfg.eval_batch_size, **common)

    train_loader, val_loader = loader(train, train=True, batch_size=cfg.batch_size, augment=cfg.augment,
                                      **common), evaluation(val)
    test_loader = val_loader if test is None else evaluation(test)  # folder without test/: the val split stands in
    return DataBundle(train_loader, val_loader, test_loader, num_classes, size, sizes, backend, check)
