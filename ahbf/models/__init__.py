"""Hierarchical-branch networks, fusion modules, registry and target export."""
from .export import export_target, target_state_dict
from .fusion import AHBFFusion, ONEGate
from .registry import ARCHS, create_model, create_plain, default_aux, get_arch
from .resnet import BranchOutput, MultiBranchNet, PeerNet

__all__ = ["ARCHS", "AHBFFusion", "ONEGate", "BranchOutput", "MultiBranchNet", "PeerNet",
           "create_model", "create_plain", "default_aux", "get_arch", "export_target", "target_state_dict"]
