"""SGD as in SPEC 4 (momentum, Nesterov, weight decay), in the fastest implementation available."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import ConfigError, OptimConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, device: torch.device | str = "cpu",
                    grad_scaling: bool = False, lr: float | None = None) -> torch.optim.Optimizer:
    """``impl``: fused (one kernel for all parameters; CPU and CUDA in torch >= 2.4), foreach (multi-tensor),
    loop (per parameter), apex (NVIDIA apex FusedSGD, only if importable), auto (fused, else foreach).

    Under fp16 loss scaling (``grad_scaling``) ``auto`` takes foreach on every device and ``fused`` is an
    error: a step that the GradScaler skips must leave the optimiser untouched, and fused SGD breaks
    that (CPU, torch 2.14: the skipped step still writes the momentum buffer, 1e20 weights one step
    later, measured; CUDA: the fused step reads the scaler's found-inf flag inside the kernel, a path
    this project has not run, and the first skipped step leaves an uninitialised momentum buffer).

    ``lr``: the learning rate to start with. A run passes its schedule's first value (``build_run``: the
    schedule is the optimiser's only source of lr); ``None`` (direct use, tests) means ``cfg.lr``."""
    params = list(params)
    if cfg.impl == "fused" and grad_scaling:
        raise ConfigError("optim.impl=fused with fp16 loss scaling can corrupt the momentum after a skipped step; "
                          "use optim.impl=auto or foreach, or another precision")
    kw = dict(lr=cfg.lr if lr is None else lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.impl == "apex":
        try:
            from apex.optimizers import FusedSGD
        except ImportError:
            raise ConfigError("optim.impl=apex needs NVIDIA apex, which is not installed; use fused or auto") from None
        return FusedSGD(params, **kw)
    if cfg.impl == "fused" or (cfg.impl == "auto" and not grad_scaling):
        try:
            return torch.optim.SGD(params, fused=True, **kw)
        except (RuntimeError, TypeError) as err:
            if cfg.impl == "fused":
                raise ConfigError(f"optim.impl=fused is not supported here ({err}); use foreach") from None
    return torch.optim.SGD(params, foreach=cfg.impl != "loop", **kw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr; one held as a device tensor (``train.cuda_graph``) is filled in place, so a captured
    step reads the new value."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
