"""DML (Zhang et al., CVPR 2018; SPEC 5): M independent networks, each distils from the others."""
from __future__ import annotations

from ..kernels.graph import DistillGraph, KLEdge
from .base import ALL_FAMILIES, PEERS, Method


def dml_graph(num_branches: int, detach_teacher: bool = True) -> DistillGraph:
    """DML (SPEC 5): each peer gets the mean over the others of KL_T(peer || other) (others detached by default)."""
    M = num_branches
    if M < 2:
        raise ValueError(f"num_branches must be >= 2 for DML, got {M}")
    w = 1.0 / (M - 1)
    edges = tuple(KLEdge(i, j, w, detach_teacher) for i in range(M) for j in range(M) if i != j)
    return DistillGraph("dml", M, (), tuple(range(M)), edges)


DML = Method("dml", "DML", dml_graph, True, "constant", 240 / 300, 1.0, PEERS, ALL_FAMILIES, 2,
             description="M independent networks, each distils from the mean of the KLs to the others")
