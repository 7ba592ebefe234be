"""Hierarchical-branch VGG-16 / VGG-19 for 32 px inputs, structured as the AHBF reference's ``vgg_ahbf.py``.

Five stages of 3x3 conv + BN + ReLU, each closed by a 2x2 max-pool, with 64, 128, 256, 512, 512
channels and ``layers`` convs (VGG-16: 2, 2, 3, 3, 3; VGG-19: 2, 2, 4, 4, 4). The trunk is stages 0-3;
branch i is stage 4 with ``layers[4] + i * aux`` convs and a 512-512-K classifier with ReLU and dropout
0.5. The AHBF modules fuse the branches' 512-channel maps (1x1 at 32 px).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import Tensor, nn

from ..methods import Body, Part
from .branched import MultiBranchNet, global_pool

WIDTHS = (64, 128, 256, 512, 512)
MIN_SIZE = 32  # five 2x2 max-pools


def check_size(x: Tensor) -> None:
    if min(x.shape[-2:]) < MIN_SIZE:
        raise ValueError(f"vgg needs images of at least {MIN_SIZE} px (five 2x2 max-pools), got "
                         f"{tuple(x.shape[-2:])}: set data.image_size (--image-size) to {MIN_SIZE} or more")


def conv_stage(cin: int, cout: int, convs: int) -> nn.Sequential:
    """``convs`` x (3x3 conv with bias, BN, ReLU), then a 2x2 max-pool."""
    layers = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2, stride=2))


def classifier(num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(dropout),
                         nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(512, num_classes))


class VGGTrunk(nn.Sequential):
    """Stages 0-3 (``layer0`` .. ``layer3``), shared by all branches; 512 output channels."""

    def __init__(self, layers: tuple[int, ...]):
        stages, cin = OrderedDict(), 3
        for i, (n, w) in enumerate(zip(layers[:4], WIDTHS)):
            stages[f"layer{i}"], cin = conv_stage(cin, w, n), w
        super().__init__(stages)
        self.out_channels = cin

    def forward(self, x: Tensor) -> Tensor:
        check_size(x)
        return super().forward(x)


class VGGBranch(nn.Module):
    """Stage 4 (``layer4``) with ``convs`` convs, global pool and the classifier; returns (features, logits)."""

    def __init__(self, convs: int, num_classes: int):
        super().__init__()
        self.layer4 = conv_stage(512, 512, convs)
        self.classifier = classifier(num_classes)
        self.out_channels = 512

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        f = self.layer4(h)
        return f, self.classifier(global_pool(f))


def init_weights(model: nn.Module) -> None:
    """As the reference: Kaiming-normal (fan_out) convs with zero bias, BN 1 / 0, Linear weights N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)


def multi_branch(arch, num_classes: int, num_branches: int, aux: int,
                 parts: Callable[[Body], dict[str, Part]] | None = None) -> MultiBranchNet:
    """Trunk + ``num_branches`` branches (branch i: ``layers[4] + i * aux`` convs in stage 4) + the method's parts."""
    layers = arch.layers
    branches = [VGGBranch(layers[4] + i * aux, num_classes) for i in range(num_branches)]
    model = MultiBranchNet(VGGTrunk(layers), branches, num_classes, parts)
    init_weights(model)
    return model


def plain(arch, num_classes: int) -> nn.Module:
    return VGG(arch.layers, num_classes)


class VGG(nn.Module):
    """The plain VGG that trunk + branch 0 exports to: ``layer0`` .. ``layer4``, ``classifier``."""

    def __init__(self, layers: tuple[int, ...], num_classes: int):
        super().__init__()
        trunk, branch = VGGTrunk(layers), VGGBranch(layers[4], num_classes)
        for name, module in [*trunk.named_children(), *branch.named_children()]:
            self.add_module(name, module)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        check_size(x)
        h = self.layer4(self.layer3(self.layer2(self.layer1(self.layer0(x)))))
        return self.classifier(global_pool(h))
