"""A whole data set as one uint8 tensor on the device, with batched on-device augmentation.

Used for CIFAR, digits and synthetic data: no worker processes, no host-to-device copies per step.
Each epoch's order and augmentation come from generators seeded with (seed, epoch); samples are
sharded by global rank like ``DistributedSampler`` (padded so every rank gets the same count).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(x: Tensor, pad: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Batched random crop (zero padding ``pad``) and horizontal flip of uint8 NHWC images."""
    B, H, W, _ = x.shape
    if pad > 0:
        xp = F.pad(x, (0, 0, pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen, device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen, device=x.device)
        rows = (oy[:, None] + torch.arange(H, device=x.device))[:, :, None]
        cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, :]
        x = xp[torch.arange(B, device=x.device)[:, None, None], rows, cols]
    if flip:
        mask = torch.rand(B, generator=gen, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(2), x)
    return x


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
        self.epoch = 0
        n = len(images)
        # train: every rank gets ceil(n / world) samples (padded by wrapping); eval: a plain split
        self.num_samples = -(-n // world_size) if train else len(range(rank, n, world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _generator(self, stream: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed * 1_000_003 + self.epoch) * 4 + stream)
        return gen

    def indices(self) -> Tensor:
        n = len(self.images)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size, device=self.device)
        order = torch.randperm(n, generator=self._generator(0), device=self.device)
        total = self.num_samples * self.world_size
        order = torch.cat([order, order[: total - n]]) if total > n else order
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self.indices()
        gen = self._generator(1)
        for start in range(0, len(idx), self.batch_size):
            b = idx[start:start + self.batch_size]
            x = self.images[b]
            if self.train:
                x = random_crop_flip(x, self.pad, self.flip, gen)
            x = ((x.float() - self.mean) / self.std).to(self.dtype)
            yield x.permute(0, 3, 1, 2), self.labels[b]  # NCHW view with channels-last strides
