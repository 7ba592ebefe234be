"""AHBF (SPEC 2-4): branches of increasing depth, recursively fused into a ladder of teacher assistants."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.graph import DistillGraph, Ensemble, KLEdge
from .base import ALL_FAMILIES, MULTI_BRANCH, Body, Method, Part, pooled


def ahbf_graph(num_branches: int, lambda1: float = 1.0, lambda2: float = 1.0,
               detach_teacher: bool = False) -> DistillGraph:
    """AHBF (SPEC 3-4): recursive 2-way fusions e_0..e_{M-2}; dkd edges weigh lambda2, ekd lambda1."""
    M = num_branches
    if M < 2:
        raise ValueError(f"num_branches must be >= 2 for AHBF, got {M}")
    ensembles, edges = [], []
    for k in range(M - 1):
        prev = 0 if k == 0 else M + k - 1  # z_0 at the first level, else the previous TA
        cur_branch, cur_ta = k + 1, M + k
        ensembles.append(Ensemble(inputs=(prev, cur_branch), score=k))
        edges.append(KLEdge(prev, cur_branch, lambda2, detach_teacher))        # L_dkd
        edges.append(KLEdge(prev, cur_ta, lambda1, detach_teacher))            # L_ekd
        edges.append(KLEdge(cur_branch, cur_ta, lambda1, detach_teacher))      # L_ekd
    return DistillGraph("ahbf", M, tuple(ensembles), tuple(range(2 * M - 1)), tuple(edges))


class AHBFFusion(nn.Module):
    """One AHBF module (SPEC 3, 7): (x, y) -> (f, s) with f = BN2d(Conv1x1(cat[x, y])) and
    s = ReLU(BN1d(Linear(GAP(f)))), the 2 pre-softmax importance scores of (x, y) per sample.
    ``in_channels`` is x's + y's channels when they differ (DenseNet's branches); default 2 * channels.
    The softmax over the scores and the weighted sum of logits belong to the objective (``ahbf.kernels``),
    so a fused kernel can do them in one pass."""

    def __init__(self, channels: int, in_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels or 2 * channels, channels, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 2)
        self.bn_s = nn.BatchNorm1d(2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        f = self.bn(self.conv(torch.cat([x, y], dim=1)))
        return f, self.relu(self.bn_s(self.fc(pooled(f))))


class AHBFFusions(nn.ModuleList, Part):
    """The M-1 AHBF modules: module k fuses G_{k-1} (F_0 at k = 0) with F_{k+1} into G_k and scores them."""

    def __init__(self, body: Body):
        c = body.branch_channels  # G_k has branch k+1's channels
        super().__init__(AHBFFusion(c[k + 1], c[k] + c[k + 1]) for k in range(body.num_branches - 1))

    def forward(self, h: Tensor, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        g, scores = feats[0], []
        for k, fuse in enumerate(self):
            g, s = fuse(g, feats[k + 1])
            scores.append(s)
        return [], scores

    def compile_units(self) -> list[nn.Module]:
        return list(self)


def parts(body: Body) -> dict[str, Part]:
    return {"fusions": AHBFFusions(body)}


AHBF = Method("ahbf", "AHBF", ahbf_graph, False, "sigmoid", 240 / 300, 1.5, MULTI_BRANCH, ALL_FAMILIES, 2,
              (("lambda1", "lambda1"), ("lambda2", "lambda2")),
              "branches of increasing depth, recursively fused into a ladder of teacher assistants",
              increasing_depth=True, parts=parts)
