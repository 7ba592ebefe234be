"""The torchvision ``DataLoader`` fallback for ImageNet-style folders, with DALI's batch format.

Workers decode with Pillow and apply RandomResizedCrop + flip (train) or Resize + CenterCrop (eval) to uint8
tensors; the main process moves the uint8 batch to the device and normalises it there (4x less data through
shared memory than float tensors), giving channels-last float batches like the DALI loader.

Epochs follow ``DistributedSampler`` (seeded, padded, ``set_epoch``); each sample's augmentation is seeded
with (seed, epoch, index), so an epoch is a pure function of (seed, epoch) whatever the number of workers.
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .scan import BadImageError, ImageSet, decode_problem, epoch_indices, mix_seed

# Workers are started by a fork server, not forked from the trainer: a process that has run DALI pipelines
# (thread pools, CUDA contexts) cannot be forked safely (workers then segfault or hang now and then).
WORKER_START = "forkserver"
_BAD_FILE = re.compile(r"^\S*BadImageError: bad image file (.+?): (.*)$", re.M)


def train_transform(size: int, augment: bool = True):
    from torchvision import transforms as T

    if not augment:
        return eval_transform(size, size)
    return T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), T.PILToTensor()])


def eval_transform(size: int, resize: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(size), T.PILToTensor()])


class ImageListDataset(Dataset):
    """(path, label) samples -> (uint8 3 x H x W tensor, label). Indexed by ``(index, seed)`` pairs: the
    transform's random draws come from ``seed`` (None = the worker's own stream)."""

    def __init__(self, images: ImageSet, transform):
        self.samples, self.transform = images.samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception:  # name the file in one line
            raise BadImageError(path, decode_problem(path) or "Pillow could not read it") from None
        if seed is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), label


def _exit_when_gone(pid: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # gone (or its pid reused by another user's process)
            os._exit(0)


class WatchTrainer:
    """``worker_init_fn``: a daemon thread ends the worker within ``interval`` s once the trainer (``pid``) is
    gone, SIGKILL included. Workers are children of the fork server, not of the trainer, so neither
    DataLoader's parent check nor PR_SET_PDEATHSIG sees the trainer die. A class, so that it pickles."""

    def __init__(self, pid: int | None = None, interval: float = 1.0):
        self.pid, self.interval = pid or os.getpid(), interval

    def __call__(self, worker_id: int) -> None:
        threading.Thread(target=_exit_when_gone, args=(self.pid, self.interval), daemon=True).start()


class EpochSampler(Sampler):
    """``DistributedSampler``'s indices for (seed, epoch, rank), each paired with its augmentation seed."""

    def __init__(self, n: int, *, seed: int, rank: int, world_size: int, shuffle: bool):
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch, self.skip = 0, 0  # skip: samples of the epoch already trained (a mid-epoch resume)

    def indices(self) -> list[int]:
        if not self.shuffle:  # evaluation: an exact partition, no padding
            lo, hi = self.rank * self.n // self.world_size, (self.rank + 1) * self.n // self.world_size
            return list(range(lo, hi))
        return epoch_indices(self.n, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)

    def __iter__(self):
        if not self.shuffle:
            return iter(self.indices())
        return iter([(i, mix_seed(self.seed, self.epoch, i)) for i in self.indices()[self.skip:]])

    def __len__(self) -> int:
        return len(self.indices())


class TorchFolderLoader:
    """``Batches`` over an ``ImageSet`` with a torchvision ``DataLoader``; the same sample order as the DALI
    loader for train (``DistributedSampler``'s) and for eval (rank r gets the r-th contiguous part)."""

    def __init__(self, images: ImageSet, *, train: bool, batch_size: int, size: int, mean, std,
                 workers: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 augment: bool = True, resize: int | None = None):
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        transform = train_transform(size, augment) if train else eval_transform(size, resize or round(size / 0.875))
        self.sampler = EpochSampler(len(images.samples), seed=seed, rank=rank, world_size=world_size, shuffle=train)
        self.loader = DataLoader(ImageListDataset(images, transform), batch_size=batch_size, sampler=self.sampler,
                                 num_workers=workers, pin_memory=self.device.type == "cuda",
                                 prefetch_factor=4 if workers > 0 else None, persistent_workers=workers > 0,
                                 multiprocessing_context=WORKER_START if workers > 0 else None,
                                 worker_init_fn=WatchTrainer() if workers > 0 else None)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.num_samples = len(self.sampler)

    def close(self) -> None:
        """Stop the persistent workers (dropping the DataLoader shuts its iterator down); the loader is unusable after."""
        self.loader = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.epoch, self.sampler.skip = epoch, start * self.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = iter(self.loader)
        while True:
            try:
                x, y = next(batches)
            except StopIteration:
                return
            except Exception as err:  # a worker's BadImageError comes back as a multi-line RuntimeError
                found = _BAD_FILE.search(str(err))
                if found is None:
                    raise
                raise BadImageError(found.group(1), found.group(2)) from None
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)  # uint8: cheap
            x = x.float().sub_(self.mean).div_(self.std).to(self.dtype)  # in place; keeps channels-last
            yield x, y.to(self.device, non_blocking=True)
