"""The checks of a run's config values: fixed choices, numeric ranges, ``auto``; and ``ConfigError``.

``validate`` runs on every config ``build_config`` returns (and on a checkpoint's config in ``ahbf-eval``),
before any work starts; each failure is one ``ConfigError`` line naming the key. It reads a ``RunConfig``
(``config.py``, which calls it) through its sections' fields and does not import it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

from ..kernels.okd import BACKENDS
from ..methods import METHODS, get_method, is_plugin
from ..methods.kdcl import VARIANTS as KDCL_TARGETS
from ..methods.pcl import TARGETS as PCL_TARGETS
from ..models import ARCHS, backbones


class ConfigError(ValueError):
    """A bad configuration value or key (reported as one line by the CLI)."""


CHOICES: dict[str, tuple[str, ...]] = {
    "model.method": (*METHODS, "<module>:<name>"),
    "model.arch": (*ARCHS, "torchvision:<name>", "timm:<name>"),
    "objective.ramp": ("auto", "sigmoid", "consistency", "constant"),
    "objective.kdcl_target": KDCL_TARGETS,
    "objective.pcl_target": PCL_TARGETS,
    "objective.detach_teacher": ("auto", True, False),
    "objective.backend": BACKENDS,
    "optim.impl": ("auto", "fused", "foreach", "loop", "apex"),
    "schedule.name": ("multistep", "cosine"),
    "train.precision": ("auto", "fp32", "bf16", "fp16", "fp64"),
    "train.compile": ("off", "model", "branches", "regions"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune"),
}


def validate(cfg: RunConfig) -> RunConfig:
    """``cfg`` checked (one-line ``ConfigError`` naming the key); returns it with ``auto`` spelled as such."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key == "model.arch" and backbones.is_library(value):
            check_library_model(cfg.model)
        elif key == "model.method" and is_plugin(value):
            check_plugin(value)
        elif value not in choices:
            shown = [str(c).lower() if isinstance(c, bool) else c for c in choices]
            near = difflib.get_close_matches(str(value), shown, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ConfigError(f"{key}: unknown value '{value}'; {hint}choose from {', '.join(shown)}")
    return check_ranges(cfg)


def check_plugin(name: str) -> None:
    """A user's method (import path or entry point): importable and a ``Method`` (one-line ``ConfigError``)."""
    try:
        get_method(name)
    except ValueError as err:
        raise ConfigError(f"model.method: {err}") from None


def check_library_model(m: ModelConfig) -> None:
    """A torchvision:/timm: model name and its split point, before any work (one-line ``ConfigError``)."""
    try:
        backbones.resolve_split(m.arch, m.split)
    except ValueError as err:
        raise ConfigError(f"model.arch / model.split: {err}") from None


AUTO_NUMBERS = ("model.aux", "objective.kd_weight", "objective.rampup")  # a number or "auto"


@dataclass(frozen=True)
class Range:
    """``[low, high]``; ``above``: ``(low, high]``."""

    low: float
    high: float = math.inf
    above: bool = False

    def holds(self, value: float) -> bool:  # False for NaN
        return (self.low < value if self.above else self.low <= value) and value <= self.high

    def __str__(self) -> str:
        if self.high < math.inf:
            return f"in [{self.low}, {self.high}]"
        return f"> {self.low}" if self.above else f">= {self.low}"


RANGES: dict[str, Range] = {  # every numeric key's range: the one table (``auto`` is not checked here)
    "model.num_branches": Range(1, 64), "model.aux": Range(0, 64),
    "objective.T": Range(0, above=True), "objective.kd_weight": Range(0), "objective.lambda1": Range(0),
    "objective.lambda2": Range(0), "objective.rampup": Range(0), "objective.ema_decay": Range(0, 0.999999),
    "objective.eps": Range(0, 1e-3), "objective.ce_weight": Range(0, above=True),
    "optim.lr": Range(0, above=True), "optim.momentum": Range(0, 0.999999), "optim.weight_decay": Range(0),
    "optim.clip_grad": Range(0), "optim.lr_base_batch": Range(0),
    "schedule.gamma": Range(0, above=True), "schedule.warmup_epochs": Range(0), "schedule.min_lr": Range(0),
    "data.batch_size": Range(2), "data.eval_batch_size": Range(1), "data.workers": Range(0),
    "data.val_fraction": Range(0, 0.99), "data.synthetic_classes": Range(2), "data.synthetic_samples": Range(2),
    "data.seed": Range(0, 2 ** 63 - 1),
    "train.epochs": Range(1), "train.seed": Range(0, 2 ** 63 - 1), "train.threads": Range(0),
    "train.log_interval": Range(1), "train.stop_poll_every": Range(1), "train.save_every": Range(0),
    "train.precise_bn": Range(0), "train.keep_last": Range(1), "train.dist_timeout": Range(1)}


def check_ranges(cfg: RunConfig) -> RunConfig:
    """Every numeric value a number in its range (``RANGES``) and finite, and the checks that read several keys,
    before any work starts (one-line ``ConfigError`` naming the key)."""
    for key in AUTO_NUMBERS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and value != "auto":
            raise ConfigError(f"{key} must be a number or auto, got '{value}'")
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != "auto" and not allowed.holds(value):
            raise ConfigError(f"{key} must be {allowed}, got {value}")
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name} must be a finite number, got {value}")
    if cfg.model.split not in ("auto", "") and not backbones.is_library(cfg.model.arch):
        raise ConfigError(f"model.split applies to torchvision:<name> / timm:<name> models; {cfg.model.arch} has "
                          f"a fixed split (set model.split=auto)")
    low = get_method(cfg.model.method).min_branches
    if cfg.model.num_branches < low:
        raise ConfigError(f"model.num_branches must be >= {low} for {cfg.model.method}, got {cfg.model.num_branches}")
    # schedule.min_lr <= the peak lr: checked by ahbf.engine.resolve.peak_lr, which knows the world size
    if cfg.objective.eps and cfg.objective.backend == "triton":
        raise ConfigError(f"objective.eps = {cfg.objective.eps}: the Triton kernel computes the exact KL (eps = 0); "
                          "use objective.backend=compiled or auto")
    if any(m < 0 for m in cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones must be epochs >= 0, got {cfg.schedule.milestones}")
    if cfg.optim.nesterov and cfg.optim.momentum <= 0:
        raise ConfigError(f"optim.nesterov needs optim.momentum > 0, got {cfg.optim.momentum}")
    if cfg.data.image_size != 0 and cfg.data.image_size < 8:
        raise ConfigError(f"data.image_size must be 0 (the data set's default) or >= 8, got {cfg.data.image_size}")
    parse_interval(cfg.train.checkpoint_every)
    return cfg


def parse_interval(text: str) -> tuple[str, float]:
    """``train.checkpoint_every``: "off" -> ("off", 0), "500" -> ("steps", 500), "30m" -> ("minutes", 30)."""
    text = str(text).strip().lower()
    if text in ("off", "0", "", "false"):
        return "off", 0.0
    unit = "minutes" if text.endswith(("m", "min")) else "steps"
    number = text.removesuffix("min").removesuffix("m")
    try:
        value = float(number) if unit == "minutes" else int(number)
    except ValueError:
        value = -1
    if not (0 < value < math.inf):
        raise ConfigError(f"train.checkpoint_every must be off, a number of steps (500) or of minutes (30m), got '{text}'")
    return unit, float(value)
