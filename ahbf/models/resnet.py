"""Hierarchical-branch ResNets (SPEC 2): a shared trunk plus M branches of increasing depth.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1``.., ``fc``) so that trunk + branch 0
renames 1:1 onto a plain network (see ``ahbf.models.export``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..methods import Body, Part
from .branched import MultiBranchNet

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_layer(block: type, inplanes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    """A ResNet stage of ``blocks`` blocks; returns it and its output channels."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(out, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out


def init_weights(model: nn.Module) -> None:
    """torchvision initialisation: Kaiming-normal (fan_out) convs, BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class Trunk(nn.Module):
    """Stem + layer1 + layer2, shared by all branches. ``imagenet`` picks the 7x7/2 stem + maxpool."""

    def __init__(self, block: type, layers: list[int], imagenet: bool):
        super().__init__()
        width = 64 if imagenet else 16
        if imagenet:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet else nn.Identity()
        self.layer1, c = make_layer(block, width, width, layers[0], 1)
        self.layer2, self.out_channels = make_layer(block, c, 2 * width, layers[1], 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))


class Branch(nn.Module):
    """The late stages (layer3 [+ layer4]), global pool and a classifier; returns (features, logits)."""

    def __init__(self, block: type, in_channels: int, stage_blocks: list[int], widths: list[int], num_classes: int):
        super().__init__()
        c = in_channels
        self.stage_names = []
        for idx, (n, w) in enumerate(zip(stage_blocks, widths)):
            layer, c = make_layer(block, c, w, n, 2)
            name = f"layer{idx + 3}"
            setattr(self, name, layer)
            self.stage_names.append(name)
        self.out_channels = c
        self.fc = nn.Linear(c, num_classes)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        for name in self.stage_names:
            h = getattr(self, name)(h)
        return h, self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def branch_stage_blocks(layers: list[int], imagenet: bool, i: int, aux: int) -> list[int]:
    """Blocks per late stage of branch i (SPEC 2). CIFAR: layer3 gets i*aux extra; ImageNet:
    layer3 gets aux*ceil(i/2) and layer4 aux*floor(i/2) ("lower stage first")."""
    if not imagenet:
        return [layers[2] + i * aux]
    return [layers[2] + aux * math.ceil(i / 2), layers[3] + aux * (i // 2)]


def multi_branch(arch, num_classes: int, num_branches: int, aux: int,
                 parts: Callable[[Body], dict[str, Part]] | None = None) -> MultiBranchNet:
    """Trunk (stem, layer1, layer2) + ``num_branches`` branches of increasing depth (``branch_stage_blocks``)
    + the method's ``parts``; torchvision initialisation."""
    blk, layers = BLOCKS[arch.block], list(arch.layers)
    trunk = Trunk(blk, layers, arch.imagenet)
    base = 64 if arch.imagenet else 16
    widths = [4 * base, 8 * base][: 2 if arch.imagenet else 1]
    branches = [Branch(blk, trunk.out_channels, branch_stage_blocks(layers, arch.imagenet, i, aux), widths, num_classes)
                for i in range(num_branches)]
    model = MultiBranchNet(trunk, branches, num_classes, parts)
    init_weights(model)
    return model


class CifarResNet(nn.Module):
    """The plain CIFAR ResNet that trunk + branch 0 exports to (torchvision-style names)."""

    def __init__(self, block: str, layers: list[int], num_classes: int):
        super().__init__()
        blk = BLOCKS[block]
        trunk = Trunk(blk, layers, imagenet=False)
        self.conv1, self.bn1, self.relu = trunk.conv1, trunk.bn1, trunk.relu
        self.layer1, self.layer2 = trunk.layer1, trunk.layer2
        self.layer3, c = make_layer(blk, trunk.out_channels, 64, layers[2], 2)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))
