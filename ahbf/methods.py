"""The online-KD methods: one record per method, the single home of what a method is.

A method is a distillation graph (its constructor in ``ahbf.kernels.graph``), the model it trains, and
the defaults its public code uses for the values a config leaves at ``auto``. Everything else reads this
table: ``create_model`` (model kind, architecture families, branch count), ``build_graph`` (constructor),
``engine/resolve.py`` (``resolve_objective``: the ``auto`` defaults), the task (``make_graph``: which config
values the constructor takes), the config choices and CLI help, and the benchmarks. Adding a method is one
record here plus its graph constructor (docs/methods.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .kernels.graph import (DistillGraph, ahbf_graph, baseline_graph, cl_ilr_graph, dml_graph, kdcl_graph,
                            okddip_graph, one_graph, pcl_graph)

# what a method trains (ahbf.models.registry.create_model builds it)
MULTI_BRANCH = "multi_branch"    # a shared trunk with M branches (MultiBranchNet)
PEERS = "peers"                  # M independent networks (PeerNet)
TEMPORAL_MEAN = "temporal_mean"  # a multi-branch network plus its EMA copy (TemporalMeanNet)
PLAIN = "plain"                  # one plain network
ALL_FAMILIES = ("resnet", "vgg", "densenet", "mobilenetv2")


@dataclass(frozen=True)
class Method:
    name: str
    """the ``model.method`` value"""
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
    """the model kind: MULTI_BRANCH | PEERS | TEMPORAL_MEAN | PLAIN"""
    families: tuple[str, ...]
    """the architecture families whose builders make this model (ahbf.models.registry.Arch.family)"""
    min_branches: int
    """the least ``model.num_branches`` the method takes (PLAIN: always 1)"""
    options: tuple[tuple[str, str], ...] = ()
    """(constructor keyword, ``objective`` config field) pairs that ``make_graph`` passes to ``graph``"""
    description: str = ""
    """one line for help texts and docs"""


_RESNETS = ("resnet",)
_AHBF_R = 240 / 300  # the AHBF script: R = 240 of 300 epochs (also used where the ramp is constant: moot)
_SCRIPT_R = 80 / 300  # ONE's cifar_one.py, the OKDDip scripts, the PCL reproduction: R = 80 of 300 epochs
_TABLE = (  # in the order of the comparison tables: the baseline first, AHBF last
    Method("baseline", "Baseline", baseline_graph, True, "constant", _AHBF_R, 1.0, PLAIN, ALL_FAMILIES, 1,
           description="a plain single network, cross-entropy only"),
    Method("dml", "DML", dml_graph, True, "constant", _AHBF_R, 1.0, PEERS, ALL_FAMILIES, 2,
           description="M independent networks, each distils from the mean of the KLs to the others"),
    Method("one", "ONE", one_graph, True, "consistency", _SCRIPT_R, 1.0, MULTI_BRANCH, ALL_FAMILIES, 2,
           description="identical branches on a shared trunk; every branch distils from their gated ensemble"),
    Method("cl_ilr", "CL-ILR", cl_ilr_graph, False, "consistency", _SCRIPT_R, 1.0, MULTI_BRANCH, _RESNETS, 2,
           description="identical branches, 1/M trunk gradient; each distils from the mean of the others' logits"),
    Method("okddip", "OKDDip", okddip_graph, False, "consistency", _SCRIPT_R, 1.0, MULTI_BRANCH, _RESNETS, 3,
           description="a leader and M-1 peers; each peer distils from its own attention ensemble of the peers"),
    Method("kdcl", "KDCL", kdcl_graph, True, "constant", _AHBF_R, 1.0, PEERS, _RESNETS, 2,
           (("variant", "kdcl_target"),),
           description="M independent networks distil from one soft target built from all (MinLogit)"),
    Method("pcl", "PCL", pcl_graph, True, "consistency", _SCRIPT_R, 1.0, TEMPORAL_MEAN, _RESNETS, 2,
           (("target", "pcl_target"),),
           description="branches + a peer-ensemble head + their temporal mean (EMA) network as peer teachers"),
    Method("ahbf", "AHBF", ahbf_graph, False, "sigmoid", _AHBF_R, 1.5, MULTI_BRANCH, ALL_FAMILIES, 2,
           (("lambda1", "lambda1"), ("lambda2", "lambda2")),
           description="branches of increasing depth, recursively fused into a ladder of teacher assistants"),
)
METHODS: dict[str, Method] = {m.name: m for m in _TABLE}


def get_method(name: str) -> Method:
    """The record of ``name``; an unknown name raises a one-line ValueError listing the valid ones."""
    method = METHODS.get(name)
    if method is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return method


def methods_for(family: str) -> list[str]:
    """The methods an architecture family builds."""
    return [m.name for m in _TABLE if family in m.families]


def methods_markdown() -> str:
    """The method table as Markdown (docs/methods.md embeds it; a test keeps it current)."""
    lines = ["| `--method` | name | model | families | branches | ramp (auto) | rampup (auto) | teacher (auto) "
             "| kd_weight (auto) | what |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in _TABLE:
        teacher = "(no KL)" if m.model == PLAIN else "detached" if m.detach else "not detached"
        branches = "1" if m.model == PLAIN else f">= {m.min_branches}"
        lines.append(f"| `{m.name}` | {m.label} | {m.model} | {', '.join(m.families)} | {branches} | "
                     f"{m.ramp} | {m.rampup * 300:g} of 300 epochs | {teacher} | {m.kd_weight:g} | {m.description} |")
    return "\n".join(lines)
