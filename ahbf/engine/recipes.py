"""Per-dataset recipes: what ``--dataset X`` without a ``-c`` file applies under the flags.

The built-in defaults are the digits demo (16 px, cosine schedule with warm-up, 30 epochs); they must
not leak into a real data set. Each recipe holds the data, model, schedule, optimiser and length values
of that data set's paper config (``source``: a test keeps them equal). Method-dependent values
(kd_weight, ramp, rampup, detach_teacher, aux) stay ``auto`` and resolve per method (ahbf/methods.py; the
rampup as the method's fraction of train.epochs: AHBF's 240 of 300 and 72 of 90, as in those configs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class Recipe:
    source: str
    """the config file in the repository whose values this recipe carries"""
    values: dict[str, dict[str, Any]]


def _cifar(dataset: str) -> Recipe:
    return Recipe(f"configs/{dataset}_resnet32_ahbf.yaml", {
        "data": {"dataset": dataset, "root": f"data/{dataset}", "batch_size": 128, "eval_batch_size": 500,
                 "workers": 4, "image_size": 0, "val_fraction": 0.0},
        "model": {"arch": "resnet32"},
        "objective": {"backend": "auto"},
        "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"name": "multistep", "milestones": [150, 225], "gamma": 0.1, "warmup_epochs": 0.0, "min_lr": 0.0},
        "train": {"epochs": 300, "log_interval": 50},
    })


RECIPES: dict[str, Recipe] = {
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "imagenet": Recipe("configs/imagenet_resnet18_ahbf.yaml", {
        "data": {"dataset": "imagenet", "root": "data/imagenet", "batch_size": 256, "eval_batch_size": 256,
                 "workers": 8, "image_size": 224, "val_fraction": 0.0},
        "model": {"arch": "resnet18"},
        "objective": {"backend": "auto"},
        "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
        "schedule": {"name": "multistep", "milestones": [30, 60], "gamma": 0.1, "warmup_epochs": 0.0, "min_lr": 0.0},
        "train": {"epochs": 90, "log_interval": 100},
    }),
}


def chosen_recipe(files: Iterable[str], overrides: Iterable[tuple[str, Any]]) -> str:
    """The recipe in force: the data set named last among the overrides, if it has one and no ``-c`` file is given."""
    if list(files):
        return ""
    dataset = ""
    for key, value in overrides:
        if key == "data.dataset":
            dataset = str(value)
    return dataset if dataset in RECIPES else ""


def describe(name: str) -> str:
    """The header line saying which recipe is in force."""
    return f"recipe: {name} (the values of {RECIPES[name].source}; flags and key=value override them)"
