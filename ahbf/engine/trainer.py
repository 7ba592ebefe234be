"""The training loop: optimisation, schedules, evaluation, checkpoints and logging.

The trainer does not know which online-KD method runs: ``OKDTask`` owns the forward and the objective
and returns named loss terms. The step is three lines and never syncs with the host; the loss is read
(and checked for NaN / inf) every ``train.log_interval`` steps.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..evaluation import evaluate, format_table
from ..models import create_model
from ..pipelines import build_data
from .checkpoint import atomic_copy, atomic_save, check_spec, load_checkpoint, rng_state, set_rng_state
from .config import RunConfig
from .distributed import DistEnv, all_reduce, broadcast_buffers
from .logging import RunLogger
from .meters import LossMeter
from .optim import build_optimizer, set_lr
from .plots import plot_curves
from .precision import AmpStepper, resolve_precision
from .schedules import LRSchedule
from .task import OKDTask, make_graph, resolve_model, resolve_objective

TARGET = "branch0"


def configure_determinism(deterministic: bool) -> None:
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS at its first use
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def wrap_model(model: nn.Module, env: DistEnv, compile_model: bool) -> tuple[nn.Module, nn.Module]:
    """(training forward, evaluation forward): DDP (then torch.compile) for training; no DDP for evaluation."""
    train = model
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        train = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    if compile_model:
        train = torch.compile(train)
    return train, (model if env.distributed else train)


def resolve(cfg: RunConfig, device: torch.device) -> RunConfig:
    """Fill every 'auto' / 'SPEC default' value, so the saved config.yaml reproduces the run exactly."""
    cfg.model = resolve_model(cfg.model)
    cfg.objective = resolve_objective(cfg.objective, cfg.model.method)
    cfg.train.precision = resolve_precision(cfg.train.precision, device)
    return cfg


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv):
        self.cfg, self.env, t = resolve(cfg, env.device), env, cfg.train
        configure_determinism(t.deterministic)
        self.data = build_data(cfg.data, rank=env.rank, world_size=env.world_size, device=env.device)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        m = cfg.model
        self.model = create_model(m.arch, m.method, self.data.num_classes, m.num_branches, m.aux).to(env.device)
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(self.model.parameters(), cfg.optim, env.device, t.precision == "fp16")
        self.amp = AmpStepper(optimizer, self.model.parameters(), env.device, t.precision, cfg.optim.clip_grad)
        train_fwd, eval_fwd = wrap_model(self.model, env, t.compile)
        graph = make_graph(m.method, m.num_branches, cfg.objective)
        self.task = OKDTask(train_fwd, graph, cfg.objective, self.amp.autocast, eval_model=eval_fwd)
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, t.epochs, len(self.data.train))
        self.meter = LossMeter(env.device)
        self.log = RunLogger(t.output, env.is_main, t.tensorboard)
        self.epoch, self.step, self.history = 0, 0, []
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self._maybe_resume()  # before writing anything: a refused checkpoint leaves the folder as it was
        self.first_epoch = self.epoch
        if env.is_main:
            os.makedirs(t.output, exist_ok=True)
            with open(os.path.join(t.output, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())

    # ----------------------------------------------------------------------------------------- paths
    def path(self, name: str) -> str:
        return os.path.join(self.cfg.train.output, name)

    def _maybe_resume(self) -> None:
        path = self.cfg.train.resume
        if path == "auto":
            path = self.path("last.pt")
            if not os.path.isfile(path):
                self.log.info(f"resume=auto: no checkpoint at {path}; starting from scratch")
                return
        if path:
            self.load(path)

    # ------------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        t, d = self.cfg.train, self.data
        self.log.info(self.summary())
        if d.val is None:
            self.log.info("no held-out val split (data.val_fraction = 0): best = last; the test set never chooses")
        start = time.perf_counter()
        epochs = tqdm(range(self.epoch, t.epochs), desc="epochs", unit="ep", initial=self.epoch, total=t.epochs,
                      disable=not (t.progress and self.env.is_main), dynamic_ncols=True)
        try:
            for epoch in epochs:
                row = self.train_epoch(epoch)
                if d.val is not None:
                    row.update(self._prefixed("val", self.evaluate(d.val)))
                self.end_epoch(row)
                epochs.set_postfix_str(self.epoch_line(row, short=True))
            epochs.close()
            return self.finish(time.perf_counter() - start)
        finally:
            self.log.close()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        t, loader = self.cfg.train, self.data.train
        self.model.train()
        self.task.set_epoch(epoch)
        loader.set_epoch(epoch)
        bar = tqdm(total=loader.num_samples * self.env.world_size, desc=f"epoch {epoch + 1}/{t.epochs}", unit="img",
                   leave=False, disable=not (t.progress and self.env.is_main), dynamic_ncols=True)
        start, lr = time.perf_counter(), 0.0
        for i, (x, y) in enumerate(loader):
            if len(y) < 2:  # BatchNorm cannot train on one sample; every rank has the same count, so all skip it
                if epoch == self.first_epoch:
                    self.log.info("skipping the last training batch of each epoch: it holds 1 sample (BatchNorm needs 2)")
                continue
            lr = self.schedule(epoch, i)
            set_lr(self.amp.optimizer, lr)
            self.train_step(x, y)
            bar.update(len(y) * self.env.world_size)
            if self.step % t.log_interval == 0:
                window = self.meter.read()
                bar.set_postfix(loss=f"{window['loss']:.3f}", lr=f"{lr:.3g}")
                self.log.scalars("train", {**window, "lr": lr}, self.step)
        means = self.meter.read_epoch()
        seconds = time.perf_counter() - start
        bar.close()
        self.epoch = epoch + 1
        return {"epoch": self.epoch, "step": self.step, "lr": lr, "kd_scale": self.task.kd_scale,
                **{f"train_{k}": v for k, v in means.items()},
                "img_per_s": loader.num_samples * self.env.world_size / seconds, "epoch_s": seconds}

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        terms = self.task(x, y)
        self.amp.step(terms["loss"])
        self.task.after_step()  # PCL: EMA update (its weights live in the model's state dict)
        self.step += 1
        self.meter.update(terms, self.step)

    def evaluate(self, batches) -> dict[str, dict[str, float]]:
        self.model.eval()
        broadcast_buffers(self.model)
        try:
            return evaluate(self.task.predict, batches, self.task.node_names, reduce=all_reduce,
                            device=self.env.device)
        finally:
            self.model.train()

    @staticmethod
    def _prefixed(prefix: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
        return {f"{prefix}_{name}_{k}": v for name, m in metrics.items() if not name.startswith("_")
                for k, v in m.items()}

    def end_epoch(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        key = f"val_{TARGET}_top1"
        improved = key in row and (self.best is None or row[key] >= self.best["val_top1"])
        if improved:
            self.best = {"epoch": self.epoch, "val_top1": row[key]}
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.save(improved)
        self.log.scalars("epoch", row, self.epoch)
        self.log.write_csv(self.history)
        self.log.info(self.epoch_line(row))

    def epoch_line(self, row: dict[str, Any], short: bool = False) -> str:
        val = [f"{k[4:-5]} {v:.2f}" for k, v in row.items() if k.startswith("val_") and k.endswith("_top1")]
        if short:
            return f"loss {row['train_loss']:.3f}" + (f" val {val[0]}" if val else "")
        terms = " ".join(f"{k[6:]} {v:.3f}" for k, v in row.items() if k.startswith("train_") and k != "train_loss")
        text = (f"epoch {row['epoch']:>3}/{self.cfg.train.epochs}  loss {row['train_loss']:.4f} ({terms})  "
                f"lr {row['lr']:.4g}  kd_scale {row['kd_scale']:.3f}  {row['img_per_s']:.0f} img/s")
        return text + (f"  | val top-1: {', '.join(val)}" if val else "")

    # ------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.amp.state_dict(), "epoch": self.epoch,
                "step": self.step, "spec": dict(self.model.spec), "config": self.cfg.to_dict(),
                "history": self.history, "best": self.best, "rng": rng_state()}

    def save(self, improved: bool) -> None:
        if not self.env.is_main:
            return
        last = self.path("last.pt")
        atomic_save(self.state(), last)
        if improved:
            atomic_copy(last, self.path("best.pt"))
        every = self.cfg.train.save_every
        if every and self.epoch % every == 0:
            atomic_copy(last, self.path(f"epoch_{self.epoch}.pt"))

    def load(self, path: str) -> None:
        ckpt = load_checkpoint(path)
        check_spec(ckpt["spec"], self.model.spec, path)
        self.model.load_state_dict(ckpt["model"])
        self.amp.load_state_dict(ckpt["optim"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.history, self.best = list(ckpt["history"]), ckpt["best"]
        set_rng_state(ckpt["rng"])
        self._load_best(os.path.join(os.path.dirname(path) or ".", "best.pt"))
        self.log.info(f"resumed from {path}: {self.epoch} epochs ({self.step} steps) done")

    def _load_best(self, path: str) -> None:
        """The best weights of a resumed run: its best.pt (copied into this run's output if it is elsewhere)."""
        if self.best is None or not os.path.isfile(path):
            return
        best = load_checkpoint(path)
        if best["epoch"] != self.best["epoch"]:
            return
        self.best_state = best["model"]
        target = self.path("best.pt")
        if self.env.is_main and os.path.abspath(path) != os.path.abspath(target):
            os.makedirs(self.cfg.train.output, exist_ok=True)
            atomic_copy(path, target)

    # ----------------------------------------------------------------------------------- the end
    def finish(self, seconds: float) -> dict[str, Any]:
        """Test-set table of the best (val-chosen) weights, a line for the last weights, curves.png."""
        last = self.evaluate(self.data.test)
        chosen, results = "last", last
        if self.best is not None and self.best["epoch"] == self.epoch:
            chosen = "best"  # the last epoch is the best one
        elif self.best is not None and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            chosen, results = "best", self.evaluate(self.data.test)
        elif self.best is not None:
            self.log.info(f"best.pt of epoch {self.best['epoch']} not found; reporting the last weights")
        summary = {"checkpoint": chosen, "best": self.best, "epochs": self.epoch, "train_s": seconds,
                   "test": results, "test_last": last}
        if self.env.is_main:
            self.report(summary)
        return summary

    def report(self, summary: dict[str, Any]) -> None:
        c, results, best = self.cfg, summary["test"], summary["best"]
        where = (f"best checkpoint, epoch {best['epoch']}, chosen on val top-1 {best['val_top1']:.2f}%"
                 if summary["checkpoint"] == "best" else f"last checkpoint, epoch {self.epoch}")
        self.log.info("\n" + format_table(results, f"test set, {where}:"))
        self.log.info(f"last epoch: target test top-1 {summary['test_last'][TARGET]['top1']:.2f}%")
        self.log.info(f"TARGET ({TARGET}) TEST TOP-1: {results[TARGET]['top1']:.2f}%   "
                      f"({self.cfg.model.arch}, {self.cfg.model.method}, {self.cfg.data.dataset}; "
                      f"training took {summary['train_s']:.0f} s)")
        with open(self.path("results.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if self.history:
            plot_curves(self.history, self.path("curves.png"),
                        f"{c.model.method} {c.model.arch} x{c.model.num_branches} on {c.data.dataset}")
        self.log.info(f"outputs in {c.train.output}/: {', '.join(sorted(os.listdir(c.train.output)))}")

    def summary(self) -> str:
        c, d = self.cfg, self.data
        n = sum(p.numel() for p in self.model.parameters())
        splits = f"{d.train.num_samples * self.env.world_size} train"
        splits += f" / {d.val.num_samples * self.env.world_size} val" if d.val is not None else " / no val"
        return (f"{c.model.method} {c.model.arch} ({c.model.num_branches} branches, aux {c.model.aux}, {n / 1e6:.2f} M "
                f"params) on {c.data.dataset} ({splits}, {d.num_classes} classes, {d.image_size}px); "
                f"{c.train.epochs} epochs of {len(d.train)} steps, batch {c.data.batch_size} x {self.env.world_size}, "
                f"{c.schedule.name} lr {c.optim.lr}, {c.train.precision}, {self.env.device}, "
                f"objective {c.objective.backend}")
