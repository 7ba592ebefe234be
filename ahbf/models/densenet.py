"""Hierarchical-branch DenseNet-BC for CIFAR, structured as the AHBF reference's ``densenet_ahbf.py``.

Stem 3x3 conv (24 channels for every growth rate k, as the reference), dense blocks of bottleneck layers
(BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to k) and transitions (BN-ReLU-1x1 conv halving the channels,
2x2 average pool). DenseNet-40: ``layers`` = (6, 6, 6); DenseNet-100: (16, 16, 16). The trunk is the stem,
blocks 1-2 and their transitions; branch i is dense block 3 with ``layers[2] + i * aux`` layers, then
BN, ReLU, global pool and a linear classifier. Branch i has C_i = C_0 + i * aux * k channels, so AHBF
module k maps cat[G_{k-1}, F_{k+1}] (C_k + C_{k+1} channels) to C_{k+1}.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from ..methods import Body, Part
from .branched import MultiBranchNet, global_pool

STEM, BN_SIZE, COMPRESSION = 24, 4, 0.5


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (to ``4k``) then BN-ReLU-3x3 conv (to ``k``) on the concatenated inputs."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, BN_SIZE * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(BN_SIZE * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(BN_SIZE * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.Module):
    """``n`` dense layers (``denselayer1`` ..); returns the input and every layer's output, concatenated."""

    def __init__(self, n: int, cin: int, growth: int):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth))
        self.out_channels = cin + n * growth

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.children():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


def transition(cin: int, cout: int) -> nn.Sequential:
    """BN, ReLU, 1x1 conv to ``cout``, 2x2 average pool (``norm``, ``relu``, ``conv``, ``pool``)."""
    return nn.Sequential(OrderedDict(norm=nn.BatchNorm2d(cin), relu=nn.ReLU(inplace=True),
                                     conv=nn.Conv2d(cin, cout, 1, bias=False), pool=nn.AvgPool2d(2, stride=2)))


class DenseTrunk(nn.Sequential):
    """``conv0``, ``denseblock1``, ``transition1``, ``denseblock2``, ``transition2``."""

    def __init__(self, layers: tuple[int, ...], growth: int):
        super().__init__()
        self.conv0 = nn.Conv2d(3, STEM, 3, padding=1, bias=False)
        c = STEM
        for i, n in enumerate(layers[:2], start=1):
            block = DenseBlock(n, c, growth)
            c = int(block.out_channels * COMPRESSION)
            self.add_module(f"denseblock{i}", block)
            self.add_module(f"transition{i}", transition(block.out_channels, c))
        self.out_channels = c


class DenseBranch(nn.Module):
    """``denseblock3`` with ``n`` layers, ``norm`` + ReLU, global pool, ``classifier``; returns (features, logits)."""

    def __init__(self, n: int, cin: int, growth: int, num_classes: int):
        super().__init__()
        self.denseblock3 = DenseBlock(n, cin, growth)
        self.out_channels = c = self.denseblock3.out_channels
        self.norm, self.relu = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        f = self.relu(self.norm(self.denseblock3(h)))
        return f, self.classifier(global_pool(f))


def init_weights(model: nn.Module) -> None:
    """As the reference: Kaiming-normal (fan_in) convs, BN 1 / 0, Linear biases 0 (weights: PyTorch default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def multi_branch(arch, num_classes: int, num_branches: int, aux: int,
                 parts: Callable[[Body], dict[str, Part]] | None = None) -> MultiBranchNet:
    """Trunk + ``num_branches`` branches (branch i: ``layers[2] + i * aux`` layers in dense block 3) + the
    method's parts; ``arch.width`` is the growth rate."""
    layers, growth = arch.layers, int(arch.width)
    trunk = DenseTrunk(layers, growth)
    branches = [DenseBranch(layers[2] + i * aux, trunk.out_channels, growth, num_classes) for i in range(num_branches)]
    model = MultiBranchNet(trunk, branches, num_classes, parts)
    init_weights(model)
    return model


def plain(arch, num_classes: int) -> nn.Module:
    return DenseNet(arch.layers, int(arch.width), num_classes)


class DenseNet(nn.Module):
    """The plain DenseNet that trunk + branch 0 exports to (trunk modules, then ``denseblock3``, ``norm``,
    ``classifier``)."""

    def __init__(self, layers: tuple[int, ...], growth: int, num_classes: int):
        super().__init__()
        trunk = DenseTrunk(layers, growth)
        branch = DenseBranch(layers[2], trunk.out_channels, growth, num_classes)
        for name, module in [*trunk.named_children(), *branch.named_children()]:
            self.add_module(name, module)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        for name in ("conv0", "denseblock1", "transition1", "denseblock2", "transition2", "denseblock3",
                     "norm", "relu"):
            x = getattr(self, name)(x)
        return self.classifier(global_pool(x))
