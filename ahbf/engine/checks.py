"""The checks of a run's config values: fixed choices, numeric ranges, the ``auto`` spellings.

``validate`` runs on every config ``build_config`` returns (and on a checkpoint's config in ``ahbf-eval``),
before any work starts; each failure is one ``ConfigError`` line naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math

from ..kernels.okd import BACKENDS
from ..methods import METHODS
from ..models import ARCHS, backbones
from .config import SECTIONS, ConfigError, ModelConfig, RunConfig

CHOICES: dict[str, tuple[str, ...]] = {
    "model.method": METHODS,
    "model.arch": (*ARCHS, "torchvision:<name>", "timm:<name>"),
    "objective.ramp": ("auto", "sigmoid", "consistency", "constant"),
    "objective.kdcl_target": ("minlogit", "naive"),
    "objective.pcl_target": ("mean_logits", "mean_kl"),
    "objective.detach_teacher": ("auto", True, False),
    "objective.backend": BACKENDS,
    "optim.impl": ("auto", "fused", "foreach", "loop", "apex"),
    "schedule.name": ("multistep", "cosine"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.compile": ("off", "model", "branches", "regions"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune"),
}
ALIASES: dict[str, dict[str, str]] = {  # train.compile was a boolean
    "train.compile": {"true": "model", "yes": "model", "on": "model", "false": "off", "no": "off"}}


def validate(cfg: RunConfig) -> RunConfig:
    """``cfg`` checked (one-line ``ConfigError`` naming the key), with aliases and -1 spelled as ``auto``."""
    for key, aliases in ALIASES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        cfg = cfg.replace(**{section: {name: aliases.get(value, value)}})
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key == "model.arch" and backbones.is_library(value):
            check_library_model(cfg.model)
        elif value not in choices:
            shown = [str(c).lower() if isinstance(c, bool) else c for c in choices]
            near = difflib.get_close_matches(str(value), shown, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ConfigError(f"{key}: unknown value '{value}'; {hint}choose from {', '.join(shown)}")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {cfg.train.epochs}")
    positive = {"train.log_interval": 1, "train.stop_poll_every": 1, "data.batch_size": 1, "data.eval_batch_size": 1}
    non_negative = {"schedule.warmup_epochs": 0, "train.save_every": 0, "data.workers": 0,
                    "train.threads": 0, "optim.lr_base_batch": 0, "train.precise_bn": 0, "schedule.min_lr": 0}
    for key, low in {**positive, **non_negative}.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    for key in ("objective.T", "objective.ce_weight", "schedule.gamma", "optim.lr"):
        section, name = key.split(".")
        if not getattr(getattr(cfg, section), name) > 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(getattr(cfg, section), name)}")
    return check_ranges(cfg)


def check_library_model(m: ModelConfig) -> None:
    """A torchvision:/timm: model name and its split point, before any work (one-line ``ConfigError``)."""
    try:
        backbones.resolve_split(m.arch, m.split)
    except ValueError as err:
        raise ConfigError(f"model.arch / model.split: {err}") from None


AUTO_NUMBERS = ("model.aux", "objective.kd_weight", "objective.rampup")  # a number or "auto"
LEGACY_AUTO = ("model.aux", "objective.kd_weight")  # where -1, the old sentinel, still means auto
RANGES: dict[str, tuple[float, float]] = {  # [low, high] (inclusive); checked after every float is finite
    "model.num_branches": (1, 64), "model.aux": (0, 64), "objective.kd_weight": (0, math.inf),
    "objective.lambda1": (0, math.inf), "objective.lambda2": (0, math.inf), "objective.ema_decay": (0, 0.999999),
    "objective.rampup": (0, math.inf), "objective.eps": (0, 1e-3),
    "optim.momentum": (0, 0.999999),
    "optim.weight_decay": (0, math.inf), "optim.clip_grad": (0, math.inf), "data.batch_size": (2, math.inf),
    "data.val_fraction": (0, 0.99), "data.synthetic_classes": (2, math.inf), "data.synthetic_samples": (2, math.inf),
    "data.seed": (0, 2 ** 63 - 1), "train.seed": (0, 2 ** 63 - 1), "train.keep_last": (1, math.inf),
    "train.dist_timeout": (1, math.inf)}


def check_ranges(cfg: RunConfig) -> RunConfig:
    """Every numeric value in range, before any work starts (one-line ``ConfigError`` naming the key); returns
    ``cfg`` with the legacy -1 spelled ``auto``."""
    for section in SECTIONS:
        for f in dataclasses.fields(SECTIONS[section]):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")
    for key in AUTO_NUMBERS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if (value == -1 and key in LEGACY_AUTO) or value == "auto":
            cfg = cfg.replace(**{section: {name: "auto"}})
        elif isinstance(value, str):
            raise ConfigError(f"{key} must be a number or auto, got '{value}'")
    for key, (low, high) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != "auto" and not low <= value <= high:
            raise ConfigError(f"{key} must be in [{low}, {high}], got {value}" if high < math.inf
                              else f"{key} must be >= {low}, got {value}")
    if cfg.model.split not in ("auto", "") and not backbones.is_library(cfg.model.arch):
        raise ConfigError(f"model.split applies to torchvision:<name> / timm:<name> models; {cfg.model.arch} has "
                          f"a fixed split (set model.split=auto)")
    low = METHODS[cfg.model.method].min_branches
    if cfg.model.num_branches < low:
        raise ConfigError(f"model.num_branches must be >= {low} for {cfg.model.method}, got {cfg.model.num_branches}")
    # schedule.min_lr <= the peak lr: checked by ahbf.engine.resolve.peak_lr, which knows the world size
    if cfg.objective.eps and cfg.objective.backend == "triton":
        raise ConfigError(f"objective.eps = {cfg.objective.eps}: the Triton kernel computes the exact KL (eps = 0); "
                          "use objective.backend=compiled or auto")
    if any(m < 0 for m in cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones must be epochs >= 0, got {cfg.schedule.milestones}")
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
