"""Export trunk + target branch (branch 0) as a plain network's state dict."""
from __future__ import annotations

from torch import Tensor, nn

from .backbones import LibraryTrunk
from .branched import MultiBranchNet, PeerNet
from .registry import create_plain


def target_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """State dict of the plain network equal to trunk + branch 0 (torchvision names for ImageNet; the library's
    names for torchvision:<name> / timm:<name> models, whose trunk and branches hold the library model as ``net``)."""
    if isinstance(model, PeerNet):
        model = model.peers[0]
    if hasattr(model, "student"):  # a method's wrapper around its network (PCL's temporal mean: Method.wrap)
        model = model.student
    if not isinstance(model, MultiBranchNet):
        raise ValueError(f"model: expected an ahbf multi-branch model, got {type(model).__name__}")
    inner = "net." if isinstance(model.trunk, LibraryTrunk) else ""
    out = {}
    for key, value in model.state_dict().items():
        for prefix in (f"trunk.{inner}", f"branches.0.{inner}"):
            if key.startswith(prefix):
                out[key[len(prefix):]] = value.detach().clone()
    return out


def export_target(model: nn.Module) -> nn.Module:
    """A plain network (``create_plain``) loaded strictly with trunk + branch 0's weights."""
    spec = model.spec
    plain = create_plain(spec["arch"], spec["num_classes"])
    plain.load_state_dict(target_state_dict(model), strict=True)
    return plain
