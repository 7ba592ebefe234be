"""The loop the paper's code runs, for benchmarks/bench_engine.py's ``paper`` row: fp32, NCHW, the eager
objective written term by term as the papers' training scripts write it (AHBF: its hierarchy pairing; the
reference script's 1e-7 on the teacher probabilities), plain ``torch.optim.SGD``, ``loss.item()`` every step."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from ahbf.models import create_model

if TYPE_CHECKING:
    from bench_engine import ModelCase

T, KD_WEIGHT, RAMP = 3.0, 1.5, 0.5  # the paper's T and kd_weight, the ramp at its end (kd_scale 0.75)


def kl_paper(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The reference script's KL criterion: T^2 * KLdiv(log_softmax(s/T), softmax(t/T) + 1e-7), batchmean."""
    return F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher / T, 1) + 1e-7, reduction="batchmean") * T * T


def paper_objective(method: str, z: list[torch.Tensor], s: list[torch.Tensor], y: torch.Tensor,
                    kd_scale: float = KD_WEIGHT * RAMP) -> torch.Tensor:
    """The objective as the papers' training scripts write it, term by term (AHBF: its hierarchy pairing)."""
    loss = sum(F.cross_entropy(zi, y) for zi in z)
    if method == "ahbf":  # ensembles e_k = g0 * (e_{k-1} or z_0) + g1 * z_{k+1}, built in the model there
        e, prev = [], z[0]
        for k, sk in enumerate(s):
            g = F.softmax(sk, 1)
            prev = g[:, :1] * prev + g[:, 1:] * z[k + 1]
            e.append(prev)
        loss = loss + sum(F.cross_entropy(ek, y) for ek in e)
        for i in range(len(z) - 1):
            if i == 0:
                kd = kl_paper(z[0], z[1]) + kl_paper(z[0], e[0]) + kl_paper(z[1], e[0])
            else:
                kd = kl_paper(e[i - 1], z[i + 1]) + kl_paper(z[i + 1], e[i]) + kl_paper(e[i - 1], e[i])
            loss = loss + kd_scale * kd
    elif method == "one":
        g = F.softmax(s[0], 1)
        e = sum(g[:, i:i + 1] * zi for i, zi in enumerate(z))
        loss = loss + F.cross_entropy(e, y) + kd_scale * sum(kl_paper(zi, e.detach()) for zi in z)
    elif method == "dml":
        loss = loss + kd_scale * sum(kl_paper(zi, zj.detach()) for i, zi in enumerate(z) for j, zj in enumerate(z)
                                     if i != j) / (len(z) - 1)
    return loss


class PaperLoop:
    """fp32, NCHW, eager objective, plain SGD, ``loss.item()`` every step."""

    name = "paper"

    def __init__(self, case: "ModelCase", classes: int, device: torch.device, batches: Iterator):
        torch.manual_seed(0)
        self.method, self.device, self.batches = case.method, device, batches
        self.kd_scale = KD_WEIGHT * RAMP if case.method == "ahbf" else 1.0  # the engine's kd_scale at the ramp's end
        self.model = create_model(case.arch, case.method, classes, case.branches, case.aux).to(device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                         weight_decay=5e-4)
        self.losses: list[float] = []

    def step(self) -> None:
        x, y = next(self.batches)
        out = self.model(x.contiguous())
        loss = paper_objective(self.method, out.logits, out.scores, y, self.kd_scale)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())

    def close(self) -> None:
        pass
