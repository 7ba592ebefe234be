"""OKDDip (Chen et al., AAAI 2020), as ``train_GL.py`` trains it: a group leader and M-1 auxiliary peers; each
peer distils from its own attention ensemble of the peers, the leader from the peers' mean."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.graph import DistillGraph, Ensemble, KLEdge
from .base import MULTI_BRANCH, Body, Method, Part, branch_names, check_branches, pooled


def okddip_graph(num_branches: int, detach_teacher: bool = False) -> DistillGraph:
    """OKDDip (``train_GL.py``): branch 0 is the group leader, branches 1..M-1 the auxiliary peers.

    Peer i distils from its own attention ensemble of all peers (score tensor i-1: the B x (M-1)
    attention energies of peer i, softmaxed here); the leader distils from the peers' mean. CE on every
    branch; the public code detaches no target.
    """
    M = num_branches
    check_branches("okddip", M, 3)
    peers = tuple(range(1, M))
    ensembles = [Ensemble(peers, k) for k in range(M - 1)] + [Ensemble(peers, None)]
    edges = tuple(KLEdge(i, M + i - 1, 1.0, detach_teacher) for i in peers) + (KLEdge(0, 2 * M - 1, 1.0, detach_teacher),)
    names = branch_names(M) + tuple(f"peer_target{i}" for i in peers) + ("peer_mean",)
    return DistillGraph("okddip", M, tuple(ensembles), tuple(range(M)), edges, names)


class PeerAttention(Part):
    """OKDDip: query/key projections (C -> C/factor, no bias) of each peer's pooled features; returns
    one B x P energy tensor per peer, ``energy[i][:, j] = <q_i, k_j>`` (softmaxed by the objective). The
    leader (branch 0) is not a peer."""

    def __init__(self, channels: int, factor: int = 8):
        super().__init__()
        self.query = nn.Linear(channels, max(1, channels // factor), bias=False)
        self.key = nn.Linear(channels, max(1, channels // factor), bias=False)

    def forward(self, h: Tensor, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        x = torch.stack([pooled(f) for f in feats[1:]], dim=1)  # B x P x C
        energy = torch.bmm(self.query(x), self.key(x).transpose(1, 2))  # B x P x P
        return [], list(energy.unbind(1))


def parts(body: Body) -> dict[str, Part]:
    return {"attention": PeerAttention(body.branch_channels[0])}


OKDDIP = Method("okddip", "OKDDip", okddip_graph, False, "consistency", 80 / 300, 1.0, MULTI_BRANCH, ("resnet",), 3,
                description="a leader and M-1 peers; each peer distils from its own attention ensemble of the peers",
                parts=parts)
