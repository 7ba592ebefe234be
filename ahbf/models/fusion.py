"""Fusion feature paths (SPEC 3, 5, 7). The softmax over scores and the weighted sum of logits are
not here: they belong to the objective (``ahbf.kernels``) so a fused kernel can do them in one pass."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class AHBFFusion(nn.Module):
    """One AHBF module: (x, y) -> (f, s) with f = BN2d(Conv1x1(cat[x, y])) and
    s = ReLU(BN1d(Linear(GAP(f)))), the 2 pre-softmax importance scores of (x, y) per sample.
    ``in_channels`` is x's + y's channels when they differ (DenseNet's branches); default 2 * channels."""

    def __init__(self, channels: int, in_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels or 2 * channels, channels, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 2)
        self.bn_s = nn.BatchNorm1d(2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self.bn(self.conv(torch.cat([x, y], dim=1)))
        s = self.relu(self.bn_s(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1))))
        return f, s


class ONEGate(nn.Module):
    """ONE's gate on the trunk output: GAP -> Linear(C, M) -> BN1d -> ReLU (softmax in the objective)."""

    def __init__(self, channels: int, num_branches: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, h: Tensor) -> Tensor:
        return self.relu(self.bn(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))))
