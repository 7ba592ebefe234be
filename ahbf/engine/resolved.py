"""What a run actually uses, written back into its config: ``config.yaml`` holds no ``auto``.

Some choices are made deep inside (the data pipeline picks its backend and image check, the optimiser
builder its SGD implementation, ``okd_loss`` its backend per call); ``record_resolved`` reads what was
chosen from the built objects, so the saved config reproduces the run on the same kind of machine.
Machine-dependent values (device, data backend, threads) are reset to ``auto`` by ``ahbf-eval``.
"""
from __future__ import annotations

import torch

from ..kernels.okd import resolve_backend
from ..pipelines import DataBundle
from .config import RunConfig
from .distributed import DistEnv
from .precision import DTYPES



def optimizer_impl(optimizer: torch.optim.Optimizer) -> str:
    """fused | foreach | loop | apex: the SGD implementation ``build_optimizer`` chose."""
    if type(optimizer).__module__.startswith("apex"):
        return "apex"
    if optimizer.defaults.get("fused"):
        return "fused"
    return "foreach" if optimizer.defaults.get("foreach") else "loop"


def device_name(env: DistEnv) -> str:
    """``cuda`` when each rank uses its local-rank GPU (what ``auto`` does under torchrun), else the device."""
    d = env.device
    if d.type == "cuda" and d.index in (None, env.local_rank):
        return "cuda"
    return str(d)


def objective_backend(cfg: RunConfig, device: torch.device) -> str:
    """The backend ``okd_loss`` picks for this run's logits (device, autocast dtype, number of branches)."""
    if cfg.objective.backend != "auto":
        return cfg.objective.backend
    dtype = DTYPES.get(cfg.train.precision) or torch.float32  # fp32: no autocast dtype
    z = [torch.empty(0, device=device, dtype=dtype)] * max(1, cfg.model.num_branches)
    return resolve_backend("auto", z, cfg.objective.eps)


def record_resolved(cfg: RunConfig, data: DataBundle, optimizer: torch.optim.Optimizer, env: DistEnv) -> RunConfig:
    """Replace every ``auto`` / data-set default of ``cfg`` (in place) by what the built run uses."""
    cfg.train.device = device_name(env)
    cfg.data.image_size = data.image_size
    # in-memory data sets (digits, CIFAR, synthetic) use no image-folder decoder; torch is what they would use
    cfg.data.backend = data.backend if data.backend in ("dali", "torch") else "torch"
    cfg.data.check_images = data.check_images
    cfg.optim.impl = optimizer_impl(optimizer)
    cfg.objective.backend = objective_backend(cfg, env.device)
    if not cfg.train.threads:
        cfg.train.threads = torch.get_num_threads()
    return cfg
