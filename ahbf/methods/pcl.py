"""PCL (Wu & Gong, AAAI 2021): branches + a peer-ensemble head, and their temporal mean (an EMA copy of the
network) as peer mean teachers."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..kernels.graph import DistillGraph, Ensemble, KLEdge
from .base import MULTI_BRANCH, Body, Method, Part, branch_names, check_branches, mean_node, pooled

TARGETS = ("mean_logits", "mean_kl")  # objective.pcl_target


def pcl_graph(num_branches: int, detach_teacher: bool = True, target: str = "mean_logits") -> DistillGraph:
    """PCL (Wu & Gong 2021). Inputs: M peers, the peer-ensemble head (node M), the M temporal-mean (EMA)
    peers (nodes M+1..2M, constants from the model). CE on the peers and the head; each peer distils from
    the head (L_pe) and from the other peers' EMA logits (L_pm, the peer mean teacher): ``mean_logits``,
    one KL to the mean of their logits; ``mean_kl``, the mean of one KL to each (the public reproduction)."""
    M = num_branches
    check_branches("pcl", M, 2)
    if target not in TARGETS:
        raise ValueError(f"pcl target: unknown value {target!r}; choose from {', '.join(TARGETS)}")
    ema = [M + 1 + i for i in range(M)]
    edges = tuple(KLEdge(i, M, 1.0, detach_teacher) for i in range(M))
    names = branch_names(M) + ("peer_ensemble",) + tuple(f"ema_branch{i}" for i in range(M))
    if target == "mean_kl":
        w = 1.0 / (M - 1)
        edges += tuple(KLEdge(i, ema[j], w, True) for i in range(M) for j in range(M) if j != i)
        return DistillGraph("pcl", 2 * M + 1, (), tuple(range(M + 1)), edges, names)
    ensembles: list[Ensemble] = []
    teachers = [mean_node(tuple(ema[j] for j in range(M) if j != i), ensembles, 2 * M + 1) for i in range(M)]
    edges += tuple(KLEdge(i, t, 1.0, True) for i, t in enumerate(teachers))
    names += tuple(f"peer_mean_teacher{i}" for i in range(M) if teachers[i] > 2 * M)
    return DistillGraph("pcl", 2 * M + 1, tuple(ensembles), tuple(range(M + 1)), edges, names)


class EnsembleHead(Part):
    """PCL's peer-ensemble teacher: a classifier on the concatenated pooled features of all peers; its logits
    are the input node after the branches'."""

    def __init__(self, channels: int, num_branches: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels * num_branches, num_classes)

    def forward(self, h: Tensor, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return [self.fc(torch.cat([pooled(f) for f in feats], dim=1))], []


def parts(body: Body) -> dict[str, Part]:
    return {"head": EnsembleHead(body.branch_channels[0], body.num_branches, body.num_classes)}


class TemporalMeanNet(nn.Module):
    """PCL: a multi-branch student plus its temporal mean (an EMA copy that never gets gradients).

    Forward returns the student's M peer logits, its peer-ensemble logits, then the EMA network's M peer
    logits (computed without autograd): the input nodes of ``pcl_graph``. ``update_ema(decay)`` (called by
    the task after each optimiser step) sets ``ema = a * ema + (1 - a) * student`` for the parameters, with
    the mean-teacher warm-up ``a = min(decay, 1 - 1 / (updates + 1))``; the EMA network's BatchNorm statistics
    come from its own forward passes. The EMA weights and the update count are buffers / parameters of this
    module, so checkpoints and resumes carry them."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student, self.num_branches = student, len(student.branches)
        self.ema = copy.deepcopy(student)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def compile_units(self) -> list[nn.Module]:
        return [*self.student.compile_units(), *self.ema.compile_units()]

    def forward(self, x: Tensor):
        out = self.student(x)
        with torch.no_grad():
            ema = self.ema(x).logits[: self.num_branches]
        return type(out)([*out.logits, *ema], out.scores)

    @torch.no_grad()
    def update_ema(self, decay: float = 0.999) -> None:
        ema, student = list(self.ema.parameters()), list(self.student.parameters())
        n = self.ema_updates.to(torch.float64)
        a = torch.clamp(1.0 - 1.0 / (n + 1.0), max=decay).to(ema[0].dtype)  # on device: no host sync
        torch._foreach_mul_(ema, a)
        torch._foreach_add_(ema, torch._foreach_mul(student, 1.0 - a))
        self.ema_updates += 1


def after_step(model: nn.Module, objective) -> None:
    """The EMA update after each optimiser step (``model``: the evaluation forward, the network itself or a
    torch.compile wrapper that forwards attributes to it)."""
    model.update_ema(objective.ema_decay)


PCL = Method("pcl", "PCL", pcl_graph, True, "consistency", 80 / 300, 1.0, MULTI_BRANCH, ("resnet",), 2,
             (("target", "pcl_target"),),
             "branches + a peer-ensemble head + their temporal mean (EMA) network as peer teachers",
             parts=parts, wrap=TemporalMeanNet, after_step=after_step)
