"""Model parts of the other online-KD methods (docs/methods.md): CL-ILR's gradient rescaling,
OKDDip's peer attention, PCL's peer-ensemble head and temporal-mean (EMA) network.

As for AHBF and ONE, the softmax over attention energies and the weighted sums of logits belong to
the objective (``ahbf.kernels``), not here.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


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


def pooled(f: Tensor) -> Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)


class PeerAttention(nn.Module):
    """OKDDip: query/key projections (C -> C/factor, no bias) of each peer's pooled features; returns
    one B x P energy tensor per peer, ``energy[i][:, j] = <q_i, k_j>`` (softmaxed by the objective)."""

    def __init__(self, channels: int, factor: int = 8):
        super().__init__()
        self.query = nn.Linear(channels, max(1, channels // factor), bias=False)
        self.key = nn.Linear(channels, max(1, channels // factor), bias=False)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        x = torch.stack([pooled(f) for f in feats], dim=1)  # B x P x C
        energy = torch.bmm(self.query(x), self.key(x).transpose(1, 2))  # B x P x P
        return list(energy.unbind(1))


class EnsembleHead(nn.Module):
    """PCL's peer-ensemble teacher: a classifier on the concatenated pooled features of all peers."""

    def __init__(self, channels: int, num_branches: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels * num_branches, num_classes)

    def forward(self, feats: list[Tensor]) -> Tensor:
        return self.fc(torch.cat([pooled(f) for f in feats], dim=1))


class TemporalMeanNet(nn.Module):
    """PCL: a multi-branch student plus its temporal mean (an EMA copy that never gets gradients).

    Forward returns the student's M peer logits, its peer-ensemble logits, then the EMA network's M peer
    logits (computed without autograd): the input nodes of ``pcl_graph``. ``update_ema(decay)`` (called by
    the task after each optimiser step) sets ``ema = a * ema + (1 - a) * student`` for the parameters, with
    the mean-teacher warm-up ``a = min(decay, 1 - 1 / (updates + 1))``; the EMA network's BatchNorm statistics
    come from its own forward passes. The EMA weights and the update count are buffers / parameters of this
    module, so checkpoints and resumes carry them."""

    def __init__(self, student: nn.Module, num_branches: int):
        super().__init__()
        self.student, self.num_branches = student, num_branches
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
