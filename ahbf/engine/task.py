"""The task: forward + objective of one online-KD method, returning named loss terms.

The trainer calls ``task(x, y)`` and gets ``{"loss", "ce", "kd"}``; it never knows which method runs. The
task holds the method's graph and objective settings (T, kd_weight, KD ramp) and calls the method's hooks
(``ahbf.methods.base.Method``: a teacher built from the labels, as KDCL's; an update after each step, as PCL's).
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
from ..methods import Method, get_method
from .config import ConfigError, ObjectiveConfig
from .schedules import kd_ramp


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
    sums). ``cfg.eps``: the KL's teacher-probability offset, passed to the objective. ``method``: whose hooks
    run (default: the method named by the graph)."""

    def __init__(self, model: nn.Module, graph: DistillGraph, cfg: ObjectiveConfig,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, eval_model: nn.Module | None = None,
                 method: Method | None = None):
        self.model, self.graph, self.cfg, self.autocast = model, graph, cfg, autocast
        self.eval_model = model if eval_model is None else eval_model
        self.method = get_method(graph.name) if method is None else method
        self.objective = objective_fn(cfg.backend)
        if cfg.eps:
            self.objective = functools.partial(self.objective, eps=cfg.eps)
        # a teacher built from the labels (KDCL-MinLogit): the last input node, in training only
        self.label_target = self.method.label_target(graph) if self.method.label_target else None
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

    def kd_on_device(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Pass ``kd_scale`` as a 0-dim tensor of the objective's math dtype (fp32; fp64 for an fp64 run) on
        ``device`` that ``set_epoch`` fills in place (a captured CUDA graph reads it; the objective takes it as
        it would take a float)."""
        self._kd_tensor = torch.zeros((), device=device, dtype=dtype)
        self.set_epoch(self.epoch)

    def __call__(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        with self.autocast():
            out = self.model(x)
        logits = [*out.logits, self.label_target(out.logits, y)] if self.label_target else out.logits
        loss, terms = self.objective(logits, out.scores, y, self.graph, self.cfg.T, self._kd_arg)
        if self.cfg.ce_weight != 1:
            loss = loss * self.cfg.ce_weight
        return {"loss": loss, **terms}

    def after_step(self) -> None:
        """Called by the trainer after each optimiser step: the method's hook (PCL's temporal-mean update)."""
        if self.method.after_step is not None:  # on the evaluation forward: the model, not a DDP wrapper
            self.method.after_step(self.eval_model, self.cfg)

    @property
    def node_names(self) -> list[str]:
        """Every node that ``predict`` returns (not a label-built target)."""
        return [self.graph.node_name(n) for n in range(self.graph.num_nodes - (self.label_target is not None))]

    @torch.no_grad()
    def predict(self, x: Tensor) -> list[Tensor]:
        """Logits of every node: branches (0 = target), then the TAs / ensembles."""
        with self.autocast():
            out = self.eval_model(x)
        return all_node_logits(out.logits, out.scores, self.graph)
