"""Eager, unfused PyTorch objective: the correctness reference and the benchmark baseline.

Written to be obviously right, one term at a time; autograd provides the gradients. Every fused
implementation must match it to fp32 rounding (loss and every gradient).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .graph import DistillGraph


def kl_t(student: Tensor, teacher: Tensor, T: float, eps: float = 0.0) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, mean over batch.

    ``eps = 0``: exact (``log_target``). ``eps > 0``: the public code's form (AHBF, ONE, OKDDip / CL-ILR
    add 1e-7): ``q = softmax(teacher/T) + eps`` replaces the teacher probabilities, ``T^2 * sum q (log q -
    log_softmax(student/T))``, batch mean.
    """
    if eps:
        q = F.softmax(teacher / T, dim=-1) + eps
        return T * T * (q * (q.log() - F.log_softmax(student / T, dim=-1))).sum(-1).mean()
    return T * T * F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1),
                            reduction="batchmean", log_target=True)


def check_inputs(z: Sequence[Tensor], s: Sequence[Tensor], labels: Tensor, graph: DistillGraph) -> None:
    """Shape checks (no host sync): one-line ValueError naming the offending argument."""
    if len(z) != graph.num_branches:
        raise ValueError(f"logits: expected {graph.num_branches} branch tensors for {graph.name}, got {len(z)}")
    if z[0].dim() != 2:
        raise ValueError(f"logits: expected B x K tensors, got shape {tuple(z[0].shape)}")
    shape = z[0].shape
    for i, zi in enumerate(z):
        if zi.shape != shape:
            raise ValueError(f"logits: branch {i} has shape {tuple(zi.shape)}, branch 0 has {tuple(shape)}")
    widths = graph.score_widths
    if len(s) != len(widths):
        raise ValueError(f"scores: expected {len(widths)} score tensors for {graph.name}, got {len(s)}")
    for j, (sj, w) in enumerate(zip(s, widths)):
        if tuple(sj.shape) != (shape[0], w):
            raise ValueError(f"scores: s[{j}] has shape {tuple(sj.shape)}, expected ({shape[0]}, {w})")
    if labels.shape != (shape[0],):
        raise ValueError(f"labels: expected shape ({shape[0]},), got {tuple(labels.shape)}")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The objective's math dtype: float64 stays float64, everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a fused op keeps a gradient in until backward has scaled it by ``grad_output``: the math
    dtype. For fp16 that is essential (rounded to fp16 before AMP's loss scale, gradients below 6e-8 flush
    to zero); for bf16 it keeps the scaling an fp32 x fp32 multiply, rounded once, on every device."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_node_logits(z: Sequence[Tensor], s: Sequence[Tensor], graph: DistillGraph) -> list[Tensor]:
    """Every node of the graph: the branch logits followed by the ensemble (TA) logits."""
    dt = compute_dtype(z[0])
    nodes = [zi.to(dt) for zi in z]
    for ens in graph.ensembles:
        if ens.score is None:  # equal weights: the fused backends see zero scores, softmax(0) = 1/n
            nodes.append(sum(nodes[i] for i in ens.inputs) / len(ens.inputs))
            continue
        g = torch.softmax(s[ens.score].to(dt), dim=-1)
        nodes.append(sum(g[:, j:j + 1] * nodes[i] for j, i in enumerate(ens.inputs)))
    return nodes


def ensemble_logits(z: Sequence[Tensor], s: Sequence[Tensor], graph: DistillGraph) -> list[Tensor]:
    """The teacher-assistant / ensemble logits e_k, for evaluation."""
    return all_node_logits(z, s, graph)[graph.num_branches:]


def okd_objective_reference(z: Sequence[Tensor], s: Sequence[Tensor], labels: Tensor, graph: DistillGraph,
                            T: float = 3.0, kd_scale: float | Tensor = 1.0,
                            eps: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Eager objective. Returns (loss, {"ce": sum of CE terms, "kd": sum of weighted KL terms}).

    loss = ce + kd_scale * kd, where kd_scale = w(epoch) * kd_weight for AHBF (SPEC 4); ``eps``: see ``kl_t``.
    """
    check_inputs(z, s, labels, graph)
    nodes = all_node_logits(z, s, graph)
    ce = sum(F.cross_entropy(nodes[n], labels) for n in graph.ce_nodes)
    kd = nodes[0].new_zeros(())
    for e in graph.kl_edges:
        teacher = nodes[e.teacher].detach() if e.detach else nodes[e.teacher]
        kd = kd + e.weight * kl_t(nodes[e.student], teacher, T, eps)
    return ce + kd_scale * kd, {"ce": ce.detach(), "kd": kd.detach()}
