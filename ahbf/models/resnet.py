"""Hierarchical-branch ResNets (SPEC 2): a shared trunk plus M branches of increasing depth.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1``.., ``fc``) so that trunk + branch 0
renames 1:1 onto a plain network (see ``ahbf.models.export``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .fusion import AHBFFusion, ONEGate
from .peers import EnsembleHead, PeerAttention, scale_grad

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class BranchOutput(NamedTuple):
    """What every model returns (SPEC 7): branch logits (index 0 = target) and fusion scores."""

    logits: list[Tensor]
    scores: list[Tensor]


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


class MultiBranchNet(nn.Module):
    """Shared trunk + M branches; ``method`` picks the fusion: 'ahbf' (recursive AHBF modules),
    'one' (a gate on the trunk), 'cl_ilr' (trunk gradients scaled by 1/M), 'okddip' (attention energies
    of peers 1..M-1), 'pcl' (an extra peer-ensemble logit output), 'branches'/'baseline' (none).
    Forward returns ``BranchOutput``."""

    def __init__(self, block: str, layers: list[int], imagenet: bool, num_classes: int,
                 num_branches: int, aux: int, method: str):
        super().__init__()
        blk = BLOCKS[block]
        self.method = method
        self.trunk = Trunk(blk, layers, imagenet)
        base = 64 if imagenet else 16
        widths = [4 * base, 8 * base][: 2 if imagenet else 1]
        self.branches = nn.ModuleList(
            Branch(blk, self.trunk.out_channels, branch_stage_blocks(layers, imagenet, i, aux), widths, num_classes)
            for i in range(num_branches))
        feat = self.branches[0].out_channels
        self.fusions = nn.ModuleList(AHBFFusion(feat) for _ in range(num_branches - 1)) if method == "ahbf" else None
        self.gate = ONEGate(self.trunk.out_channels, num_branches) if method == "one" else None
        self.attention = PeerAttention(feat) if method == "okddip" else None
        self.head = EnsembleHead(feat, num_branches, num_classes) if method == "pcl" else None
        init_weights(self)

    def compile_units(self) -> list[nn.Module]:
        """What ``train.compile=branches`` compiles, each as its own graph: trunk, branches, fusion modules."""
        extra = list(self.fusions or []) + [m for m in (self.gate, self.attention, self.head) if m is not None]
        return [self.trunk, *self.branches, *extra]

    def forward(self, x: Tensor) -> BranchOutput:
        h = self.trunk(x)
        if self.method == "cl_ilr":
            h = scale_grad(h, 1.0 / len(self.branches))
        feats, logits = [], []
        for branch in self.branches:
            f, z = branch(h)
            feats.append(f)
            logits.append(z)
        scores = []
        if self.fusions is not None:
            g = feats[0]
            for k, fuse in enumerate(self.fusions):
                g, sk = fuse(g, feats[k + 1])  # G_k = fusion of G_{k-1} (or F_0) and F_{k+1}
                scores.append(sk)
        elif self.gate is not None:
            scores.append(self.gate(h))
        elif self.attention is not None:
            scores = self.attention(feats[1:])  # the leader (branch 0) is not a peer
        elif self.head is not None:
            logits.append(self.head(feats))
        return BranchOutput(logits, scores)


class PeerNet(nn.Module):
    """DML: M independent plain networks (peers); peer 0 is the target."""

    def __init__(self, make_peer, num_branches: int):
        super().__init__()
        self.peers = nn.ModuleList(make_peer() for _ in range(num_branches))

    def compile_units(self) -> list[nn.Module]:
        return [unit for p in self.peers for unit in p.compile_units()]

    def forward(self, x: Tensor) -> BranchOutput:
        return BranchOutput([p(x).logits[0] for p in self.peers], [])


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
