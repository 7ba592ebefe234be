"""KDCL (Guo et al., CVPR 2020): M independent networks distil from one soft target built from all of them."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..kernels.graph import DistillGraph, Ensemble, KLEdge
from ..kernels.reference import compute_dtype
from .base import PEERS, Method, branch_names, check_branches

VARIANTS = ("minlogit", "naive")  # objective.kdcl_target


def kdcl_graph(num_branches: int, detach_teacher: bool = True, variant: str = "minlogit") -> DistillGraph:
    """KDCL (Guo et al. 2020): every peer distils from one soft target built from all peers' logits.

    ``minlogit``: the target is an extra input node M (``min_m (z^m - z^m_y)``, built by the task from the
    labels, a constant); ``naive``: the target is the peers' mean logits (an equal-weight ensemble).
    """
    M = num_branches
    check_branches("kdcl", M, 2)
    edges = tuple(KLEdge(i, M, 1.0, detach_teacher) for i in range(M))
    if variant == "minlogit":
        return DistillGraph("kdcl", M + 1, (), tuple(range(M)), edges, branch_names(M) + ("minlogit",))
    if variant == "naive":
        ens = (Ensemble(tuple(range(M)), None),)
        return DistillGraph("kdcl", M, ens, tuple(range(M)), edges, branch_names(M) + ("peer_mean",))
    raise ValueError(f"kdcl variant: unknown value {variant!r}; choose from {', '.join(VARIANTS)}")


def minlogit_target(z: Sequence[Tensor], labels: Tensor) -> Tensor:
    """KDCL-MinLogit soft target (a constant): ``min_m (z^m - z^m[label])``, every peer's logits shifted so
    that the label logit is 0, then the class-wise minimum over peers. Computed in the math dtype, returned
    in the logits' dtype."""
    with torch.no_grad():
        dt = compute_dtype(z[0])
        stacked = torch.stack([zi.to(dt) for zi in z])                          # M x B x K
        shifted = stacked - stacked.gather(2, labels.long().view(1, -1, 1).expand(len(z), -1, 1))
        return shifted.amin(0).to(z[0].dtype)


def label_target(graph: DistillGraph) -> Callable[[Sequence[Tensor], Tensor], Tensor] | None:
    """The MinLogit graph's last input node is built from the labels (training only); the naive one has none."""
    return minlogit_target if graph.names[-1:] == ("minlogit",) else None


KDCL = Method("kdcl", "KDCL", kdcl_graph, True, "constant", 240 / 300, 1.0, PEERS, ("resnet",), 2,
              (("variant", "kdcl_target"),),
              "M independent networks distil from one soft target built from all (MinLogit)",
              label_target=label_target)
