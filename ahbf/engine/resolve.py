"""Every ``auto`` of a run is decided here, so ``config.yaml`` records what actually ran: no ``auto`` is left but
a given ``train.resume: auto``, which ``RunState.resume`` decides when it claims the folder.

Two phases: ``resolve`` (``build_run``, or the CLI before ``build_resolved``) and ``record_built`` (``build_resolved``):

- ``resolve`` (before anything is built): the SPEC defaults of the model and the objective, the precision,
  threads, the scaled peak learning rate (and ``schedule.min_lr`` checked against it), the run folder
  (``train.output``) and, under a torchrun restart, ``train.resume``;
- ``record_built`` (after the data and the optimiser are built): what they chose inside (the data
  backend, image size and image check, the SGD implementation, the objective backend ``okd_loss`` picks).

Configs are immutable: each phase returns a new one, and ``Run.cfg`` is the last. A recorded config used on
another machine (``ahbf-eval``, ``--resume <run folder>``) chooses again what the machine decides
(``rechoose_machine``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch

from ..kernels.graph import DistillGraph
from ..kernels.okd import choose_backend
from ..methods import PLAIN, get_method
from ..models import backbones, default_aux
from ..pipelines import DataBundle
from .config import ConfigError, ModelConfig, ObjectiveConfig, RunConfig, TrainConfig
from .distributed import DistEnv, any_rank, default_threads
from .fault import restart_count
from .precision import DTYPES, param_dtype, resolve_precision
from .rundir import restart_resume, shared_output
from .schedules import scaled_lr


def resolve(cfg: RunConfig, env: DistEnv) -> RunConfig:
    """Phase 1: every value decided from the config and the machine; then the run folder."""
    return resolve_folder(resolve_values(cfg, env), env)


def resolve_values(cfg: RunConfig, env: DistEnv) -> RunConfig:
    """SPEC defaults, precision, threads; ``ConfigError`` for what cannot run here (no files, no collectives)."""
    precision = resolve_precision(cfg.train.precision, env.device)
    cfg = method_defaults(cfg).replace(train={"precision": precision, "threads": cfg.train.threads or default_threads()},
                                       data={"dtype": image_dtype(precision, cfg.data.dtype)})
    if cfg.objective.backend == "triton" and env.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"objective.backend=triton needs a CUDA device (this run is on {env.device}); "
                          "use compiled or eager")
    peak_lr(cfg, env.world_size)  # checks schedule.min_lr against the lr the schedule will really use
    return cfg


def image_dtype(precision: str, dtype: str) -> str:
    """``data.dtype`` for a resolved precision: float64 images for fp64 weights; otherwise the configured dtype,
    but never float64 (a recorded fp64 run evaluated or continued in fp32)."""
    if precision == "fp64":
        return "float64"
    return "float32" if dtype == "float64" else dtype


def rechoose_machine(cfg: RunConfig) -> RunConfig:
    """A recorded (resolved) config on another machine: device, threads and the data backend are chosen again,
    and an objective backend or SGD implementation this machine lacks (Triton without CUDA, apex) goes back to
    ``auto``; a choice that runs here (e.g. an explicit eager objective) is kept."""
    triton_here = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    objective = "auto" if cfg.objective.backend == "triton" and not triton_here else cfg.objective.backend
    impl = "auto" if cfg.optim.impl == "apex" and importlib.util.find_spec("apex") is None else cfg.optim.impl
    return cfg.replace(train={"device": "auto", "threads": 0}, data={"backend": "auto"},
                       objective={"backend": objective}, optim={"impl": impl})


def method_defaults(cfg: RunConfig) -> RunConfig:
    """The SPEC defaults of the model and the objective (the method record's values for their ``auto``)."""
    model = resolve_model(cfg.model)
    return cfg.replace(model=model, objective=resolve_objective(cfg.objective, model.method, cfg.train.epochs))


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """Fill the 'SPEC default' values of the model config (and a torchvision / timm model's split point)."""
    split = backbones.resolve_split(cfg.arch, cfg.split) if backbones.is_library(cfg.arch) else ""  # "": fixed
    aux = default_aux(cfg.arch, cfg.method, split) if cfg.aux == "auto" else cfg.aux
    branches = 1 if get_method(cfg.method).model == PLAIN else cfg.num_branches
    return dataclasses.replace(cfg, aux=aux, num_branches=branches, split=split)


def resolve_objective(cfg: ObjectiveConfig, method: str, epochs: int | None = None) -> ObjectiveConfig:
    """Fill the method-dependent 'auto' values of the objective config from the method's record.

    ``epochs``: the run's ``train.epochs`` (an auto ``rampup`` is the method's fraction of it); None: the
    built-in default's (the demo's 30)."""
    m = get_method(method)
    epochs = TrainConfig().epochs if epochs is None else epochs
    return dataclasses.replace(
        cfg,
        kd_weight=m.kd_weight if cfg.kd_weight == "auto" else cfg.kd_weight,
        ramp=m.ramp if cfg.ramp == "auto" else cfg.ramp,
        rampup=round(m.rampup * epochs, 6) if cfg.rampup == "auto" else cfg.rampup,
        detach_teacher=m.detach if cfg.detach_teacher == "auto" else cfg.detach_teacher)


def peak_lr(cfg: RunConfig, world_size: int) -> float:
    """The schedule's peak learning rate: ``optim.lr``, scaled by the linear rule when ``optim.lr_base_batch``
    is set (global batch = ``data.batch_size`` x world size). The one place the scaled lr is computed."""
    peak = scaled_lr(cfg.optim.lr, cfg.optim.lr_base_batch, cfg.data.batch_size * world_size)
    if not 0 <= cfg.schedule.min_lr <= peak:
        scaled = f", optim.lr {cfg.optim.lr:g} scaled to the global batch" if cfg.optim.lr_base_batch else ""
        raise ConfigError(f"schedule.min_lr must be in [0, peak lr = {peak:g}{scaled}], got {cfg.schedule.min_lr}")
    return peak


def resolve_folder(cfg: RunConfig, env: DistEnv) -> RunConfig:
    """``train.output`` (config.yaml records the folder, not ``train.name``) and, under a torchrun restart,
    ``train.resume`` (``restart_resume``: continue this job's own run)."""
    given = cfg.train.resume
    (restarted,) = any_rank(restart_count() > 0)  # a node's agent started again after a crash counts from 0
    if restarted and not given:
        cfg = cfg.replace(train={"resume": "auto"})  # tentatively: a torchrun restart finds the first attempt's folder
    output = shared_output(cfg)
    resume = restart_resume(output, given, env) if restarted else cfg.train.resume
    return cfg.replace(train={"output": output, "name": "", "resume": resume})


# ----------------------------------------------------------------------- phase 2: what was built
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


def objective_backend(cfg: RunConfig, device: torch.device, graph: DistillGraph | None = None) -> str:
    """The backend ``okd_loss`` picks for this run's logits (device, autocast dtype, number of input tensors:
    the ``graph``'s, else the branches')."""
    if cfg.objective.backend != "auto":
        return cfg.objective.backend
    dtype = DTYPES.get(cfg.train.precision) or param_dtype(cfg.train.precision)  # fp32 / fp64: no autocast
    inputs = graph.num_branches if graph is not None else max(1, cfg.model.num_branches)
    z = [torch.empty(0, device=device, dtype=dtype)] * inputs
    return choose_backend("auto", z, cfg.objective.eps)


def record_built(cfg: RunConfig, data: DataBundle, optimizer: torch.optim.Optimizer, env: DistEnv,
                 graph: DistillGraph | None = None) -> RunConfig:
    """Phase 2: ``cfg`` with the ``auto`` values decided inside the built objects replaced by what they chose
    (``graph``: the method's, whose input count decides the objective backend)."""
    # in-memory data sets (digits, CIFAR, synthetic) use no image-folder decoder; torch is what they would use
    backend = data.backend if data.backend in ("dali", "torch") else "torch"
    return cfg.replace(train={"device": device_name(env)},
                       data={"image_size": data.image_size, "backend": backend, "check_images": data.check_images},
                       optim={"impl": optimizer_impl(optimizer)},
                       objective={"backend": objective_backend(cfg, env.device, graph)})
