"""Load the AHBF reference code's VGG / DenseNet / MobileNetV2 weights (``vgg_ahbf.py``,
``densenet_ahbf.py``, ``mobile_ahbf.py``) into ahbf's models: a key-renaming table per family."""
from __future__ import annotations

import re

from torch import Tensor, nn

FUSION = {"conv1": "conv", "bn1": "bn", "control_v1": "fc", "bn_v1": "bn_s"}
VGG_STEM = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4"}


def _fusion(key: str, first: int) -> str | None:
    m = re.fullmatch(r"afm_(\d+)\.(\w+)\.(.+)", key)
    return f"fusions.{int(m[1]) - first}.{FUSION[m[2]]}.{m[3]}" if m and m[2] in FUSION else None


def _vgg(key: str) -> str | None:
    if m := re.fullmatch(r"(conv1|bn1|conv2|bn2)\.(.+)", key):
        return f"trunk.layer0.{VGG_STEM[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"layer([123])\.(.+)", key):
        return f"trunk.layer{m[1]}.{m[2]}"
    if m := re.fullmatch(r"layer3_(\d+)\.(.+)", key):
        return f"branches.{m[1]}.layer4.{m[2]}"
    if m := re.fullmatch(r"classifier3_(\d+)\.(.+)", key):
        return f"branches.{m[1]}.classifier.{m[2]}"
    return _fusion(key, 0)


def _densenet(key: str) -> str | None:
    if key.startswith("features."):
        return "trunk." + key[len("features."):]
    for pattern, name in [(r"layer3_(\d+)\.(.+)", "denseblock3"), (r"norm_final_(\d+)\.(.+)", "norm"),
                          (r"classifier3_(\d+)\.(.+)", "classifier")]:
        if m := re.fullmatch(pattern, key):
            return f"branches.{m[1]}.{name}.{m[2]}"
    return _fusion(key, 1)  # the reference numbers its DenseNet fusions from 1


def _mobilenet(key: str) -> str | None:
    if key.startswith(("conv1.", "blocks.")):
        return "trunk." + key
    if m := re.fullmatch(r"block([45])_(\d+)\.(.+)", key):  # branch 0's are the shared ones (docs/models.md)
        return f"trunk.block{m[1]}.{m[3]}" if m[2] == "0" else f"branches.{m[2]}.unused_block{m[1]}.{m[3]}"
    if m := re.fullmatch(r"block6_(\d+)\.(.+)", key):
        return f"branches.{m[1]}.block6.{m[2]}"
    if m := re.fullmatch(r"classifier_(\d+)\.0\.(.+)", key):
        return f"branches.{m[1]}.classifier.{m[2]}"
    return _fusion(key, 0)


RENAME = {"vgg": _vgg, "densenet": _densenet, "mobilenetv2": _mobilenet}


def from_reference(state_dict: dict[str, Tensor], family: str) -> dict[str, Tensor]:
    """The reference model's state dict (AHBF model, any M and aux) renamed to ahbf's keys."""
    if family not in RENAME:
        raise ValueError(f"family: the reference's weights map for {sorted(RENAME)}, got {family!r}")
    out = {}
    for key, value in state_dict.items():
        new = RENAME[family](key.removeprefix("module."))  # also a DataParallel checkpoint
        if new is None:
            raise ValueError(f"state_dict: {key!r} is not a key of the reference's {family} AHBF model")
        out[new] = value
    return out


def load_reference(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Load the reference's weights into an ``ahbf`` model of the same arch, M and aux (strict)."""
    from .registry import get_arch

    model.load_state_dict(from_reference(state_dict, get_arch(model.spec["arch"]).family), strict=True)
    return model
