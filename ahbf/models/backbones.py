"""Hierarchical branches on library models: ``torchvision:<name>`` and ``timm:<name>`` (docs/models.md).

The library model is cut before a *split stage*. The trunk is one instance of the model with the split stage
and everything after it replaced by ``nn.Identity``; branch i is another, freshly built instance (the library's
own initialisation, its own random draw) with everything *before* the split stage replaced by ``nn.Identity``,
so it runs the remaining stages, the final layers, pooling and the classifier. Module names are the library's,
so trunk + branch 0 export 1:1 onto the unmodified library model (``ahbf.models.export``).

Hierarchy (AHBF, aux > 0): level l = 1..i of branch i appends ``aux`` blocks to the branch's repeatable stages in
turn, lowest first: stage ``(l - 1) mod S`` of the S repeatable stages. This is SPEC 2's "lower stage first" rule:
with the split at ``layer3`` of a torchvision ResNet it builds exactly the branches of the registry's ImageNet
ResNets. An added block is the stage's last block taken from another fresh build of the model. A stage is
repeatable when it is an ``nn.Sequential`` of blocks (or has one as ``.blocks``) whose last block has submodules
and keeps its input's shape, or when it is itself one such block (torchvision's MobileNetV2 / V3, whose stages
are single inverted-residual blocks: a deepened one becomes an ``nn.Sequential`` of the block and its copies);
shapes are found by a forward pass on the meta device. Branch 0 never gets extra blocks.
"""
from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision import models as tvm

from ..methods import Body, Part
from .branched import MultiBranchNet
from .resnet import init_weights

LIBRARIES = ("torchvision", "timm")
CONTAINERS = ("stages", "layers", "blocks", "features")  # a child holding the stages in order
DEFAULT_AUX = 2  # SPEC 2's ImageNet default (the reference script's)


def is_library(arch: str) -> bool:
    """``torchvision:<name>`` or ``timm:<name>``."""
    return isinstance(arch, str) and arch.partition(":")[0] in LIBRARIES and ":" in arch


def parse(arch: str) -> tuple[str, str]:
    lib, _, name = arch.partition(":")
    if lib not in LIBRARIES or not name:
        raise ValueError(f"architecture {arch!r}: expected torchvision:<name> or timm:<name>")
    return lib, name


def _timm():
    try:
        import timm
    except ImportError:
        raise ImportError("timm models need the timm package: pip install ahbf[timm]") from None
    return timm


