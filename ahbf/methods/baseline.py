"""The baseline: one plain network trained with cross-entropy only."""
from __future__ import annotations

from ..kernels.graph import DistillGraph
from .base import ALL_FAMILIES, PLAIN, Method


def baseline_graph(num_branches: int = 1, detach_teacher: bool = True) -> DistillGraph:
    """A plain network: cross-entropy on its one output (the arguments are ignored: one output, no KL edges)."""
    return DistillGraph("baseline", 1, (), (0,), ())


BASELINE = Method("baseline", "Baseline", baseline_graph, True, "constant", 240 / 300, 1.0, PLAIN, ALL_FAMILIES, 1,
                  description="a plain single network, cross-entropy only")
