"""``build_run``: a config -> everything one training run uses, built in a fixed order.

config --resolve--> (no ``auto`` left but ``train.resume``; a new, frozen config) --> data, model, learning-rate schedule, optimiser (+ ``AmpStepper``),
task (forward + objective) --record_built--> the config that ``config.yaml`` records.

The learning rate has one path: ``resolve.peak_lr`` (``optim.lr``, linearly scaled if
``optim.lr_base_batch`` is set) -> ``LRSchedule`` -> the optimiser, which gets its lr only from the
schedule (at construction the first step's, then ``Trainer`` writes it before every step).

``build_run(cfg, env, data=bundle)`` takes a prebuilt ``DataBundle`` (e.g. a benchmark's subset); the
schedule's length is then that bundle's. ``Run.train_step`` is the step ``Trainer`` runs (and a
benchmark times).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..methods import build_graph, get_method
from ..models import create_model
from ..pipelines import DataBundle, build_data
from .compile import compile_model
from .config import ConfigError, RunConfig
from .distributed import DistEnv, convert_sync_batchnorm, local_main_first, set_threads
from .graphed import GraphedStep, capture_blockers, lr_on_device
from .optim import build_optimizer
from .precision import AmpStepper, check_cpu_bf16_convs, param_dtype
from .resolve import peak_lr, record_built, resolve
from .rundir import is_named_folder
from .schedules import LRSchedule
from .task import OKDTask


def configure_determinism(deterministic: bool) -> None:
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS at its first use
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def wrap_model(model: nn.Module, env: DistEnv, compile: str = "off", compile_mode: str = "default",
               note: Callable[[str], None] = print) -> tuple[nn.Module, nn.Module]:
    """(training forward, evaluation forward): DDP, then ``train.compile`` (model: torch.compile of the whole;
    branches: each unit compiled in place, so evaluation runs compiled too); no DDP for evaluation."""
    train = model
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        train = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    train = compile_model(train, compile, compile_mode, note)
    return train, (model if env.distributed else train)


@dataclass
class Run:
    """What ``build_run`` built. ``cfg`` is resolved (config.yaml records it); ``notes`` are for the run log."""

    cfg: RunConfig
    env: DistEnv
    data: DataBundle
    model: nn.Module
    amp: AmpStepper
    task: OKDTask
    schedule: LRSchedule
    notes: list[str] = field(default_factory=list)
    named_folder: bool = False
    """the folder was named (--name) or chosen automatically, not given with -o: ``runs/latest`` points at it"""
    graphed: GraphedStep | None = None
    """``train.cuda_graph``: the step replayed as a CUDA graph (``ahbf.engine.graphed``)"""

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Forward + objective, then backward and the optimiser step; returns the loss terms (device tensors).
        Under ``train.cuda_graph`` one graph replay (static terms, overwritten by the next step)."""
        return self.eager_step(x, y) if self.graphed is None else self.graphed(x, y)

    def eager_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        terms = self.task(x, y)
        self.amp.step(terms["loss"])
        self.task.after_step()  # PCL: EMA update (its weights live in the model's state dict)
        return terms

    def close(self) -> None:
        self.data.close()  # worker processes end with the run, not at interpreter exit


def build_run(cfg: RunConfig, env: DistEnv, data: DataBundle | None = None) -> Run:
    """Resolve ``cfg`` and build the run; ``data``: a prebuilt bundle instead of ``cfg.data``'s."""
    return build_resolved(resolve(cfg, env), env, data, named_folder=is_named_folder(cfg))


