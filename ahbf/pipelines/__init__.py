"""Data pipelines behind one function, ``build_data``: the trainer never knows which one runs."""
from __future__ import annotations

import torch

from .base import Batches, DataBundle, DataConfig, resolve_dtype
from .memory import DeviceTensorLoader
from .scan import no_test_set_note
from .sources import STATS, cifar_arrays, digits_arrays, split_holdout, synthetic_arrays

IN_MEMORY = ("digits", "cifar10", "cifar100", "synthetic")
FOLDERS = ("imagenet", "folder")  # image folders: ahbf/pipelines/folder.py


def _in_memory(cfg: DataConfig, rank: int, world_size: int, device) -> DataBundle:
    size = cfg.image_size or 32
    if cfg.dataset == "digits":
        train, test, k = digits_arrays(size)
    elif cfg.dataset == "synthetic":
        train, test, k = synthetic_arrays(cfg.synthetic_classes, cfg.synthetic_samples, size, cfg.seed)
    else:
        train, test, k = cifar_arrays(cfg.dataset, cfg.root, cfg.download)
        size = train[0].shape[1]
    train, val = split_holdout(*train, cfg.val_fraction)
    mean, std = STATS[cfg.dataset]
    flip = cfg.dataset.startswith("cifar") or cfg.dataset == "synthetic"  # a mirrored digit is another digit
    common = dict(mean=mean, std=std, rank=rank, world_size=world_size, device=device, dtype=resolve_dtype(cfg.dtype))

    def evaluation(arr):
        return None if arr is None else DeviceTensorLoader(*arr, cfg.eval_batch_size, train=False, **common)

    train_loader = DeviceTensorLoader(*train, cfg.batch_size, train=True, pad=max(1, size // 8) if cfg.augment else 0,
                                      flip=flip and cfg.augment, seed=cfg.seed, **common)
    sizes = {"train": len(train[1]), "val": 0 if val is None else len(val[1]), "test": len(test[1])}
    return DataBundle(train_loader, evaluation(val), evaluation(test), k, size, sizes)


def build_data(cfg: DataConfig, *, rank: int = 0, world_size: int = 1,
               device: torch.device | str = "cpu") -> DataBundle:
    """Train / held-out val / test loaders for ``cfg.dataset`` on ``device``, sharded by global rank."""
    if cfg.dataset in IN_MEMORY:
        return _in_memory(cfg, rank, world_size, device)
    if cfg.dataset in FOLDERS:
        from .folder import build_folder_data  # DALI or torchvision, chosen by cfg.backend; imported on demand
        return build_folder_data(cfg, rank=rank, world_size=world_size, device=device)
    raise ValueError(f"unknown dataset {cfg.dataset!r}; choose from {[*IN_MEMORY, *FOLDERS]}")


__all__ = ["Batches", "DataBundle", "DataConfig", "DeviceTensorLoader", "build_data", "no_test_set_note"]
