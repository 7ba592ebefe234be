"""Model registry: a plain dict of architectures and one ``create_model`` entry point."""
from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import nn

from ..methods import PEERS, PLAIN, get_method, methods_for
from . import backbones, densenet, mobilenet, resnet, vgg
from .branched import MultiBranchNet, PeerNet
from .resnet import CifarResNet


@dataclass(frozen=True)
class Arch:
    block: str
    layers: tuple[int, ...]  # blocks (VGG: convs, DenseNet: dense layers) per stage
    imagenet: bool
    family: str = "resnet"  # resnet | vgg | densenet | mobilenetv2 (docs/models.md)
    width: float = 0  # DenseNet: growth rate; MobileNetV2: width multiplier


ARCHS: dict[str, Arch] = {
    "resnet8": Arch("basic", (1, 1, 1), False),
    "resnet14": Arch("basic", (2, 2, 2), False),
    "resnet20": Arch("basic", (3, 3, 3), False),
    "resnet32": Arch("basic", (5, 5, 5), False),
    "resnet44": Arch("basic", (7, 7, 7), False),
    "resnet56": Arch("basic", (9, 9, 9), False),
    "resnet110": Arch("bottleneck", (12, 12, 12), False),  # Bottleneck, as in the AHBF reference
    "resnet18": Arch("basic", (2, 2, 2, 2), True),
    "resnet34": Arch("basic", (3, 4, 6, 3), True),
    "resnet50": Arch("bottleneck", (3, 4, 6, 3), True),
    "vgg16": Arch("conv", (2, 2, 3, 3, 3), False, "vgg"),
    "vgg19": Arch("conv", (2, 2, 4, 4, 4), False, "vgg"),
    "densenet40_k12": Arch("dense", (6, 6, 6), False, "densenet", 12),
    "densenet100_k12": Arch("dense", (16, 16, 16), False, "densenet", 12),
    "densenet100_k40": Arch("dense", (16, 16, 16), False, "densenet", 40),
    "mobilenetv2_x0_5": Arch("inverted", (1, 2, 3, 4, 3, 3, 1), False, "mobilenetv2", 0.5),
}
FAMILIES = {"resnet": resnet, "vgg": vgg, "densenet": densenet, "mobilenetv2": mobilenet}  # modules: multi_branch()


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHS)}")
    return ARCHS[name]


def default_aux(arch: str, method: str, split: str | None = None) -> int:
    """SPEC 2, for a method whose branches deepen (``Method.increasing_depth``, AHBF): aux = 4 for CIFAR ResNets
    and 2 for ImageNet; VGG, DenseNet, MobileNetV2: 2, the reference script's default; torchvision / timm
    models: 2 where the branch has a repeatable stage, else 0 (docs/models.md). Other methods: 0 (identical
    branches)."""
    if not get_method(method).increasing_depth:
        return 0
    if backbones.is_library(arch):
        return backbones.default_aux(arch, split)
    a = get_arch(arch)
    return 2 if a.imagenet or a.family != "resnet" else 4


def create_model(arch: str, method: str = "ahbf", num_classes: int = 100, num_branches: int = 4,
                 aux: int | None = None, split: str | None = None) -> nn.Module:
    """Build the model of ``method`` (a record of ``ahbf.methods``: its model kind, families, least branch count,
    parts and wrapper).

    ``arch`` is a name of ``ARCHS`` or ``torchvision:<name>`` / ``timm:<name>``, cut before the stage ``split``
    (``ahbf.models.backbones``: every method builds on those). Every model returns ``BranchOutput(logits,
    scores)``; ``model.spec`` records the arguments (with the resolved ``split`` for torchvision / timm models).
    """
    library = backbones.is_library(arch)
    a = None if library else get_arch(arch)
    m = get_method(method)
    if split not in (None, "", "auto") and not library:
        raise ValueError(f"split applies to torchvision:<name> / timm:<name> models; {arch} has a fixed split")
    split = backbones.resolve_split(arch, split) if library else None
    if not library and a.family not in m.families:
        built = "the ResNets" if m.families == ("resnet",) else "the " + ", ".join(m.families) + " families"
        raise ValueError(f"method {method!r} is built for {built} only; {arch} takes {methods_for(a.family)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    aux = default_aux(arch, method, split) if aux is None else aux
    if aux < 0:
        raise ValueError(f"aux must be >= 0, got {aux}")
    if m.model == PLAIN:
        num_branches = 1
    elif num_branches < m.min_branches:
        raise ValueError(f"num_branches must be >= {m.min_branches} for {method}, got {num_branches}")
    elif m.model == PEERS and aux != 0:
        raise ValueError(f"aux must be 0 for {method} (identical peers), got {aux}")

    def build(n: int, parts) -> MultiBranchNet:
        if library:
            return backbones.multi_branch(arch, num_classes, n, aux, parts, split)
        return FAMILIES[a.family].multi_branch(a, num_classes, n, aux, parts)

    if m.model == PEERS:
        model = PeerNet(lambda: build(1, None), num_branches)
    else:  # MULTI_BRANCH with the method's parts (and its wrapper), or PLAIN: a one-branch network
        model = build(num_branches, m.parts)
        if m.wrap is not None:
            model = m.wrap(model)
    model.spec = dict(arch=arch, method=method, num_classes=num_classes, num_branches=num_branches, aux=aux)
    if library:
        model.spec["split"] = split
    return model


def create_plain(arch: str, num_classes: int) -> nn.Module:
    """The plain single network that a target branch exports to (torchvision's for ImageNet; the unmodified
    library model for torchvision:<name> / timm:<name>)."""
    if backbones.is_library(arch):
        return backbones.build_library(arch, num_classes)
    a = get_arch(arch)
    if a.family != "resnet":
        return FAMILIES[a.family].plain(a, num_classes)
    if a.imagenet:
        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    return CifarResNet(a.block, list(a.layers), num_classes)
