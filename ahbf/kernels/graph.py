"""The distillation graph: which logits exist, which get cross-entropy, which distil which.

Node ids: ``0 .. M-1`` are the branch logits ``z_i`` (0 = target branch); ``M + k`` is the k-th
gated ensemble ``e_k`` (a teacher assistant for AHBF, the gated ensemble for ONE). An ensemble
combines earlier nodes with per-sample weights ``softmax(s[score])``; its score tensor is
``B x len(inputs)`` (``score=None``: fixed equal weights, the plain mean of its inputs). Input nodes
need not be trainable branches: a model or task may append constant teachers (EMA peers, a
label-dependent target) as extra inputs whose KL edges are detached; ``names`` labels the nodes.
The objective (SPEC 4) is

    L = sum_{n in ce_nodes} CE(node_n, y) + kd_scale * sum_{edges} weight * KL_T(student || teacher)

with ``KL_T(s || t) = T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch. Each method's
module (``ahbf/methods/``) holds the constructor of its graph (docs/methods.md); the eager reference and the
fused kernels all read this one structure.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ensemble:
    """A gated ensemble node: ``sum_j softmax(s[score])[:, j] * node[inputs[j]]``; ``score=None``: the mean."""

    inputs: tuple[int, ...]
    score: int | None


@dataclass(frozen=True)
class KLEdge:
    """``weight * KL_T(student || teacher)``; ``detach`` stops gradients into the teacher side."""

    student: int
    teacher: int
    weight: float = 1.0
    detach: bool = False


@dataclass(frozen=True)
class DistillGraph:
    name: str
    num_branches: int
    ensembles: tuple[Ensemble, ...]
    ce_nodes: tuple[int, ...]
    kl_edges: tuple[KLEdge, ...]
    names: tuple[str, ...] = ()
    """optional node names (evaluation tables); empty: branch<i> / ta<k>"""
    key: int = field(init=False, repr=False, compare=False)
    """content hash of the structure (not the names): what the fused op receives (:func:`graph_by_key`)"""

    def __post_init__(self):
        if self.num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {self.num_branches}")
        for k, ens in enumerate(self.ensembles):
            if len(ens.inputs) < 2 or any(not 0 <= i < self.num_branches + k for i in ens.inputs):
                raise ValueError(f"ensemble {k} has invalid inputs {ens.inputs}")
        scores = sorted({ens.score for ens in self.ensembles if ens.score is not None})
        if scores != list(range(len(scores))):
            raise ValueError(f"ensemble score indices must be 0..{len(scores) - 1} without gaps, got {scores}")
        nodes = range(self.num_nodes)
        if not self.ce_nodes:
            raise ValueError("ce_nodes: a graph needs at least one cross-entropy node")
        if any(n not in nodes for n in self.ce_nodes):
            raise ValueError(f"ce_nodes {self.ce_nodes} reference unknown nodes")
        for e in self.kl_edges:
            if e.student not in nodes or e.teacher not in nodes or e.student == e.teacher:
                raise ValueError(f"invalid KL edge {e}")
        if self.names and len(self.names) != self.num_nodes:
            raise ValueError(f"names: expected {self.num_nodes} node names, got {len(self.names)}")
        _register(self)

    def __reduce__(self):  # unpickled through __init__, so another process registers the graph under its key
        return (DistillGraph, (self.name, self.num_branches, self.ensembles, self.ce_nodes, self.kl_edges, self.names))

    @property
    def num_nodes(self) -> int:
        return self.num_branches + len(self.ensembles)

    @property
    def score_widths(self) -> tuple[int, ...]:
        """Width of each score tensor ``s[j]`` the model must return (in score-index order)."""
        widths: dict[int, int] = {}
        for ens in self.ensembles:
            if ens.score is None:
                continue
            if widths.setdefault(ens.score, len(ens.inputs)) != len(ens.inputs):
                raise ValueError(f"score {ens.score} is used with two different widths")
        return tuple(widths[j] for j in range(len(widths)))

    def node_name(self, n: int) -> str:
        if self.names:
            return self.names[n]
        return f"branch{n}" if n < self.num_branches else f"ta{n - self.num_branches}"


# ---- every graph is registered at construction under a content hash of its structure. The fused op takes
# that key (an int) instead of the graph: a custom op cannot take a Python object, and a hash is the same
# in every process (inductor's on-disk cache may replay a traced call in another one), unlike a counter.

_REGISTRY: dict[int, DistillGraph] = {}


def _structure(g: DistillGraph) -> tuple:
    return (g.num_branches, tuple((e.inputs, e.score) for e in g.ensembles), g.ce_nodes,
            tuple((e.student, e.teacher, e.weight, e.detach) for e in g.kl_edges))


def _register(g: DistillGraph) -> None:
    structure = _structure(g)
    key = int.from_bytes(hashlib.blake2b(repr(structure).encode(), digest_size=7).digest(), "little")
    object.__setattr__(g, "key", key)
    known = _REGISTRY.setdefault(key, g)
    if known is not g and _structure(known) != structure:  # 2^-56 per pair; never silently the wrong graph
        raise RuntimeError(f"graph key collision between {known} and {g}")


def graph_by_key(key: int) -> DistillGraph:
    """The registered graph (the first constructed one) with this structure key."""
    try:
        return _REGISTRY[key]
    except KeyError:
        raise KeyError(f"no distillation graph with key {key} was built in this process") from None
