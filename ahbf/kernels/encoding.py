"""A distillation graph as the fused objective reads it: built once per graph, one table for the kernel.

``encode(graph)`` (cached by ``graph.key``) gives an :class:`EncodedGraph`:

- the KL edges folded into the three N x N mixing matrices ``A_w, A_t, A_s`` (defined and derived in
  ``analytic.py``) and the CE count of each node;
- ``tables(T, dtype, device)``: the kernel's two tables, an int32 one ``[ens_inputs (E x WMAX), ens_col (E),
  ens_width (E), ens_writes (E)]`` and a float one ``[T, 1/T, ce_count (N), A_w, A_t, A_s]`` rounded once
  from float64; cached per (T, dtype, device), so a training step passes two pointers and builds nothing;
- the same matrices as Python constants (the nonzero entries of each row) for the compiled formulation,
  which unrolls them.

Score columns: score tensor ``s[j]`` (``B x w_j``) owns columns ``score_offsets[j] : + w_j`` of the
``score_cols`` columns, in score order. The kernel reads each ensemble's score tensor where the model left it
(no concatenation): ``ens_col[k]`` is the first column of ensemble k's score (-1: equal weights, no score),
and ``ens_writes[k]`` is 1 for the first ensemble reading that score, which writes its gradient (ensembles
sharing a score add their ``dL/dgate`` to the same columns first). The gradient of ``s[j]`` is the
row-major ``B x w_j`` block at ``B * score_offsets[j]`` of the score part of the op's gradient buffer
(``plan.py``). :func:`score_matrix` concatenates the score tensors into that column order (``B x S``,
equal-weight ensembles as zeros) for the compiled formulation, which works on one matrix.
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
    def score_widths(self) -> tuple[int, ...]:
        return self.graph.score_widths

    @property
    def score_cols(self) -> int:
        """Columns of all score tensors together (each score once, however many ensembles read it)."""
        return sum(self.score_widths)

    @property
    def score_offsets(self) -> tuple[int, ...]:
        """First column of each score tensor ``s[j]`` (module docstring)."""
        w = self.score_widths
        return tuple(sum(w[:j]) for j in range(len(w)))

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
    inputs = [i for e in ens for i in (*e.inputs, *[0] * (width - len(e.inputs)))]
    swidths = graph.score_widths
    cols = [-1 if e.score is None else sum(swidths[:e.score]) for e in ens]
    widths = [len(e.inputs) for e in ens]
    writes = [int(e.score is not None and all(f.score != e.score for f in ens[:k])) for k, e in enumerate(ens)]
    a_w, a_t, a_s = mixing_matrices(graph)
    mode = TEACHER_NONE if not a_t.any() else TEACHER_SAME if torch.equal(a_t, a_w) else TEACHER_OWN
    return EncodedGraph(
        graph=graph, ce_weights=tuple(float(graph.ce_nodes.count(n)) for n in range(graph.num_nodes)),
        mix=(a_w, a_t, a_s), teacher_mode=mode,
        rows_w=_sparse_rows(a_w), rows_t=_sparse_rows(a_t), rows_s=_sparse_rows(a_s),
        ens_table=tuple(inputs + cols + widths + writes) or (0,))


def encode(graph: DistillGraph | int) -> EncodedGraph:
    """The encoding of ``graph`` (or of the graph registered under that key); built once per graph."""
    return _encode(graph if isinstance(graph, int) else graph.key)


@dataclass(frozen=True)
class GradLayout:
    """The fused op's gradients in one flat buffer of the math dtype: branch i's ``B x K`` at ``i * B * K``,
    then score j's ``B x w_j`` at ``M * B * K + B * score_offsets[j]`` (the module docstring)."""

    shapes: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, enc: EncodedGraph, B: int, K: int) -> GradLayout:
        return cls(((B, K),) * enc.num_branches + tuple((B, w) for w in enc.score_widths))

    @property
    def numel(self) -> int:
        return sum(b * k for b, k in self.shapes)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Each input's gradient, a view of ``flat``."""
        parts = flat.split_with_sizes([b * k for b, k in self.shapes])
        return [p.view(shape) for p, shape in zip(parts, self.shapes)]


def score_matrix(s: Sequence[Tensor], graph: DistillGraph, like: Tensor) -> Tensor:
    """The ``B x S`` concatenation of the score tensors in ensemble order (equal-weight ensembles: zero
    columns, softmax(0) = 1/n), as ``analytic.okd_analytic`` reads them; ``B x 0`` without ensembles."""
    if not graph.ensembles:
        return like.new_zeros((like.shape[0], 0))
    order = [e.score for e in graph.ensembles]
    if order == [0]:
        return s[0]
    dt = s[0].dtype if s else like.dtype
    zeros = {len(e.inputs): like.new_zeros((like.shape[0], len(e.inputs)), dtype=dt)
             for e in graph.ensembles if e.score is None}  # equal-weight ensembles: softmax(0) = 1/n
    return torch.cat([zeros[len(e.inputs)] if e.score is None else s[e.score] for e in graph.ensembles], dim=1)
