"""CL-ILR (Song & Chai 2018), as ``DefangChen/OKDDip`` trains it (``train_one.py --avg --bpscale``): identical
branches, the trunk's gradient scaled by 1/M; each branch distils from the mean of the others' logits."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.graph import DistillGraph, Ensemble, KLEdge
from .base import MULTI_BRANCH, Body, Method, Part, branch_names, check_branches, mean_node


def cl_ilr_graph(num_branches: int, detach_teacher: bool = False) -> DistillGraph:
    """CL-ILR (DefangChen/OKDDip ``train_one.py --avg``): each branch distils from the mean of the others'
    logits; the public code does not detach that target. No CE on the targets."""
    M = num_branches
    check_branches("cl_ilr", M, 2)
    ensembles: list[Ensemble] = []
    targets = [mean_node(tuple(j for j in range(M) if j != k), ensembles, M) for k in range(M)]
    edges = tuple(KLEdge(k, t, 1.0, detach_teacher) for k, t in enumerate(targets))
    names = branch_names(M) + tuple(f"mean_others{k}" for k in range(M) if targets[k] >= M)
    return DistillGraph("cl_ilr", M, tuple(ensembles), tuple(range(M)), edges, names)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``scale`` (CL-ILR's backprop rescaling by 1/M)."""
    return _ScaleGrad.apply(x, scale)


class ILR(Part):
    """The script's ``ILR`` function, where it places it: on the trunk output, before the branches, the
    gradient reaching the trunk is scaled by 1/M. No parameters."""

    def __init__(self, num_branches: int):
        super().__init__()
        self.scale = 1.0 / num_branches

    def enter(self, h: Tensor) -> Tensor:
        return scale_grad(h, self.scale)

    def forward(self, h: Tensor, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return [], []

    def compile_units(self) -> list[nn.Module]:
        return []


def parts(body: Body) -> dict[str, Part]:
    return {"ilr": ILR(body.num_branches)}


CL_ILR = Method("cl_ilr", "CL-ILR", cl_ilr_graph, False, "consistency", 80 / 300, 1.0, MULTI_BRANCH, ("resnet",), 2,
                description="identical branches, 1/M trunk gradient; each distils from the mean of the others' logits",
                parts=parts)
