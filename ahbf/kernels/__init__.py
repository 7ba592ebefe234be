"""The OKD objective: distillation graph, eager reference, fused kernels."""
from .graph import DistillGraph, Ensemble, KLEdge
from .okd import BACKENDS, okd_loss
from .reference import all_node_logits, check_inputs, ensemble_logits, kl_t, okd_objective_reference

__all__ = ["DistillGraph", "Ensemble", "KLEdge", "all_node_logits", "check_inputs", "ensemble_logits", "kl_t",
           "okd_objective_reference", "BACKENDS", "okd_loss"]
