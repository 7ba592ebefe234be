"""Per-dataset recipes: the base values of a data set, one YAML file each in ``ahbf/recipes/``.

``--dataset X`` without a ``-c`` file applies recipe X under the flags, and a config file starts from
one with a top-level ``recipe: X`` key (``configs/*.yaml`` are such small overlays). The built-in
defaults are the digits demo (16 px, cosine schedule with warm-up, 30 epochs); a recipe keeps them
from leaking into a real data set. Method-dependent values (kd_weight, ramp, rampup, detach_teacher,
aux) stay ``auto`` and resolve per method (``ahbf/methods/``; the rampup as the method's fraction of
``train.epochs``: AHBF's 240 of 300 and 72 of 90).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterable

import yaml

from .checks import ConfigError

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
NAMES = tuple(sorted(f[:-5] for f in os.listdir(FOLDER) if f.endswith(".yaml")))


@functools.lru_cache(maxsize=None)
def _load(name: str) -> str:
    with open(os.path.join(FOLDER, f"{name}.yaml")) as f:
        return f.read()


def recipe_values(name: str, source: str = "config") -> dict[str, dict[str, Any]]:
    """The values of recipe ``name`` (a fresh copy); a one-line error naming the known recipes otherwise."""
    if name not in NAMES:
        raise ConfigError(f"{source}: unknown recipe {name!r}; choose from {', '.join(NAMES)}")
    return yaml.safe_load(_load(name))


def chosen_recipe(files: Iterable[str], overrides: Iterable[tuple[str, Any]]) -> str:
    """The recipe in force: the data set named last among the overrides, if it has one and no ``-c`` file is given."""
    if list(files):
        return ""
    dataset = ""
    for key, value in overrides:
        if key == "data.dataset":
            dataset = str(value)
    return dataset if dataset in NAMES else ""


def describe(name: str) -> str:
    """The header line saying which recipe is in force."""
    return f"recipe: {name} (the values of ahbf/recipes/{name}.yaml; flags and key=value override them)"
