"""ONE (Lan et al., NeurIPS 2018; SPEC 5): identical branches on a shared trunk, a gate on the trunk output;
every branch distils from the gated ensemble."""
from __future__ import annotations

from torch import Tensor, nn

from ..kernels.graph import DistillGraph, Ensemble, KLEdge
from .base import ALL_FAMILIES, MULTI_BRANCH, Body, Method, Part, pooled


def one_graph(num_branches: int, detach_teacher: bool = True) -> DistillGraph:
    """ONE (SPEC 5): one M-way gated ensemble e; every branch distils from e (detached by default)."""
    M = num_branches
    if M < 2:
        raise ValueError(f"num_branches must be >= 2 for ONE, got {M}")
    edges = tuple(KLEdge(i, M, 1.0, detach_teacher) for i in range(M))
    return DistillGraph("one", M, (Ensemble(tuple(range(M)), 0),), tuple(range(M + 1)), edges)


class ONEGate(Part):
    """ONE's gate on the trunk output: GAP -> Linear(C, M) -> BN1d -> ReLU (softmax in the objective)."""

    def __init__(self, channels: int, num_branches: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, h: Tensor, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return [], [self.relu(self.bn(self.fc(pooled(h))))]


def parts(body: Body) -> dict[str, Part]:
    return {"gate": ONEGate(body.trunk_channels, body.num_branches)}


ONE = Method("one", "ONE", one_graph, True, "consistency", 80 / 300, 1.0, MULTI_BRANCH, ALL_FAMILIES, 2,
             description="identical branches on a shared trunk; every branch distils from their gated ensemble",
             parts=parts)
