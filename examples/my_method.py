"""An online-KD method of one's own, in one file: a feature-gated ensemble teacher (docs/methods.md).

M identical branches on a shared trunk. A gate reads every branch's pooled features and weighs the branches'
logits, per sample, into an ensemble teacher e (ONE gates on the trunk's features instead); every branch
distils from e:

    loss = sum_i CE(z_i) + CE(e) + kd_scale * sum_i KL_T(z_i || e),   e = sum_j softmax(gate)_j z_j

with e detached in the KL terms (``objective.detach_teacher = auto``). Train it with

    PYTHONPATH=examples ahbf-train --method my_method:FEATURE_GATED

The engine needs nothing else: the graph is an ensemble with a score tensor and KL edges, so the fused
Triton kernel runs it on a GPU (the compiled backend on a CPU); checkpoints record the import path.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ahbf.kernels import DistillGraph, Ensemble, KLEdge
from ahbf.methods import ALL_FAMILIES, MULTI_BRANCH, Body, Method, Part


def feature_gated_graph(num_branches: int, detach_teacher: bool = True) -> DistillGraph:
    """Nodes 0..M-1: the branches; node M: their gated ensemble (score tensor 0). CE on all of them; one KL
    edge from each branch to the ensemble."""
    M = num_branches
    if M < 2:
        raise ValueError(f"num_branches must be >= 2 for feature_gated, got {M}")
    edges = tuple(KLEdge(i, M, 1.0, detach_teacher) for i in range(M))
    names = tuple(f"branch{i}" for i in range(M)) + ("ensemble",)
    return DistillGraph("feature_gated", M, (Ensemble(tuple(range(M)), score=0),), tuple(range(M + 1)), edges, names)


class FeatureGate(Part):
    """Linear(sum of the branches' channels -> M) on the concatenated pooled branch features: the gate's
    pre-softmax scores (the objective takes the softmax and weighs the logits)."""

    def __init__(self, body: Body):
        super().__init__()
        self.fc = nn.Linear(sum(body.branch_channels), body.num_branches)

    def forward(self, h: Tensor, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pooled = torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1)
        return [], [self.fc(pooled)]


def parts(body: Body) -> dict[str, Part]:
    return {"gate": FeatureGate(body)}  # the attribute name is the state-dict prefix


FEATURE_GATED = Method(
    name="feature_gated", label="FG-Ens", graph=feature_gated_graph,
    detach=True, ramp="consistency", rampup=80 / 300, kd_weight=1.0,  # the `auto` defaults
    model=MULTI_BRANCH, families=ALL_FAMILIES, min_branches=2,
    description="identical branches; a gate on the branches' features weighs them into an ensemble teacher",
    parts=parts)
