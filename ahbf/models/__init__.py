"""Multi-branch networks of every architecture family, the registry and target export."""
from .branched import BranchOutput, MultiBranchNet, PeerNet
from .export import export_target, target_state_dict
from .registry import ARCHS, create_model, create_plain, default_aux, get_arch

__all__ = ["ARCHS", "BranchOutput", "MultiBranchNet", "PeerNet", "create_model", "create_plain", "default_aux",
           "get_arch", "export_target", "target_state_dict"]
