"""Learning-rate schedules and the KD ramp (SPEC 4), as pure functions of (epoch, step).

A pure function needs no state of its own: a resumed run restores (epoch, step) and gets the same
learning rate, bit for bit.
"""
from __future__ import annotations

import bisect
import math

from .config import ScheduleConfig


def sigmoid_rampup(epoch: float, rampup: float) -> float:
    """SPEC 4: w(epoch) = 0.5 * exp(-5 * (1 - min(epoch, R) / R)^2); w = 0.5 when R = 0."""
    if rampup <= 0:
        return 0.5
    phase = 1.0 - min(epoch, rampup) / rampup
    return 0.5 * math.exp(-5.0 * phase * phase)


def kd_ramp(kind: str, epoch: float, rampup: float) -> float:
    """The ramp factor of the KD terms: ``sigmoid`` (AHBF), ``consistency`` (the same curve from 0 to 1,
    ``exp(-5 * (1 - min(epoch, R) / R)^2)``, 1 when R = 0: the mean-teacher ramp of CL-ILR / OKDDip / PCL)
    or ``constant`` (1, natural for DML / ONE / KDCL)."""
    if kind == "sigmoid":
        return sigmoid_rampup(epoch, rampup)
    if kind == "consistency":
        return 2.0 * sigmoid_rampup(epoch, rampup) if rampup > 0 else 1.0
    if kind == "constant":
        return 1.0
    raise ValueError(f"objective.ramp: unknown ramp '{kind}'; choose from sigmoid, consistency, constant")


def scaled_lr(lr: float, base_batch: int, global_batch: int) -> float:
    """The linear scaling rule: ``lr * global_batch / base_batch``; ``lr`` itself when ``base_batch`` is 0."""
    return lr * global_batch / base_batch if base_batch > 0 else lr


class LRSchedule:
    """Learning rate at (epoch, step within the epoch).

    - warm-up (both schedules): linear, per step, from ``lr / W`` to ``lr`` over W = warmup_epochs * steps
      optimiser steps;
    - multistep: ``lr * gamma ** (milestones <= epoch)``: constant within an epoch, stepped after each epoch;
    - cosine: per step, from ``lr`` at the end of warm-up to ``min_lr`` at the end of the last epoch.
    """

    def __init__(self, cfg: ScheduleConfig, lr: float, epochs: int, steps_per_epoch: int):
        self.cfg, self.lr, self.epochs, self.steps = cfg, lr, epochs, max(1, steps_per_epoch)
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps))
        self.milestones = sorted(cfg.milestones)

    def __call__(self, epoch: int, step: int) -> float:
        t = epoch * self.steps + step  # global optimiser step, 0-based
        if self.cfg.name == "multistep":
            lr = self.lr * self.cfg.gamma ** bisect.bisect_right(self.milestones, epoch)
        elif self.cfg.name == "cosine":
            total = self.epochs * self.steps
            span = max(1, total - self.warmup_steps)
            progress = min(1.0, max(0.0, (t - self.warmup_steps) / span))
            lr = self.cfg.min_lr + (self.lr - self.cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"schedule.name: unknown schedule '{self.cfg.name}'; choose from multistep, cosine")
        if t < self.warmup_steps:
            lr *= (t + 1) / self.warmup_steps
        return lr