def _unknown(lib: str, name: str, known: list[str]) -> ValueError:
    near = difflib.get_close_matches(name, known, n=3)
    return ValueError(f"unknown {lib} model {name!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))


def build_library(arch: str, num_classes: int) -> nn.Module:
    """The unmodified library model with random weights (never pretrained: nothing is downloaded)."""
    lib, name = parse(arch)
    if lib == "timm":
        timm = _timm()
        if not timm.is_model(name):
            raise _unknown(lib, name, timm.list_models())
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    known = tvm.list_models(module=tvm)
    if name not in known:
        raise _unknown(lib, name, known)
    return zero_init_residual(tvm.get_model(name, weights=None, num_classes=num_classes))


def zero_init_residual(net: nn.Module) -> nn.Module:
    """torchvision's ``zero_init_residual=True`` on a ResNet: the last BatchNorm weight of every residual block is 0,
    so each block starts as the identity (timm's ResNets do this by default, ``zero_init_last``). Without it,
    AHBF branches of torchvision's resnet18 on 16 px synthetic images diverged in the first epoch (val loss 2e6,
    or a non-finite exit); with it the same run ended at val loss 2.2 (measured, fp32, 1 thread)."""
    for m in net.modules():
        if isinstance(m, tvm.resnet.Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, tvm.resnet.BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    return net


def constructor_text(arch: str, num_classes: int) -> str:
    """How to build the plain model that an exported target loads into."""
    lib, name = parse(arch)
    if lib == "timm":
        return f"timm.create_model({name!r}, num_classes={num_classes})"
    return f"torchvision.models.{name}(num_classes={num_classes})"


# ---- how each family runs its features and its head (the library's own forward, split in two)

def chain_features(net: nn.Module, x: Tensor) -> Tensor:
    """torchvision ResNet: the top-level children up to the pooling."""
    for name, module in net.named_children():
        if name == "avgpool":
            break
        x = module(x)
    return x


def pool_fc(net: nn.Module, f: Tensor) -> Tensor:
    return net.fc(torch.flatten(net.avgpool(f), 1))


def sequential_features(net: nn.Module, x: Tensor) -> Tensor:
    return net.features(x)


def pool_classifier(net: nn.Module, f: Tensor) -> Tensor:
    """MobileNetV2 / V3, EfficientNet (flatten, then classifier) and ConvNeXt (its classifier flattens)."""
    pooled = net.avgpool(f) if hasattr(net, "avgpool") else nn.functional.adaptive_avg_pool2d(f, 1)
    return net.classifier(pooled if isinstance(net, tvm.ConvNeXt) else torch.flatten(pooled, 1))


def timm_features(net: nn.Module, x: Tensor) -> Tensor:
    return net.forward_features(x)


def timm_head(net: nn.Module, f: Tensor) -> Tensor:
    return net.forward_head(f)


Family = tuple[Callable[[nn.Module, Tensor], Tensor], Callable[[nn.Module, Tensor], Tensor]]
TORCHVISION: dict[type, Family] = {
    tvm.ResNet: (chain_features, pool_fc),
    tvm.MobileNetV2: (sequential_features, pool_classifier), tvm.MobileNetV3: (sequential_features, pool_classifier),
    tvm.EfficientNet: (sequential_features, pool_classifier), tvm.ConvNeXt: (sequential_features, pool_classifier)}
SUPPORTED_TV = "ResNet / ResNeXt / Wide ResNet, MobileNetV2 / V3, EfficientNet (v1, v2), ConvNeXt"


def family(net: nn.Module, arch: str) -> Family:
    if parse(arch)[0] == "timm":
        if not (hasattr(net, "forward_features") and hasattr(net, "forward_head")):
            raise ValueError(f"{arch} is not supported: it has no forward_features / forward_head")
        return timm_features, timm_head
    for cls, fam in TORCHVISION.items():
        if isinstance(net, cls):
            return fam
    raise ValueError(f"{arch} ({type(net).__name__}) is not supported; torchvision families: {SUPPORTED_TV} "
                     "(or use timm:<name>)")


def units_and_stages(net: nn.Module, arch: str) -> tuple[list[str], list[str]]:
    """The model's modules in forward order (top-level children, the stage container expanded) and its stages:
    the items of a ``stages`` / ``layers`` / ``blocks`` / ``features`` child, else children
    named ``layer<N>``, else (timm) the top-level modules of ``feature_info``."""
    children = dict(net.named_children())
    container = next((n for n, m in children.items() if n in CONTAINERS
                      and isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) >= 2), None)
    if container:
        stages = [f"{container}.{k}" for k, _ in children[container].named_children()]
    else:
        stages = [n for n in children if re.fullmatch(r"layer\d+", n)]
        if len(stages) < 2:
            stages = [f["module"] for f in getattr(net, "feature_info", []) if f.get("module") in children]
    if len(stages) < 2:
        raise ValueError(f"{arch} is not supported: no recognizable stages (a child named {', '.join(CONTAINERS)}, "
                         "children named layer<N>, or timm feature_info)")
    units = [u for n in children for u in (stages if n == container else [n])]
    return units, stages


def last_block(stage: nn.Module) -> nn.Module:
    """The block a deeper branch repeats: the stage's last block, or the stage itself if it is one block."""
    blocks = stage_blocks(stage)
    return stage if blocks is None else blocks[-1]


def stage_blocks(stage: nn.Module) -> nn.Sequential | None:
    """The sequence of blocks of a stage: the stage itself if it is an ``nn.Sequential``, else its ``.blocks``."""
    if type(stage) is nn.Sequential:
        return stage
    blocks = getattr(stage, "blocks", None)
    return blocks if type(blocks) is nn.Sequential else None


@dataclass(frozen=True)
class Plan:
    """What a forward pass on the meta device finds out about a library model."""
    units: tuple[str, ...]
    stages: tuple[str, ...]
    splits: tuple[str, ...]  # valid split points: stages with a non-empty trunk before them
    default_split: str
    in_channels: dict  # stage -> channels of its input (the trunk's output when the split is there)
    repeatable: tuple[str, ...]  # stages whose last block can be repeated (keeps its input's shape)
    feature_channels: int


def _record(shapes: dict, name: str, module: nn.Module, args: tuple, out) -> None:
    if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
        shapes[name] = (tuple(args[0].shape), tuple(out.shape))


@functools.lru_cache(maxsize=None)
def plan(arch: str) -> Plan:
    try:
        with torch.device("meta"):
            net = build_library(arch, 10).eval()
    except (NotImplementedError, RuntimeError):  # it reads tensors while it is built (torchvision's RegNet)
        net = build_library(arch, 10).eval()
    features, head = family(net, arch)
    units, stages = units_and_stages(net, arch)
    own = [n for n, _ in [*net.named_parameters(recurse=False), *net.named_buffers(recurse=False)]]
    if own:  # e.g. a ViT's pos_embed: its forward does more than run its modules in order
        raise ValueError(f"{arch} is not supported: its forward uses tensors outside its stages ({', '.join(own)})")
    shapes: dict = {}
    hooks = [net.get_submodule(s).register_forward_hook(functools.partial(_record, shapes, s)) for s in stages]
    for s in stages:
        stage = net.get_submodule(s)
        if stage_blocks(stage) is not None and not len(stage_blocks(stage)):
            continue
        block = last_block(stage)
        if any(True for _ in block.children()):
            hooks.append(block.register_forward_hook(functools.partial(_record, shapes, s + "/last")))
    size = tuple((getattr(net, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))
    try:
        f = features(net, torch.empty(2, *size, device="meta"))
        z = head(net, f)
    except Exception as err:  # noqa: BLE001 - any failure means: not a model this module can split
        raise ValueError(f"{arch} is not supported: its stages do not run in order ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]})") from None
    finally:
        for h in hooks:
            h.remove()
    if f.dim() != 4 or f.shape[1] != getattr(net, "num_features", f.shape[1]) or tuple(z.shape) != (2, 10):
        raise ValueError(f"{arch} is not supported: its features are not a (batch, channels, height, width) map")
    params = [any(True for _ in net.get_submodule(u).parameters()) for u in units]
    splits = [s for s in stages if s in shapes and len(shapes[s][0]) == 4 and any(params[:units.index(s)])]
    if not splits:
        raise ValueError(f"{arch} is not supported: no stage has a trunk with parameters before it")
    # the stages with parameters that change the resolution: the default is the last (the lowest resolution's start)
    down = [s for s in splits if shapes[s][1][2:] != shapes[s][0][2:] and params[units.index(s)]]
    default = "layer3" if {"layer3", "layer4"} <= set(splits) else (down or splits)[-1]
    repeatable = [s for s in stages if s + "/last" in shapes and shapes[s + "/last"][0] == shapes[s + "/last"][1]]
    return Plan(tuple(units), tuple(stages), tuple(splits), default, {s: shapes[s][0][1] for s in splits},
                tuple(repeatable), int(f.shape[1]))


def resolve_split(arch: str, split: str | None) -> str:
    """``split`` checked against the model's split points; none / "" / "auto" = the family default."""
    p = plan(arch)
    if split in (None, "", "auto"):
        return p.default_split
    if split not in p.splits:
        raise ValueError(f"{arch}: unknown split point {split!r}; valid split points: {', '.join(p.splits)}")
    return split


def deeper_stages(arch: str, split: str) -> list[str]:
    """The branch's stages that AHBF's aux blocks can deepen, lowest first."""
    p = plan(arch)
    return [s for s in p.stages[p.stages.index(split):] if s in p.repeatable]


def default_aux(arch: str, split: str | None = None) -> int:
    """The depth step of branches of increasing depth: 2 (SPEC 2's ImageNet default) where the branch has a
    repeatable stage, else 0."""
    return DEFAULT_AUX if deeper_stages(arch, resolve_split(arch, split)) else 0


def extra_blocks(i: int, aux: int, stages: list[str]) -> dict[str, int]:
    """Blocks added to each stage of branch i: level l = 1..i adds ``aux`` to ``stages[(l - 1) % S]``."""
    counts = dict.fromkeys(stages, 0)
    for level in range(1, i + 1 if stages else 1):
        counts[stages[(level - 1) % len(stages)]] += aux
    return counts


def _set(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, key = name.rpartition(".")
    setattr(net.get_submodule(parent), key, module)


def _replace(net: nn.Module, names) -> nn.Module:
    for name in names:
        _set(net, name, nn.Identity())
    return net


class LibraryTrunk(nn.Module):
    """The library model up to the split (``net``; later modules are ``nn.Identity``); output: the feature map."""

    def __init__(self, net: nn.Module, features: Callable, out_channels: int):
        super().__init__()
        self.net, self.features, self.out_channels = net, features, out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.features(self.net, x)


class LibraryBranch(nn.Module):
    """The library model from the split on (earlier modules are ``nn.Identity``); returns (features, logits)."""

    def __init__(self, net: nn.Module, features: Callable, head: Callable, out_channels: int):
        super().__init__()
        self.net, self.features, self.head, self.out_channels = net, features, head, out_channels

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(self.net, h)
        return f, self.head(self.net, f)


def multi_branch(arch: str, num_classes: int, num_branches: int, aux: int,
                 parts: Callable[[Body], dict[str, Part]] | None = None, split: str | None = None) -> MultiBranchNet:
    """Trunk + ``num_branches`` branches of a library model + the method's parts (ResNet-initialised)."""
    p = plan(arch)
    split = resolve_split(arch, split)
    deeper = deeper_stages(arch, split)
    if aux and not deeper:
        raise ValueError(f"aux must be 0 for {arch} split at {split}: none of its stages after the split has a "
                         "repeatable block (docs/models.md)")
    cut = p.units.index(split)
    trunk_net = _replace(build_library(arch, num_classes), p.units[cut:])
    features, head = family(trunk_net, arch)
    branches = []
    for i in range(num_branches):
        net = _replace(build_library(arch, num_classes), p.units[:cut])
        counts = extra_blocks(i, aux, deeper)
        for s, n in counts.items():
            if n and stage_blocks(net.get_submodule(s)) is None:  # a one-block stage becomes a sequence of blocks
                _set(net, s, nn.Sequential(net.get_submodule(s)))
        for d in range(max(counts.values(), default=0)):
            donor = build_library(arch, num_classes)  # a fresh draw of the library's initialisation
            for s, n in counts.items():
                if n > d:
                    stage_blocks(net.get_submodule(s)).append(last_block(donor.get_submodule(s)))
        branches.append(LibraryBranch(net, features, head, p.feature_channels))
    model = MultiBranchNet(LibraryTrunk(trunk_net, features, p.in_channels[split]), branches, num_classes, parts)
    for part in model.method_parts():
        init_weights(part)  # as the ResNets' parts
    return model
