"""``torch.compile`` of the training model: ``off``, ``model`` (one graph) or ``branches`` (one graph per unit).

``branches`` compiles each unit a model lists in ``compile_units()`` (the trunk, each branch, each fusion
module) in place with ``nn.Module.compile``: the parent's forward stays eager Python that calls compiled
graphs, so state-dict keys, DDP and checkpoints are unchanged. Branches differ in depth, so each one is
its own graph of the same ``forward`` code; dynamo's per-code recompile limit is raised to hold them all
(train and eval mode each). The fused objective is a custom op outside these graphs in every mode.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

MODES = ("off", "model", "branches")


def compile_units(model: nn.Module) -> list[nn.Module] | None:
    """The submodules ``branches`` compiles one by one: ``model.compile_units()`` if the model has it."""
    units = getattr(model, "compile_units", None)
    return list(units()) if callable(units) else None


def compile_model(model: nn.Module, mode: str, compile_mode: str = "default",
                  note: Callable[[str], None] = print) -> nn.Module:
    """Return the training forward for ``mode``: ``model`` itself (off; branches, compiled in place) or
    ``torch.compile(model)``. A model without ``compile_units`` falls back from branches to model (noted)."""
    if mode == "off":
        return model
    if mode not in MODES:
        raise ValueError(f"train.compile: unknown value '{mode}'; choose from {', '.join(MODES)}")
    if mode == "branches":
        inner = getattr(model, "module", model)  # under DDP: the wrapped model
        units = compile_units(inner)
        if units is None:
            note(f"train.compile=branches: {type(inner).__name__} lists no compile_units(); compiling the whole model")
        else:
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 2 * len(units) + 4)  # train + eval graph per unit
            for unit in units:
                unit.compile(mode=compile_mode)
            return model
    return torch.compile(model, mode=compile_mode)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that ``fn()`` takes, between device syncs (a first, compiling step)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start
