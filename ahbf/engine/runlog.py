"""Run outputs on rank 0: console lines (through tqdm), per-step progress, metrics.csv, TensorBoard scalars,
the start-up header, the epoch lines and the final report (results.json, curves.png).

On a terminal, progress is a tqdm bar; when stdout or stderr is not a terminal (a cluster job's log
file) or ``--no-progress`` is given, there are no bars and no control codes: one plain line every
``train.log_interval`` steps instead.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import sys
import time
from typing import Any, Iterable, Iterator

import torch
from tqdm import tqdm

from ..evaluation import format_table
from ..models.summary import count_parameters
from ..pipelines import no_test_set_note
from .distributed import busy_hint, threads_origin
from .durable import write_text
from .plots import plot_curves
from .recipes import describe as describe_recipe


def use_bars(progress: bool) -> bool:
    """tqdm bars only when asked for and both output streams are terminals."""
    return progress and all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


class EpochProgress:
    """One epoch's progress: the time spent waiting for batches, and a bar or a plain line per log interval.

    ``iterate`` times each ``next()`` of the loader (the data wait, host side); ``report`` is called at the
    log interval with the window's mean loss terms and prints, in plain mode, one line: epoch, step, loss
    terms, lr, kd_scale, img/s and data-wait share of the window, ETA of the training steps left, and
    the peak GPU memory on CUDA.
    """

    def __init__(self, epoch: int, epochs: int, steps: int, samples: int, *, enabled: bool, bars: bool,
                 device: torch.device | str = "cpu"):
        self.epoch, self.epochs, self.steps, self.device = epoch, epochs, steps, torch.device(device)
        self.enabled, self.plain = enabled, enabled and not bars
        self.bar = tqdm(total=samples, desc=f"epoch {epoch + 1}/{epochs}", unit="img", leave=False,
                        disable=not (enabled and bars), dynamic_ncols=True)
        self.wait, self.images = 0.0, 0  # seconds waiting for batches, images trained (all ranks) this epoch
        self.reset_window()

    def reset_window(self) -> None:
        self.window_start, self.window_wait, self.window_images, self.window_steps = time.perf_counter(), self.wait, 0, 0

    def iterate(self, loader: Iterable) -> Iterator:
        it = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - start
            yield batch

    def advance(self, images: int) -> None:
        """A training step on ``images`` images (over all ranks) is done."""
        self.bar.update(images)
        self.images += images
        self.window_images += images
        self.window_steps += 1

    def report(self, step: int, index: int, terms: dict[str, float], lr: float, kd_scale: float) -> str:
        """The plain line for the window that ends at global ``step`` (batch ``index`` of this epoch)."""
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        left = (self.epochs - self.epoch - 1) * self.steps + self.steps - index - 1
        eta = left * seconds / max(1, self.window_steps)
        loss = terms.get("loss", float("nan"))
        parts = " ".join(f"{k} {v:.4f}" for k, v in terms.items() if k != "loss")
        line = (f"epoch {self.epoch + 1}/{self.epochs} step {index + 1}/{self.steps} ({step})  loss {loss:.4f} ({parts})  "
                f"lr {lr:.4g}  kd_scale {kd_scale:.3f}  {self.window_images / seconds:.0f} img/s  "
                f"data {100 * (self.wait - self.window_wait) / seconds:.0f}%  ETA {format_eta(eta)}")
        if self.device.type == "cuda":
            line += f"  mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.2f} GiB"
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}")
        if self.plain:
            tqdm.write(line)
        self.reset_window()
        return line

    def close(self) -> None:
        self.bar.close()


class RunLogger:
    """Writes nothing on ranks other than 0. ``history`` rows (one per epoch) become metrics.csv."""

    def __init__(self, output: str, enabled: bool = True, tensorboard: bool = True):
        self.output, self.enabled, self.tensorboard = output, enabled, enabled and tensorboard
        self.tb = None  # created at the first scalar, so a run refused at start-up writes nothing

    def _writer(self):
        if self.tb is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.output, "tb"))
        return self.tb

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        writer = self._writer()
        if writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"{prefix}/{k}", v, step)

    def write_csv(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.csv from the whole history (so a resumed run has no duplicated rows)."""
        if not self.enabled or not history:
            return
        keys = list(dict.fromkeys(k for row in history for k in row))
        path = os.path.join(self.output, "metrics.csv")
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        os.replace(path + ".tmp", path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------ the header, epoch lines, the report
TARGET = "branch0"  # the deployed network: trunk + branch 0


def epoch_line(row: dict[str, Any], epochs: int, short: bool = False) -> str:
    val = [f"{k[4:-5]} {v:.2f}" for k, v in row.items() if k.startswith("val_") and k.endswith("_top1")]
    if short:
        return f"loss {row['train_loss']:.3f}" + (f" val {val[0]}" if val else "")
    terms = " ".join(f"{k[6:]} {v:.3f}" for k, v in row.items() if k.startswith("train_") and k != "train_loss")
    text = (f"epoch {row['epoch']:>3}/{epochs}  loss {row['train_loss']:.4f} ({terms})  "
            f"lr {row['lr']:.4g}  kd_scale {row['kd_scale']:.3f}  {row['img_per_s']:.0f} img/s "
            f"(data {100 * row.get('data_wait', 0.0):.0f}%)")
    if "compile_s" in row:
        text += f"  compile {row['compile_s']:.1f} s (not in img/s)"
    if f"val_{TARGET}_loss" in row:
        text += f"  | val loss {row[f'val_{TARGET}_loss']:.4f}"
    return text + (f"  | val top-1: {', '.join(val)}" if val else "")


def header(run, recipe: str = "") -> str:
    """The start-up header: folder, recipe, model (trained and deployed sizes), data, schedule, machine."""
    c, d, m, env = run.cfg, run.data, run.cfg.model, run.env
    trained = sum(p.numel() for p in run.model.parameters() if p.requires_grad)  # not MobileNetV2's unused blocks
    deployed = count_parameters(m.arch, "baseline", d.num_classes)[1]
    sizes = d.sizes or {"train": d.train.num_samples * env.world_size}
    splits = f"{sizes['train']} train / " + (f"{sizes.get('val', 0)} val" if d.val is not None else "no val")
    stand_in = no_test_set_note(c.data)
    splits += (f" / test = {stand_in}" if stand_in else f" / {sizes['test']} test") if "test" in sizes else ""
    backend = "in-memory tensors" if d.backend == "memory" else f"{d.backend} (image check {d.check_images})"
    compiled = c.train.compile + (f" ({c.train.compile_mode})" if c.train.compile != "off" else "")
    lines = [f"run folder: {c.train.output}"] + ([describe_recipe(recipe)] if recipe else [])
    lines += [
        f"model: {m.method} {m.arch}, {m.num_branches} branches, aux {m.aux}: {trained / 1e6:.2f} M parameters "
        f"trained, {deployed / 1e6:.3f} M deployed ({TARGET} = trunk + branch 0, what ahbf-export writes)",
        f"data: {c.data.dataset}, {splits}, {d.num_classes} classes, {d.image_size}px, {backend}, "
        f"batch {c.data.batch_size} x {env.world_size}",
        f"schedule: {c.train.epochs} epochs of {len(d.train)} steps, {c.schedule.name} lr {run.schedule.lr:.4g}"
        f"{' (scaled)' if c.optim.lr_base_batch else ''}, SGD {c.optim.impl}, weight decay {c.optim.weight_decay:g}",
        f"machine: {env.device}, world size {env.world_size}, {c.train.precision}, compile {compiled}, "
        f"{c.train.threads} thread{'s' * (c.train.threads != 1)} ({threads_origin(c.train.threads)}), objective {c.objective.backend}"]
    hint = busy_hint(c.train.threads) if env.device.type == "cpu" else ""
    return "\n".join(lines + ([hint] if hint else []))


def write_report(cfg, summary: dict[str, Any], history: list[dict[str, Any]], epochs_done: int,
                 info=print) -> None:
    """Rank 0 at the end: the test table, results.json, curves.png, the list of outputs."""
    results, best, out = summary["test"], summary["best"], cfg.train.output
    where = (f"best checkpoint, epoch {best['epoch']}, chosen on val top-1 {best['val_top1']:.2f}%"
             if summary["checkpoint"] == "best" else f"last checkpoint, epoch {epochs_done}")
    stand_in = no_test_set_note(cfg.data)
    info("\n" + format_table(results, f"test set{f' = {stand_in}' if stand_in else ''}, {where}:"))
    info(f"last epoch: target test top-1 {summary['test_last'][TARGET]['top1']:.2f}%")
    info(f"TARGET ({TARGET}) TEST TOP-1: {results[TARGET]['top1']:.2f}%   ({cfg.model.arch}, {cfg.model.method}, "
         f"{cfg.data.dataset}; training took {summary['train_s']:.0f} s)")
    write_text(os.path.join(out, "results.json"), json.dumps(summary, indent=1))
    if history:
        plot_curves(history, os.path.join(out, "curves.png"),
                    f"{cfg.model.method} {cfg.model.arch} x{cfg.model.num_branches} on {cfg.data.dataset}")
    info(f"outputs in {out}/: {', '.join(sorted(f for f in os.listdir(out) if not f.startswith('.')))}")
