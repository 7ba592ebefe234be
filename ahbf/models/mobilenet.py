"""Hierarchical-branch MobileNetV2 (width 0.5, expansion 6) for CIFAR, structured as the AHBF reference's
``mobile_ahbf.py`` (``mobile_half``).

Stem 3x3/2 conv (16 channels), inverted-residual stages ``blocks.0-3`` (8, 12, 16, 32 channels; 1, 2,
3, 4 blocks), then three late stages that the branches deepen "lower stage first": branch i has
``block4`` (48 ch) with 3 + aux * ceil(i/3) blocks, ``block5`` (80 ch, stride 2) with
3 + aux * floor((i+1)/3) and ``block6`` (160 ch) with 1 + aux * floor(i/3) blocks plus a 1x1 conv to 1280
channels; then global pool and a linear classifier. The AHBF modules fuse the 1280-channel maps.

Reference quirk, followed by default: its forward runs branch 0's ``block4`` and ``block5`` for every
branch, so those two stages are in effect shared (here: part of the trunk) and the deeper ``block4`` /
``block5`` it builds for branches 1..M-1 are never used. Where the branches deepen (aux > 0, the AHBF
model; the reference's ONE model has identical branches and none) they are kept, frozen (``requires_grad=False``: they never get a gradient there either), as ``unused_block4`` /
``unused_block5``, so the parameter count matches; only ``block6`` differs between branches. Running the
shared stages M times per step also updates their BatchNorm running statistics M times; their BN
momentum is 1 - 0.9^M to match. ``multi_branch(..., shared_tail=False)`` builds the evidently intended
network instead: every branch runs its own ``block4`` .. ``block6``.
"""
from __future__ import annotations

import math
from typing import Callable

from torch import Tensor, nn

from ..methods import Body, Part
from .branched import MultiBranchNet, global_pool

EXPAND = 6
TRUNK_STAGES = ((1, 16, 1, 1), (EXPAND, 24, 2, 1), (EXPAND, 32, 3, 2), (EXPAND, 64, 4, 2))  # t, c, n, stride
TAIL_STAGES = ((96, 3, 1), (160, 3, 2), (320, 1, 1))  # c, n (before aux), stride of block4, block5, block6


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand (also for t = 1, as the reference), 3x3 depthwise, 1x1 linear projection (``conv.0-7``);
    a residual connection where the stride is 1 and the width is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def stage(cin: int, cout: int, n: int, stride: int, expand: int = EXPAND) -> nn.Sequential:
    return nn.Sequential(*(InvertedResidual(cin if i == 0 else cout, cout, stride if i == 0 else 1, expand)
                           for i in range(n)))


