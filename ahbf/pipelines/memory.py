"""A whole data set as one uint8 tensor on the device, with batched on-device augmentation.

Used for CIFAR, digits and synthetic data: no worker processes, no host-to-device copies per step.
Training order: exactly ``DistributedSampler``'s for (seed, epoch) (a CPU permutation seeded with seed + epoch,
padded by wrapping so every rank gets the same count, every world_size-th sample from rank), computed once per
epoch and moved to the device. Augmentation: a device generator seeded with (seed, epoch, rank), so ranks
draw different crops and an epoch is a pure function of (seed, epoch, rank). Evaluation: rank r takes
samples r, r + world_size, ... (an exact partition, no padding; rank counts may differ by one).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan import epoch_permutation, mix_seed


def random_crop_flip(x: Tensor, pad: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Batched random crop and horizontal flip of uint8 N x H x W x C images, as torchvision's
    ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip()`` per image: the crop is an H x W window at a
    uniform offset in [0, 2 pad] of the zero-padded image, then mirrored with probability 1/2. One gather
    does both. Draws (from ``gen``, in this order): row offsets, column offsets (if pad > 0), flip coins."""
    B, H, W, _ = x.shape
    if pad <= 0 and not flip:
        return x
    dev = x.device
    rows, cols = torch.arange(H, device=dev).expand(B, H), torch.arange(W, device=dev).expand(B, W)
    if pad > 0:
        x = F.pad(x, (0, 0, pad, pad, pad, pad))
        rows = rows + torch.randint(0, 2 * pad + 1, (B, 1), generator=gen, device=dev)
        cols = cols + torch.randint(0, 2 * pad + 1, (B, 1), generator=gen, device=dev)
    if flip:
        mirror = torch.rand(B, 1, generator=gen, device=dev) < 0.5
        cols = torch.where(mirror, cols.flip(1), cols)
    return x[torch.arange(B, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]


def crop_flip_draws(B: int, pad: int, flip: bool, gen: torch.Generator, device) -> None:
    """The draws ``random_crop_flip`` makes for a batch of B, without the images: skipping a batch this way
    leaves ``gen`` where the batch would have left it."""
    if pad > 0:
        torch.randint(0, 2 * pad + 1, (B, 1), generator=gen, device=device)
        torch.randint(0, 2 * pad + 1, (B, 1), generator=gen, device=device)
    if flip:
        torch.rand(B, 1, generator=gen, device=device)


class DeviceTensorLoader:
    """Iterates (images, labels) batches from uint8 NHWC ``images`` held on ``device``."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, mean, std, *, train: bool,
                 pad: int = 4, flip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images: expected uint8 N x H x W x 3, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"labels: {len(labels)} labels for {len(images)} images")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.train, self.pad, self.flip = batch_size, train, pad, flip
        self.seed, self.rank, self.world_size, self.dtype = seed, rank, world_size, dtype
        self.mean = torch.tensor(mean, device=self.device, dtype=torch.float32) * 255
        self.std = torch.tensor(std, device=self.device, dtype=torch.float32) * 255
        self.epoch, self.start = 0, 0
        n = len(images)
        # train: every rank gets ceil(n / world) samples (padded by wrapping); eval: a plain split
        self.num_samples = -(-n // world_size) if train else len(range(rank, n, world_size))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def indices(self) -> Tensor:
        """This rank's sample indices for the current epoch, on the device."""
        n = len(self.images)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size, device=self.device)
        order = epoch_permutation(n, seed=self.seed, epoch=self.epoch, world_size=self.world_size)
        return order[self.rank::self.world_size].to(self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self.indices()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(self.seed, self.epoch, self.rank))
        for start in range(0, len(idx), self.batch_size):
            b = idx[start:start + self.batch_size]
            if start < self.start * self.batch_size:  # trained before a mid-epoch resume: only its random draws
                if self.train:
                    crop_flip_draws(len(b), self.pad, self.flip, gen, self.device)
                continue
            x = self.images[b]
            if self.train:
                x = random_crop_flip(x, self.pad, self.flip, gen)
            x = ((x.float() - self.mean) / self.std).to(self.dtype)
            yield x.permute(0, 3, 1, 2), self.labels[b]  # NCHW view with channels-last strides
