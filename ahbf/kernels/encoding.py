"""A distillation graph as the fused objective reads it: built once per graph, one table for the kernel.

``encode(graph)`` (cached by ``graph.key``) gives an :class:`EncodedGraph`:

- the KL edges folded into the three N x N mixing matrices ``A_w, A_t, A_s`` (defined and derived in
  ``analytic.py``) and the CE count of each node;
- ``tables(T, dtype, device)``: the kernel's two tables, an int32 one ``[ens_inputs (EA x WMAX), ens_col (EA),
  ens_width (EA)]`` (EA = max(E, 1)) and a float one ``[T, 1/T, ce_count (N), A_w, A_t, A_s]`` rounded once
  from float64; cached per (T, dtype, device), so a training step passes two pointers and builds nothing;
- the same matrices as Python constants (the nonzero entries of each row) for the compiled formulation,
  which unrolls them.

Score columns: the fused op reads one ``B x S`` score matrix (:func:`score_matrix`), the concatenation of
``s[ens.score]`` (zeros for an equal-weight ensemble) over the ensembles in order, so ensemble ``k`` owns
columns ``ens_col[k] : ens_col[k] + ens_width[k]``. A score tensor used by two ensembles appears twice;
autograd of the concatenation sums its gradient back.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .graph import DistillGraph, graph_by_key

TEACHER_NONE, TEACHER_SAME, TEACHER_OWN = 0, 1, 2  # teacher-side KL gradients: none (A_t = 0), A_t = A_w, own A_t

Rows = tuple[tuple[tuple[int, float], ...], ...]


def mixing_matrices(graph: DistillGraph) -> tuple[Tensor, Tensor, Tensor]:
    """(A_w, A_t, A_s) of ``analytic.py``'s docstring, float64 on CPU."""
    N = graph.num_nodes
    a_w, a_t, a_s = (torch.zeros(N, N, dtype=torch.float64) for _ in range(3))
    for e in graph.kl_edges:
        wt = 0.0 if e.detach else e.weight
        a_w[e.teacher, e.teacher] += e.weight
        a_w[e.teacher, e.student] -= e.weight
        a_t[e.teacher, e.teacher] += wt
        a_t[e.teacher, e.student] -= wt
        a_s[e.student, e.student] += e.weight
        a_s[e.student, e.teacher] -= e.weight
    return a_w, a_t, a_s


def _sparse_rows(a: Tensor) -> Rows:
    return tuple(tuple((m, float(a[n, m])) for m in range(a.shape[1]) if a[n, m] != 0) for n in range(a.shape[0]))


@dataclass(frozen=True, eq=False)
class EncodedGraph:
    """One graph's encoding (module docstring); build it with :func:`encode`."""

    graph: DistillGraph
    ce_weights: tuple[float, ...]   # CE terms on each node (0, 1, ...)
    mix: tuple[Tensor, Tensor, Tensor]  # (A_w, A_t, A_s), float64 on CPU
    teacher_mode: int               # TEACHER_NONE / TEACHER_SAME / TEACHER_OWN
    rows_w: Rows                    # per node, the nonzero entries (m, a[n, m]) of each mixing matrix
    rows_t: Rows
    rows_s: Rows
    ens_table: tuple[int, ...]      # the kernel's int table (module docstring)
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def num_branches(self) -> int:
        return self.graph.num_branches

    @property
    def num_nodes(self) -> int:
        return self.graph.num_nodes

    @property
    def num_ensembles(self) -> int:
        return len(self.graph.ensembles)

    @property
    def max_width(self) -> int:
        return max((len(e.inputs) for e in self.graph.ensembles), default=1)

    @property
    def score_cols(self) -> int:
        return sum(len(e.inputs) for e in self.graph.ensembles)

    def tables(self, T: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """The kernel's (int32, ``dtype``) tables on ``device`` (module docstring); cached."""
        key = (T, dtype, device)
        tables = self._tables.get(key)
        if tables is None:
            head = torch.tensor([T, 1.0 / T, *self.ce_weights], dtype=torch.float64)
            gf = torch.cat([head, *(a.flatten() for a in self.mix)]).to(device, dtype)
            tables = self._tables[key] = (torch.tensor(self.ens_table, dtype=torch.int32, device=device), gf)
        return tables


@functools.lru_cache(maxsize=None)
def _encode(key: int) -> EncodedGraph:
    graph = graph_by_key(key)
    ens = graph.ensembles
    width = max((len(e.inputs) for e in ens), default=1)
    inputs = [i for e in ens for i in (*e.inputs, *[0] * (width - len(e.inputs)))] or [0] * width
    cols = [sum(len(e.inputs) for e in ens[:k]) for k in range(len(ens))] or [0]
    widths = [len(e.inputs) for e in ens] or [0]
    a_w, a_t, a_s = mixing_matrices(graph)
    mode = TEACHER_NONE if not a_t.any() else TEACHER_SAME if torch.equal(a_t, a_w) else TEACHER_OWN
    return EncodedGraph(
        graph=graph, ce_weights=tuple(float(graph.ce_nodes.count(n)) for n in range(graph.num_nodes)),
        mix=(a_w, a_t, a_s), teacher_mode=mode,
        rows_w=_sparse_rows(a_w), rows_t=_sparse_rows(a_t), rows_s=_sparse_rows(a_s),
        ens_table=tuple(inputs + cols + widths))


def encode(graph: DistillGraph | int) -> EncodedGraph:
    """The encoding of ``graph`` (or of the graph registered under that key); built once per graph."""
    return _encode(graph if isinstance(graph, int) else graph.key)


def score_matrix(s: Sequence[Tensor], graph: DistillGraph, like: Tensor) -> Tensor:
    """The ``B x S`` score matrix the fused op reads (module docstring); ``B x 0`` without ensembles."""
    if not graph.ensembles:
        return like.new_zeros((like.shape[0], 0))
    order = [e.score for e in graph.ensembles]
    if order == [0]:
        return s[0]
    dt = s[0].dtype if s else like.dtype
    zeros = {len(e.inputs): like.new_zeros((like.shape[0], len(e.inputs)), dtype=dt)
             for e in graph.ensembles if e.score is None}  # equal-weight ensembles: softmax(0) = 1/n
    return torch.cat([zeros[len(e.inputs)] if e.score is None else s[e.score] for e in graph.ensembles], dim=1)
