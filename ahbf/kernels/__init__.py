"""The OKD objective: distillation graph, eager reference, fused kernels."""
from .graph import DistillGraph, Ensemble, KLEdge, ahbf_graph, baseline_graph, build_graph, dml_graph, one_graph
from .okd import BACKENDS, okd_loss
from .reference import all_node_logits, check_inputs, ensemble_logits, kl_t, okd_objective_reference

__all__ = ["DistillGraph", "Ensemble", "KLEdge", "ahbf_graph", "baseline_graph", "build_graph", "dml_graph",
           "one_graph", "all_node_logits", "check_inputs", "ensemble_logits", "kl_t", "okd_objective_reference",
           "BACKENDS", "okd_loss"]
