"""The task: forward + objective of one online-KD method, returning named loss terms.

The trainer calls ``task(x, y)`` and gets ``{"loss", "ce", "kd"}``; it never knows which method runs.
Everything method-specific (distillation graph, T, kd_weight, lambdas, KD ramp) lives here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, ContextManager

import torch
from torch import Tensor, nn

from ..kernels import all_node_logits, build_graph
from ..kernels.okd import BACKENDS, okd_loss
from ..kernels.graph import DistillGraph
from ..models import default_aux
from .config import ConfigError, ModelConfig, ObjectiveConfig
from .schedules import kd_ramp


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """Fill the 'SPEC default' values of the model config."""
    aux = default_aux(cfg.arch, cfg.method) if cfg.aux in ("auto", -1) else cfg.aux
    branches = 1 if cfg.method == "baseline" else cfg.num_branches
    return dataclasses.replace(cfg, aux=aux, num_branches=branches)


def resolve_objective(cfg: ObjectiveConfig, method: str) -> ObjectiveConfig:
    """Fill the method-dependent 'auto' values of the objective config."""
    ahbf = method == "ahbf"
    return dataclasses.replace(
        cfg,
        kd_weight=(1.5 if ahbf else 1.0) if cfg.kd_weight in ("auto", -1) else cfg.kd_weight,
        ramp=("sigmoid" if ahbf else "constant") if cfg.ramp == "auto" else cfg.ramp,
        detach_teacher=(not ahbf) if cfg.detach_teacher == "auto" else cfg.detach_teacher)


def make_graph(method: str, num_branches: int, cfg: ObjectiveConfig) -> DistillGraph:
    kw = {}
    if method != "baseline":
        kw["detach_teacher"] = resolve_objective(cfg, method).detach_teacher is True
    if method == "ahbf":
        kw.update(lambda1=cfg.lambda1, lambda2=cfg.lambda2)
    return build_graph(method, num_branches, **kw)


def objective_fn(backend: str) -> Callable:
    """``ahbf.kernels.okd.okd_loss`` with ``backend`` (auto | triton | compiled | eager) bound."""
    if backend not in BACKENDS:
        raise ConfigError(f"objective.backend: unknown value '{backend}'; choose from {', '.join(BACKENDS)}")
    return functools.partial(okd_loss, backend=backend)


class OKDTask:
    """Forward of a multi-branch model under ``autocast`` plus the OKD objective (in fp32 or the kernel's
    own precision). ``set_epoch`` sets ``kd_scale = ramp(epoch) * kd_weight`` (SPEC 4)."""

    def __init__(self, model: nn.Module, graph: DistillGraph, cfg: ObjectiveConfig,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, eval_model: nn.Module | None = None):
        self.model, self.graph, self.cfg, self.autocast = model, graph, cfg, autocast
        self.eval_model = model if eval_model is None else eval_model
        self.objective = objective_fn(cfg.backend)
        self.kd_scale = 0.0
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.kd_scale = kd_ramp(self.cfg.ramp, epoch, self.cfg.rampup) * self.cfg.kd_weight

    def __call__(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        with self.autocast():
            out = self.model(x)
        loss, terms = self.objective(out.logits, out.scores, y, self.graph, self.cfg.T, self.kd_scale)
        return {"loss": loss, **terms}

    @property
    def node_names(self) -> list[str]:
        return [self.graph.node_name(n) for n in range(self.graph.num_nodes)]

    @torch.no_grad()
    def predict(self, x: Tensor) -> list[Tensor]:
        """Logits of every node: branches (0 = target), then the TAs / ensembles."""
        with self.autocast():
            out = self.eval_model(x)
        return all_node_logits(out.logits, out.scores, self.graph)
