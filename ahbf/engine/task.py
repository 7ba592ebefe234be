"""The task: forward + objective of one online-KD method, returning named loss terms.

The trainer calls ``task(x, y)`` and gets ``{"loss", "ce", "kd"}``; it never knows which method runs.
Everything method-specific (distillation graph, T, kd_weight, lambdas, KD ramp, KDCL's label-built
target, PCL's EMA update after each step) lives here.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, ContextManager

import torch
from torch import Tensor, nn

from ..kernels import all_node_logits
from ..kernels.graph import DistillGraph
from ..kernels.okd import BACKENDS, TRITON_AVAILABLE, okd_loss, triton_max_branches
from ..kernels.reference import minlogit_target
from ..methods import get_method
from .config import ConfigError, ObjectiveConfig
from .resolve import resolve_objective
from .schedules import kd_ramp


def make_graph(method: str, num_branches: int, cfg: ObjectiveConfig) -> DistillGraph:
    """The method's graph: its constructor with the config values its record names (``Method.options``)."""
    m = get_method(method)
    kw = {arg: getattr(cfg, key) for arg, key in m.options}
    return m.graph(num_branches, detach_teacher=resolve_objective(cfg, method).detach_teacher is True, **kw)


def objective_fn(backend: str) -> Callable:
    """``ahbf.kernels.okd.okd_loss`` with ``backend`` (auto | triton | compiled | eager) bound, and
    ``reuse_grads``: the logits' gradients flow straight into the model's backward, never kept."""
    if backend not in BACKENDS:
        raise ConfigError(f"objective.backend: unknown value '{backend}'; choose from {', '.join(BACKENDS)}")
    return functools.partial(okd_loss, backend=backend, reuse_grads=True)


class OKDTask:
    """Forward of a multi-branch model under ``autocast`` plus the OKD objective (in fp32 or the kernel's
    own precision). ``set_epoch`` sets ``kd_scale = ramp(epoch) * kd_weight`` (SPEC 4).

    ``cfg.ce_weight`` != 1: ``ce_weight * CE + kd_scale * KD`` is computed as ``ce_weight * (CE + kd_scale /
    ce_weight * KD)`` (the same objective, no kernel change; the logged ``ce`` and ``kd`` stay the unweighted
    sums). ``cfg.eps``: the KL's teacher-probability offset, passed to the objective."""

    def __init__(self, model: nn.Module, graph: DistillGraph, cfg: ObjectiveConfig,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, eval_model: nn.Module | None = None):
        self.model, self.graph, self.cfg, self.autocast = model, graph, cfg, autocast
        self.eval_model = model if eval_model is None else eval_model
        self.objective = objective_fn(cfg.backend)
        if cfg.eps:
            self.objective = functools.partial(self.objective, eps=cfg.eps)
        # KDCL-MinLogit: the soft target is built from the labels, so it is an input of training only
        self.minlogit = graph.name == "kdcl" and graph.names[-1:] == ("minlogit",)
        slots = triton_max_branches() if cfg.backend == "auto" and torch.cuda.is_available() and TRITON_AVAILABLE else 0
        if graph.num_branches > slots > 0:
            warnings.warn(f"objective: the {graph.name} graph has {graph.num_branches} input tensors, more than the "
                          f"Triton kernel's {slots}: backend auto runs the compiled backend", stacklevel=2)
        self.kd_scale = 0.0
        self._kd_tensor: Tensor | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.kd_scale = kd_ramp(self.cfg.ramp, epoch, self.cfg.rampup) * self.cfg.kd_weight
        self._kd_arg = self.kd_scale if self.cfg.ce_weight == 1 else self.kd_scale / self.cfg.ce_weight
        if self._kd_tensor is not None:
            self._kd_arg = self._kd_tensor.fill_(self._kd_arg)

    def kd_on_device(self, device: torch.device) -> None:
        """Pass ``kd_scale`` as a 0-dim fp32 tensor on ``device`` that ``set_epoch`` fills in place (a captured
        CUDA graph reads it; the objective takes it as a float would be taken: rounded to fp32)."""
        self._kd_tensor = torch.zeros((), device=device)
        self.set_epoch(self.epoch)

    def __call__(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        with self.autocast():
            out = self.model(x)
        logits = [*out.logits, minlogit_target(out.logits, y)] if self.minlogit else out.logits
        loss, terms = self.objective(logits, out.scores, y, self.graph, self.cfg.T, self._kd_arg)
        if self.cfg.ce_weight != 1:
            loss = loss * self.cfg.ce_weight
        return {"loss": loss, **terms}

    def after_step(self) -> None:
        """Called by the trainer after each optimiser step: PCL's temporal-mean (EMA) update."""
        # the evaluation forward is the model itself, or a torch.compile wrapper that forwards attributes to it
        update = getattr(self.eval_model, "update_ema", None)
        if update is not None:
            update(self.cfg.ema_decay)

    @property
    def node_names(self) -> list[str]:
        """Every node that ``predict`` returns (not KDCL's label-built target)."""
        return [self.graph.node_name(n) for n in range(self.graph.num_nodes - int(self.minlogit))]

    @torch.no_grad()
    def predict(self, x: Tensor) -> list[Tensor]:
        """Logits of every node: branches (0 = target), then the TAs / ensembles."""
        with self.autocast():
            out = self.eval_model(x)
        return all_node_logits(out.logits, out.scores, self.graph)
