"""What an online-KD method is: the ``Method`` record, the ``Part`` its model carries, and graph helpers.

A method is one module (``ahbf/methods/<name>.py``, or a user's own file, docs/methods.md "Write your own
method") holding one ``Method`` record: its distillation graph constructor (``ahbf.kernels.graph``'s
structure), the model it trains, the model parts it adds to a multi-branch network, the defaults its public
code uses for the values a config leaves at ``auto``, and its hooks into the task. The engine reads the
record; it never tests a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..kernels.graph import DistillGraph, Ensemble

# what a method trains (ahbf.models.registry.create_model builds it)
MULTI_BRANCH = "multi_branch"  # a shared trunk with M branches (MultiBranchNet), plus the method's parts
PEERS = "peers"                # M independent networks (PeerNet)
PLAIN = "plain"                # one plain network
ALL_FAMILIES = ("resnet", "vgg", "densenet", "mobilenetv2")


@dataclass(frozen=True)
class Body:
    """What a multi-branch network has built when it asks the method for its parts."""

    trunk_channels: int
    """channels of the trunk's output map (the input of every branch)"""
    branch_channels: tuple[int, ...]
    """channels of each branch's last feature map (before pooling); branch 0 is the target"""
    num_classes: int

    @property
    def num_branches(self) -> int:
        return len(self.branch_channels)


class Part(nn.Module):
    """A method's module on a multi-branch network (AHBF's fusions, ONE's gate, OKDDip's attention, ...).

    The network calls ``enter(h)`` on the trunk output before the branches run (default: unchanged), then
    ``forward(h, feats)`` with the trunk output and every branch's last feature map; ``forward`` returns
    ``(logits, scores)``: extra logit tensors appended after the branches' (input nodes of the graph) and the
    score tensors of the graph's gated ensembles. ``compile_units()``: what ``train.compile=branches`` compiles
    as its own graph (default: the part itself)."""

    def enter(self, h: Tensor) -> Tensor:
        return h

    def forward(self, h: Tensor, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        raise NotImplementedError

    def compile_units(self) -> list[nn.Module]:
        return [self]


@dataclass(frozen=True)
class Method:
    """One online-KD method: everything the engine asks of it (docs/methods.md)."""

    name: str
    """the method's name: its ``model.method`` value if built in (a user's method is named by its import path)"""
    label: str
    """the name in tables and plots"""
    graph: Callable[..., DistillGraph]
    """the graph constructor: ``graph(num_branches, detach_teacher=..., **options)``"""
    detach: bool
    """the teacher side under ``objective.detach_teacher = auto`` (stop gradients into the teacher of each KL)"""
    ramp: str
    """the KD ramp under ``objective.ramp = auto``: sigmoid | consistency | constant"""
    rampup: float
    """``objective.rampup`` under ``auto``, as a fraction of ``train.epochs`` (the public script's R / its epochs)"""
    kd_weight: float
    """``objective.kd_weight`` under ``auto``"""
    model: str
    """the model kind: MULTI_BRANCH | PEERS | PLAIN"""
    families: tuple[str, ...]
    """the architecture families whose builders make this model (ahbf.models.registry.Arch.family; torchvision /
    timm models build every method)"""
    min_branches: int
    """the least ``model.num_branches`` the method takes (PLAIN: always 1)"""
    options: tuple[tuple[str, str], ...] = ()
    """(constructor keyword, ``objective`` config field) pairs that ``build_graph`` passes to ``graph``"""
    description: str = ""
    """one line for help texts and docs"""
    increasing_depth: bool = False
    """branches of increasing depth (SPEC 2): ``model.aux = auto`` takes the architecture's default step;
    False: ``auto`` is 0 (identical branches)"""
    parts: Callable[[Body], dict[str, Part]] | None = None
    """MULTI_BRANCH: the modules the method adds, by attribute name (its state-dict prefix), built after the
    trunk and branches"""
    wrap: Callable[[nn.Module], nn.Module] | None = None
    """MULTI_BRANCH: a model around the multi-branch network (PCL's temporal mean); it keeps that network as
    ``student`` (what ``ahbf-export`` exports)"""
    label_target: Callable[[DistillGraph], Callable[[list[Tensor], Tensor], Tensor] | None] | None = None
    """the task's hook for a teacher built from the labels: for a graph, None or ``target(logits, labels)``, a
    constant appended as the last input node in training (KDCL-MinLogit); evaluation leaves that node out"""
    after_step: Callable[[nn.Module, Any], None] | None = None
    """the task's hook after each optimiser step: ``after_step(model, objective_config)`` (PCL's EMA update)"""


# ---- helpers of the graph constructors

def check_branches(method: str, num_branches: int, low: int) -> None:
    if num_branches < low:
        raise ValueError(f"num_branches must be >= {low} for {method}, got {num_branches}")


def mean_node(inputs: tuple[int, ...], ensembles: list[Ensemble], first_node: int) -> int:
    """The node holding the plain mean of ``inputs``: the input itself if there is one, else a new ensemble."""
    if len(inputs) == 1:
        return inputs[0]
    ensembles.append(Ensemble(inputs, None))
    return first_node + len(ensembles) - 1


def branch_names(num_branches: int) -> tuple[str, ...]:
    return tuple(f"branch{i}" for i in range(num_branches))


def pooled(f: Tensor) -> Tensor:
    """Global average pool + flatten: (B, C, H, W) -> (B, C)."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)
