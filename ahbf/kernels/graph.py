"""The distillation graph: which logits exist, which get cross-entropy, which distil which.

Node ids: ``0 .. M-1`` are the branch logits ``z_i`` (0 = target branch); ``M + k`` is the k-th
gated ensemble ``e_k`` (a teacher assistant for AHBF, the gated ensemble for ONE). An ensemble
combines earlier nodes with per-sample weights ``softmax(s[score])``; its score tensor is
``B x len(inputs)`` (``score=None``: fixed equal weights, the plain mean of its inputs). Input nodes
need not be trainable branches: a model or task may append constant teachers (EMA peers, a
label-dependent target) as extra inputs whose KL edges are detached; ``names`` labels the nodes.
The objective (SPEC 4) is

    L = sum_{n in ce_nodes} CE(node_n, y) + kd_scale * sum_{edges} weight * KL_T(student || teacher)

with ``KL_T(s || t) = T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch. AHBF, ONE,
DML, CL-ILR, OKDDip, KDCL, PCL and the plain baseline are constructors of this one structure
(docs/methods.md); the eager reference and the fused kernels all read it.
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


def baseline_graph(num_branches: int = 1, detach_teacher: bool = True) -> DistillGraph:
    """A plain network: cross-entropy on its one output (the arguments are ignored: one output, no KL edges)."""
    return DistillGraph("baseline", 1, (), (0,), ())


def _check_branches(method: str, M: int, low: int) -> None:
    if M < low:
        raise ValueError(f"num_branches must be >= {low} for {method}, got {M}")


def _mean_node(inputs: tuple[int, ...], ensembles: list[Ensemble], first_node: int) -> int:
    """The node holding the plain mean of ``inputs``: the input itself if there is one, else a new ensemble."""
    if len(inputs) == 1:
        return inputs[0]
    ensembles.append(Ensemble(inputs, None))
    return first_node + len(ensembles) - 1


def branch_names(M: int) -> tuple[str, ...]:
    return tuple(f"branch{i}" for i in range(M))


def cl_ilr_graph(num_branches: int, detach_teacher: bool = False) -> DistillGraph:
    """CL-ILR (DefangChen/OKDDip ``train_one.py --avg``): each branch distils from the mean of the others'
    logits; the public code does not detach that target. No CE on the targets."""
    M = num_branches
    _check_branches("cl_ilr", M, 2)
    ensembles: list[Ensemble] = []
    targets = [_mean_node(tuple(j for j in range(M) if j != k), ensembles, M) for k in range(M)]
    edges = tuple(KLEdge(k, t, 1.0, detach_teacher) for k, t in enumerate(targets))
    names = branch_names(M) + tuple(f"mean_others{k}" for k in range(M) if targets[k] >= M)
    return DistillGraph("cl_ilr", M, tuple(ensembles), tuple(range(M)), edges, names)


def okddip_graph(num_branches: int, detach_teacher: bool = False) -> DistillGraph:
    """OKDDip (``train_GL.py``): branch 0 is the group leader, branches 1..M-1 the auxiliary peers.

    Peer i distils from its own attention ensemble of all peers (score tensor i-1: the B x (M-1)
    attention energies of peer i, softmaxed here); the leader distils from the peers' mean. CE on every
    branch; the public code detaches no target.
    """
    M = num_branches
    _check_branches("okddip", M, 3)
    peers = tuple(range(1, M))
    ensembles = [Ensemble(peers, k) for k in range(M - 1)] + [Ensemble(peers, None)]
    edges = tuple(KLEdge(i, M + i - 1, 1.0, detach_teacher) for i in peers) + (KLEdge(0, 2 * M - 1, 1.0, detach_teacher),)
    names = branch_names(M) + tuple(f"peer_target{i}" for i in peers) + ("peer_mean",)
    return DistillGraph("okddip", M, tuple(ensembles), tuple(range(M)), edges, names)


def kdcl_graph(num_branches: int, detach_teacher: bool = True, variant: str = "minlogit") -> DistillGraph:
    """KDCL (Guo et al. 2020): every peer distils from one soft target built from all peers' logits.

    ``minlogit``: the target is an extra input node M (``min_m (z^m - z^m_y)``, built by the task from the
    labels, a constant); ``naive``: the target is the peers' mean logits (an equal-weight ensemble).
    """
    M = num_branches
    _check_branches("kdcl", M, 2)
    edges = tuple(KLEdge(i, M, 1.0, detach_teacher) for i in range(M))
    if variant == "minlogit":
        return DistillGraph("kdcl", M + 1, (), tuple(range(M)), edges, branch_names(M) + ("minlogit",))
    if variant == "naive":
        ens = (Ensemble(tuple(range(M)), None),)
        return DistillGraph("kdcl", M, ens, tuple(range(M)), edges, branch_names(M) + ("peer_mean",))
    raise ValueError(f"kdcl variant: unknown value {variant!r}; choose from minlogit, naive")


def pcl_graph(num_branches: int, detach_teacher: bool = True, target: str = "mean_logits") -> DistillGraph:
    """PCL (Wu & Gong 2021). Inputs: M peers, the peer-ensemble head (node M), the M temporal-mean (EMA)
    peers (nodes M+1..2M, constants from the model). CE on the peers and the head; each peer distils from
    the head (L_pe) and from the other peers' EMA logits (L_pm, the peer mean teacher): ``mean_logits``,
    one KL to the mean of their logits; ``mean_kl``, the mean of one KL to each (the public reproduction)."""
    M = num_branches
    _check_branches("pcl", M, 2)
    if target not in ("mean_logits", "mean_kl"):
        raise ValueError(f"pcl target: unknown value {target!r}; choose from mean_logits, mean_kl")
    ema = [M + 1 + i for i in range(M)]
    edges = tuple(KLEdge(i, M, 1.0, detach_teacher) for i in range(M))
    names = branch_names(M) + ("peer_ensemble",) + tuple(f"ema_branch{i}" for i in range(M))
    if target == "mean_kl":
        w = 1.0 / (M - 1)
        edges += tuple(KLEdge(i, ema[j], w, True) for i in range(M) for j in range(M) if j != i)
        return DistillGraph("pcl", 2 * M + 1, (), tuple(range(M + 1)), edges, names)
    ensembles: list[Ensemble] = []
    teachers = [_mean_node(tuple(ema[j] for j in range(M) if j != i), ensembles, 2 * M + 1) for i in range(M)]
    edges += tuple(KLEdge(i, t, 1.0, True) for i, t in enumerate(teachers))
    names += tuple(f"peer_mean_teacher{i}" for i in range(M) if teachers[i] > 2 * M)
    return DistillGraph("pcl", 2 * M + 1, tuple(ensembles), tuple(range(M + 1)), edges, names)


def build_graph(method: str, num_branches: int, **kwargs) -> DistillGraph:
    """Graph for ``method`` (a name of ``ahbf.methods.METHODS``); kwargs go to its constructor."""
    from ..methods import get_method  # the method table imports the constructors above

    return get_method(method).graph(num_branches, **kwargs)
