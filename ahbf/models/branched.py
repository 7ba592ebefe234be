"""The networks every method trains: a shared trunk with M branches plus the method's parts (``MultiBranchNet``),
and M independent networks (``PeerNet``). A family module (ResNet, VGG, DenseNet, MobileNetV2, torchvision /
timm backbones) builds the trunk and the branches; the method (``ahbf.methods``) builds its parts."""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import Tensor, nn

from ..methods import Body, Part


class BranchOutput(NamedTuple):
    """What every model returns (SPEC 7): the logits of the graph's input nodes (index 0 = target branch)
    and the score tensors of its gated ensembles."""

    logits: list[Tensor]
    scores: list[Tensor]


class MultiBranchNet(nn.Module):
    """Shared trunk + M branches + the method's parts (``ahbf.methods.base.Part``), each an attribute named as
    the method says (``fusions``, ``gate``, ``attention``, ``head``: its state-dict prefix).

    A trunk has ``out_channels``; a branch has ``out_channels`` and maps the trunk output to (features, logits).
    Module names: ``trunk``, ``branches.<i>``, then the parts, so trunk + branch 0 export 1:1 onto a plain
    network (``ahbf.models.export``). Forward: the trunk, each part's ``enter``, the branches, then each part
    adds logits and scores; it returns ``BranchOutput``."""

    def __init__(self, trunk: nn.Module, branches: list[nn.Module], num_classes: int,
                 parts: Callable[[Body], dict[str, Part]] | None = None):
        super().__init__()
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)
        built = parts(Body(trunk.out_channels, tuple(b.out_channels for b in branches), num_classes)) if parts else {}
        for name, part in built.items():
            self.add_module(name, part)
        self.part_names = tuple(built)

    def method_parts(self) -> list[Part]:
        """The method's parts (one set to None is left out)."""
        return [part for part in (getattr(self, name) for name in self.part_names) if part is not None]

    def compile_units(self) -> list[nn.Module]:
        """What ``train.compile=branches`` compiles, each as its own graph: trunk, branches, the parts' units."""
        return [self.trunk, *self.branches, *(unit for part in self.method_parts() for unit in part.compile_units())]

    def forward(self, x: Tensor) -> BranchOutput:
        h = self.trunk(x)
        parts = self.method_parts()
        for part in parts:
            h = part.enter(h)
        feats, logits = [], []
        for branch in self.branches:
            f, z = branch(h)
            feats.append(f)
            logits.append(z)
        scores = []
        for part in parts:
            extra, s = part(h, feats)
            logits += extra
            scores += s
        return BranchOutput(logits, scores)


class PeerNet(nn.Module):
    """M independent plain networks (peers; DML, KDCL); peer 0 is the target."""

    def __init__(self, make_peer: Callable[[], nn.Module], num_branches: int):
        super().__init__()
        self.peers = nn.ModuleList(make_peer() for _ in range(num_branches))

    def compile_units(self) -> list[nn.Module]:
        return [unit for p in self.peers for unit in p.compile_units()]

    def forward(self, x: Tensor) -> BranchOutput:
        return BranchOutput([p(x).logits[0] for p in self.peers], [])


def global_pool(h: Tensor) -> Tensor:
    """Global average pool + flatten: (B, C, H, W) -> (B, C). At the paper's 32 px the VGG and
    MobileNetV2 maps are 1x1 / 2x2 here, where the paper's view / AvgPool2d(2) compute the same."""
    return nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)
