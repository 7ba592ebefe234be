"""Multi-branch networks assembled from a model family's parts (VGG, DenseNet, MobileNetV2)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .fusion import ONEGate
from .resnet import MultiBranchNet


class BranchedNet(MultiBranchNet):
    """Trunk + M branches + AHBF fusions (or a ONE gate) built by a family module.

    It has ``MultiBranchNet``'s forward, module names (``trunk``, ``branches``, ``fusions``, ``gate``),
    compile units and export; only the parts are passed in instead of built as ResNet stages. A trunk
    has ``out_channels``; a branch maps the trunk output to (features, logits).
    """

    def __init__(self, trunk: nn.Module, branches: list[nn.Module], fusions: list[nn.Module] | None,
                 gate: nn.Module | None, method: str):
        nn.Module.__init__(self)  # MultiBranchNet.__init__ would build ResNet stages: the family built these
        self.method = method
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)
        self.fusions = nn.ModuleList(fusions) if fusions is not None else None
        self.gate = gate
        self.attention = self.head = None  # okddip / pcl parts: ResNets only (registry.FAMILY_METHODS)


def assemble(trunk: nn.Module, branches: list[nn.Module], method: str,
             fusion: Callable[[int], nn.Module]) -> BranchedNet:
    """The fusions of ``method``: AHBF module k = ``fusion(k)`` for ahbf, a ONE gate on the trunk for one,
    none for baseline (M = 1) and the DML peers."""
    m = len(branches)
    fusions = [fusion(k) for k in range(m - 1)] if method == "ahbf" else None
    gate = ONEGate(trunk.out_channels, m) if method == "one" else None
    return BranchedNet(trunk, branches, fusions, gate, method)


def global_pool(h):
    """Global average pool + flatten: (B, C, H, W) -> (B, C). At the paper's 32 px the VGG and
    MobileNetV2 maps are 1x1 / 2x2 here, where the paper's view / AvgPool2d(2) compute the same."""
    return nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)
