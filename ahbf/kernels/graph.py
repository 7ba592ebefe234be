"""The distillation graph: which logits exist, which get cross-entropy, which distil which.

Node ids: ``0 .. M-1`` are the branch logits ``z_i`` (0 = target branch); ``M + k`` is the k-th
gated ensemble ``e_k`` (a teacher assistant for AHBF, the gated ensemble for ONE). An ensemble
combines earlier nodes with per-sample weights ``softmax(s[score])``; its score tensor is
``B x len(inputs)``. The objective (SPEC 4) is

    L = sum_{n in ce_nodes} CE(node_n, y) + kd_scale * sum_{edges} weight * KL_T(student || teacher)

with ``KL_T(s || t) = T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch. AHBF, ONE,
DML and the plain baseline are four constructors of this one structure; the eager reference and the
fused kernels all read it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ensemble:
    """A gated ensemble node: ``sum_j softmax(s[score])[:, j] * node[inputs[j]]``."""

    inputs: tuple[int, ...]
    score: int


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

    def __post_init__(self):
        if self.num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {self.num_branches}")
        for k, ens in enumerate(self.ensembles):
            if len(ens.inputs) < 2 or any(not 0 <= i < self.num_branches + k for i in ens.inputs):
                raise ValueError(f"ensemble {k} has invalid inputs {ens.inputs}")
        scores = sorted({ens.score for ens in self.ensembles})
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

    @property
    def num_nodes(self) -> int:
        return self.num_branches + len(self.ensembles)

    @property
    def score_widths(self) -> tuple[int, ...]:
        """Width of each score tensor ``s[j]`` the model must return (in score-index order)."""
        widths: dict[int, int] = {}
        for ens in self.ensembles:
            if widths.setdefault(ens.score, len(ens.inputs)) != len(ens.inputs):
                raise ValueError(f"score {ens.score} is used with two different widths")
        return tuple(widths[j] for j in range(len(widths)))

    def node_name(self, n: int) -> str:
        return f"branch{n}" if n < self.num_branches else f"ta{n - self.num_branches}"


def ahbf_graph(num_branches: int, lambda1: float = 1.0, lambda2: float = 1.0,
               detach_teacher: bool = False) -> DistillGraph:
    """AHBF (SPEC 3-4): recursive 2-way fusions e_0..e_{M-2}; dkd edges weigh lambda2, ekd lambda1."""
    M = num_branches
    if M < 2:
        raise ValueError(f"num_branches must be >= 2 for AHBF, got {M}")
    ensembles, edges = [], []
    for k in range(M - 1):
        prev = 0 if k == 0 else M + k - 1  # z_0 at the first level, else the previous TA
        cur_branch, cur_ta = k + 1, M + k
        ensembles.append(Ensemble(inputs=(prev, cur_branch), score=k))
        edges.append(KLEdge(prev, cur_branch, lambda2, detach_teacher))        # L_dkd
        edges.append(KLEdge(prev, cur_ta, lambda1, detach_teacher))            # L_ekd
        edges.append(KLEdge(cur_branch, cur_ta, lambda1, detach_teacher))      # L_ekd
    return DistillGraph("ahbf", M, tuple(ensembles), tuple(range(2 * M - 1)), tuple(edges))


def one_graph(num_branches: int, detach_teacher: bool = True) -> DistillGraph:
    """ONE (SPEC 5): one M-way gated ensemble e; every branch distils from e (detached by default)."""
    M = num_branches
    if M < 2:
        raise ValueError(f"num_branches must be >= 2 for ONE, got {M}")
    edges = tuple(KLEdge(i, M, 1.0, detach_teacher) for i in range(M))
    return DistillGraph("one", M, (Ensemble(tuple(range(M)), 0),), tuple(range(M + 1)), edges)


def dml_graph(num_branches: int, detach_teacher: bool = True) -> DistillGraph:
    """DML (SPEC 5): each peer gets the mean over the others of KL_T(peer || other) (others detached by default)."""
    M = num_branches
    if M < 2:
        raise ValueError(f"num_branches must be >= 2 for DML, got {M}")
    w = 1.0 / (M - 1)
    edges = tuple(KLEdge(i, j, w, detach_teacher) for i in range(M) for j in range(M) if i != j)
    return DistillGraph("dml", M, (), tuple(range(M)), edges)


def baseline_graph() -> DistillGraph:
    """A plain network: cross-entropy on its one output."""
    return DistillGraph("baseline", 1, (), (0,), ())


GRAPHS = {"ahbf": ahbf_graph, "one": one_graph, "dml": dml_graph}


def build_graph(method: str, num_branches: int, **kwargs) -> DistillGraph:
    """Graph for ``method`` in {ahbf, one, dml, baseline}; kwargs go to the constructor."""
    if method == "baseline":
        return baseline_graph()
    if method not in GRAPHS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted([*GRAPHS, 'baseline'])}")
    return GRAPHS[method](num_branches, **kwargs)
