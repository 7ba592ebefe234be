"""``torch.compile`` of the training model: ``off``, ``model`` (one graph), ``branches`` (one graph per unit)
or ``regions`` (each repeated block compiled once, its graph reused by every copy).

``branches`` compiles each unit a model lists in ``compile_units()`` (the trunk, each branch, each fusion
module) in place with ``nn.Module.compile``: the parent's forward stays eager Python that calls compiled
graphs, so state-dict keys, DDP and checkpoints are unchanged. Branches differ in depth, so each one is
its own graph of the same ``forward`` code. ``regions`` is torch's regional-compilation recipe: the
repeated blocks (:func:`compile_regions`: ResNet basic blocks, DenseNet layers, MobileNetV2 inverted
residuals) are compiled in place; blocks of one class and shape share one graph (parameters are graph
inputs), so an AHBF ResNet-32 (53 of its 54 blocks) compiles 4 graphs instead of one graph of 117
convolutions, and its first step on a CPU compiles in a third of the time (docs/benchmarks.md). Every mode
compiles with static shapes (``dynamic=False``): a batch of another size (the last one, evaluation)
compiles once more instead of turning the graphs symbolic. Dynamo's per-code recompile limit is raised to
hold every graph (train and eval mode each). The fused objective is a custom op outside these graphs.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import torch
from torch import nn

MODES = ("off", "model", "branches", "regions")
RECOMPILE_LIMIT = 64  # graphs per code object: regions of every shape x train / eval x batch sizes


def compile_units(model: nn.Module) -> list[nn.Module] | None:
    """The submodules ``branches`` compiles one by one: ``model.compile_units()`` if the model has it."""
    units = getattr(model, "compile_units", None)
    return list(units()) if callable(units) else None


def compile_regions(model: nn.Module) -> list[nn.Module]:
    """The blocks ``regions`` compiles, in module order: the leaf-most repeated blocks (modules of a class
    from outside ``torch.nn`` that occurs at least twice and holds no other such module) of the most common
    such class, and of those only the ones whose parameter shapes occur at least twice. A block that occurs
    once would compile a graph for one use (no reuse, the same cost as inside a bigger graph) and stays
    eager; so do the rarer classes (an AHBF net's 3 small fusion modules beside its 54 ResNet blocks)."""
    counts = Counter(type(m) for m in model.modules())
    repeated = {cls for cls, n in counts.items() if n >= 2 and not cls.__module__.startswith("torch.")}
    leaves: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if type(child) in repeated and not any(type(m) in repeated for m in child.modules() if m is not child):
                leaves.append(child)
            else:
                visit(child)
    visit(model)
    if not leaves:
        return []
    block = Counter(type(m) for m in leaves).most_common(1)[0][0]
    leaves = [m for m in leaves if type(m) is block]
    shapes = Counter(_signature(m) for m in leaves)
    return [m for m in leaves if shapes[_signature(m)] >= 2]


def _signature(module: nn.Module) -> tuple:
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


def compile_model(model: nn.Module, mode: str, compile_mode: str = "default",
                  note: Callable[[str], None] = print) -> nn.Module:
    """Return the training forward for ``mode``: ``model`` itself (off; branches and regions, compiled in
    place) or ``torch.compile(model)``. A model without ``compile_units`` (branches) or without repeated
    blocks (regions) falls back to model (noted)."""
    if mode == "off":
        return model
    if mode not in MODES:
        raise ValueError(f"train.compile: unknown value '{mode}'; choose from {', '.join(MODES)}")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if mode in ("branches", "regions"):
        inner = getattr(model, "module", model)  # under DDP: the wrapped model
        units = compile_units(inner) if mode == "branches" else compile_regions(inner) or None
        if units is None:
            what = "lists no compile_units()" if mode == "branches" else "has no repeated blocks"
            note(f"train.compile={mode}: {type(inner).__name__} {what}; compiling the whole model")
        else:
            for unit in units:
                unit.compile(mode=compile_mode, dynamic=False)
            return model
    return torch.compile(model, mode=compile_mode, dynamic=False)


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
