"""Run outputs on rank 0: console lines (through tqdm), per-step progress, metrics.csv, TensorBoard scalars.

On a terminal, progress is a tqdm bar; when stdout or stderr is not a terminal (a cluster job's log
file) or ``--no-progress`` is given, there are no bars and no control codes: one plain line every
``train.log_interval`` steps instead.
"""
from __future__ import annotations

import csv
import datetime
import os
import sys
import time
from typing import Any, Iterable, Iterator

import torch
from tqdm import tqdm


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