def tail_blocks(i: int, aux: int) -> tuple[int, int, int]:
    """Blocks of ``block4``, ``block5``, ``block6`` in branch i: aux extra blocks per level, added to the
    three stages in turn, lowest first."""
    return (TAIL_STAGES[0][1] + aux * math.ceil(i / 3), TAIL_STAGES[1][1] + aux * ((i + 1) // 3),
            TAIL_STAGES[2][1] + aux * (i // 3))


class Plan:
    """Channel plan of the late stages at a width multiplier."""

    def __init__(self, width: float):
        self.stem = int(32 * width)
        self.trunk = [int(c * width) for _, c, _, _ in TRUNK_STAGES]
        self.tail = [int(c * width) for c, _, _ in TAIL_STAGES]
        self.last = int(1280 * width) if width > 1.0 else 1280

    def stage(self, j: int, cin: int, n: int) -> nn.Sequential:
        """Late stage j (0 = block4) with n blocks; block6 ends with the 1x1 conv to ``last`` channels."""
        s = stage(cin, self.tail[j], n, TAIL_STAGES[j][2])
        if j == 2:
            s.append(conv_bn_relu(self.tail[2], self.last, 1))
        return s


class MobileTrunk(nn.Module):
    """``conv1`` + ``blocks.0-3`` (+ ``block4``, ``block5`` when the branches share them)."""

    def __init__(self, plan: Plan, shared_tail: bool):
        super().__init__()
        self.conv1 = conv_bn_relu(3, plan.stem, 3, 2)
        self.blocks, c = nn.ModuleList(), plan.stem
        for (t, _, n, s), cout in zip(TRUNK_STAGES, plan.trunk):
            self.blocks.append(stage(c, cout, n, s, t))
            c = cout
        self.shared_tail = shared_tail
        if shared_tail:
            self.block4 = plan.stage(0, c, TAIL_STAGES[0][1])
            self.block5 = plan.stage(1, plan.tail[0], TAIL_STAGES[1][1])
            c = plan.tail[1]
        self.out_channels = c

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        if self.shared_tail:
            x = self.block5(self.block4(x))
        return x


class MobileBranch(nn.Module):
    """``block4`` .. ``block6`` (only ``block6`` when the trunk holds the shared ``block4`` / ``block5``),
    global pool, ``classifier``; returns (features, logits)."""

    def __init__(self, plan: Plan, blocks: tuple[int, int, int], shared_tail: bool, num_classes: int):
        super().__init__()
        self.own_tail = not shared_tail
        if self.own_tail:
            self.block4 = plan.stage(0, plan.trunk[-1], blocks[0])
            self.block5 = plan.stage(1, plan.tail[0], blocks[1])
        self.block6 = plan.stage(2, plan.tail[1], blocks[2])
        self.classifier = nn.Linear(plan.last, num_classes)
        self.out_channels = plan.last

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        if self.own_tail:
            h = self.block5(self.block4(h))
        f = self.block6(h)
        return f, self.classifier(global_pool(f))


def init_weights(model: nn.Module) -> None:
    """As the reference: convs N(0, 2 / (k * k * out_channels)) with zero bias, BN 1 / 0, Linear N(0, 0.01) / 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def multi_branch(arch, num_classes: int, num_branches: int, aux: int,
                 parts: Callable[[Body], dict[str, Part]] | None = None, shared_tail: bool = True) -> MultiBranchNet:
    """Trunk + ``num_branches`` branches at width ``arch.width`` + the method's parts; ``shared_tail`` follows
    the reference's forward (see the module doc)."""
    plan = Plan(arch.width)
    branches = []
    for i in range(num_branches):
        blocks = tail_blocks(i, aux)
        branch = MobileBranch(plan, blocks, shared_tail, num_classes)
        if shared_tail and i > 0 and aux > 0:  # deeper branches: built by the reference's AHBF model, never run
            branch.unused_block4 = plan.stage(0, plan.trunk[-1], blocks[0]).requires_grad_(False)
            branch.unused_block5 = plan.stage(1, plan.tail[0], blocks[1]).requires_grad_(False)
        branches.append(branch)
    model = MultiBranchNet(MobileTrunk(plan, shared_tail), branches, num_classes, parts)
    init_weights(model)
    if shared_tail:  # the reference runs the shared block4 / block5 once per branch: M running-stat updates
        for m in [*model.trunk.block4.modules(), *model.trunk.block5.modules()]:
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1 - (1 - m.momentum) ** num_branches
    return model


def plain(arch, num_classes: int) -> nn.Module:
    return MobileNetV2(arch.width, num_classes)


class MobileNetV2(nn.Module):
    """The plain MobileNetV2 that trunk + branch 0 exports to: ``conv1``, ``blocks``, ``block4`` ..
    ``block6``, ``classifier``."""

    def __init__(self, width: float, num_classes: int):
        super().__init__()
        plan = Plan(width)
        trunk = MobileTrunk(plan, shared_tail=True)
        branch = MobileBranch(plan, tail_blocks(0, 0), True, num_classes)
        for name, module in [*trunk.named_children(), *branch.named_children()]:
            self.add_module(name, module)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.block6(self.block5(self.block4(x)))
        return self.classifier(global_pool(x))