def input_notes(cfg: RunConfig, data: DataBundle, env: DistEnv) -> list[str]:
    """Inputs a run cannot train on (``ConfigError``), and those it trains on otherwise than the user may think
    (one note each, for the log)."""
    n, batch = data.train.num_samples, cfg.data.batch_size
    if n < 2:
        raise ConfigError(f"each of the {env.world_size} processes gets {n} training sample(s); BatchNorm needs 2 "
                          "per step: use more data or fewer processes")
    if data.num_classes < 2:
        raise ConfigError(f"data set {cfg.data.dataset} has {data.num_classes} class (its top-1 would be 100% by "
                          f"construction): a classifier needs at least 2{' (one folder per class)' if cfg.data.root else ''}")
    notes = []
    if batch > n:
        notes.append(f"note: the batch ({batch} per process) is larger than the training split ({n} samples per "
                     f"process): each epoch is one step of {n}, and a scaled lr assumes full batches")
    if str(cfg.train.checkpoint_every).strip() == "0":
        notes.append("note: train.checkpoint_every 0 means off: last.pt is written at epoch ends only")
    if cfg.train.compile != "off" and env.device.type == "cpu":
        notes.append(f"note: train.compile={cfg.train.compile} on a CPU: the first step compiles (10-100 s) and compiled "
                     "steps measured slower than eager (inductor's BatchNorm code; docs/benchmarks.md, Compile modes)")
    return notes


def build_resolved(cfg: RunConfig, env: DistEnv, data: DataBundle | None = None,
                   named_folder: bool = False) -> Run:
    """Build the run of a config that ``resolve`` returned (``ahbf-train`` keeps it: it names the run folder)."""
    t, m = cfg.train, cfg.model
    set_threads(t.threads)  # before any work
    configure_determinism(t.deterministic)
    if data is None:
        with local_main_first(env, enabled=cfg.data.download):  # one download per node, not one per rank
            data = build_data(cfg.data, rank=env.rank, world_size=env.world_size, device=env.device)
    notes: list[str] = input_notes(cfg, data, env)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    model = create_model(m.arch, m.method, data.num_classes, m.num_branches, m.aux, split=m.split)
    model = model.to(env.device, param_dtype(t.precision))
    check_cpu_bf16_convs(model, data.image_size, env.device, t.precision, m.arch)
    if t.sync_bn and env.distributed:
        convert_sync_batchnorm(model)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    schedule = LRSchedule(cfg.schedule, peak_lr(cfg, env.world_size), t.epochs, len(data.train))
    optimizer = build_optimizer(model.parameters(), cfg.optim, env.device, t.precision == "fp16", lr=schedule(0, 0))
    amp = AmpStepper(optimizer, model.parameters(), env.device, t.precision, cfg.optim.clip_grad)
    train_fwd, eval_fwd = wrap_model(model, env, t.compile, t.compile_mode, notes.append)
    method = get_method(m.method)
    graph = build_graph(method, m.num_branches, cfg.objective)
    task = OKDTask(train_fwd, graph, cfg.objective, amp.autocast, eval_model=eval_fwd, method=method)
    cfg = record_built(cfg, data, optimizer, env, graph)  # config.yaml: what actually runs, no 'auto'
    run = Run(cfg, env, data, model, amp, task, schedule, notes, named_folder)
    if t.cuda_graph:
        run.graphed = graphed_step(run)
    return run


def graphed_step(run: Run) -> GraphedStep | None:
    """``train.cuda_graph``: the captured step where it can be (CUDA), the same static-buffer step uncaptured
    on a CPU, else None (the eager step) with a note saying why."""
    t, env = run.cfg.train, run.env
    blockers = capture_blockers(env.device, t.precision, env.world_size, run.amp.optimizer, t.compile_mode)
    if blockers and not (env.device.type != "cuda" and len(blockers) == 1):
        run.notes.append("train.cuda_graph: not captured (" + "; ".join(blockers) + "): the eager step runs")
        return None
    if blockers:
        run.notes.append(f"train.cuda_graph: {blockers[0]}")
    lr_on_device(run.amp.optimizer, env.device)
    run.task.kd_on_device(env.device, param_dtype(t.precision))
    return GraphedStep(run.eager_step, env.device, capture=not blockers, note=run.notes.append,
                       reset=lambda: run.amp.optimizer.zero_grad(set_to_none=True))
