"""The OKD objective with analytic gradients, vectorised over KL edges: the ``compiled`` backend.

The eager objective it replaces is ``okd_objective_reference``::

    nodes = z + [sum_j softmax(s[score])_j * nodes[inputs[j]] for each ensemble]
    loss  = sum_{n in ce_nodes} CE(nodes[n], y) + kd_scale * sum_e w_e * KL_T(nodes[s_e] || nodes[t_e])

Gradients, per row (B = batch, q = softmax(x), p = softmax(x / T)):

    dCE(n)/dn       = (q_n - onehot(y)) / B
    dKL_T(s||t)/ds  = T / B * (p_s - p_t)
    dKL_T(s||t)/dt  = T / B * p_t * ((log p_t - log p_s) - KL_row)      (zero if the edge is detached)
    ensemble e = sum_j g_j in_j:  dL/d in_j += g_j dL/de;  dL/dg_j = <dL/de, in_j>;
                                  dL/ds = g * (dL/dg - <g, dL/dg>)        (reverse topological order)

with KL_row = sum_k p_t (log p_t - log p_s); kd_scale * w_e multiplies the KL gradients.

Vectorised over edges: the edges are folded into three N x N mixing matrices (N = number of nodes),

    A_w[n, m] = sum_{e: t_e = n} w_e  ([m = n] - [m = s_e])      teacher rows, full weights
    A_t[n, m] = the same with w_e -> 0 for detached edges
    A_s[n, m] = sum_{e: s_e = n} w_e  ([m = n] - [m = t_e])      student rows

so that, with logp_n = log p_n stacked over nodes,

    sum_e w_e KL_row(e)   = sum_n <p_n, (A_w logp)_n>
    d(sum_e w_e KL_T)/dx_n = T / B * [ (A_s p)_n + p_n * ((A_t logp)_n - <p_n, (A_t logp)_n>) ]

Rows of A_w and A_t sum to zero, so their log-sum-exp parts cancel: ``(A logp)_n = (A x / T)_n`` up to a
per-row constant, which lets the Triton kernel accumulate these sums online over chunks of classes.

The graph is encoded once per graph and device as small tensors (:class:`GraphTensors`); the Triton
launcher reads the same encoding. ``okd.py`` wraps :func:`okd_analytic` in ``torch.compile``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .graph import DistillGraph

TEACHER_NONE, TEACHER_SAME, TEACHER_OWN = 0, 1, 2  # how teacher-side KL gradients are formed (see mix_t)


@dataclass(frozen=True, eq=False)
class GraphTensors:
    """A distillation graph as small tensors on one device.

    Score columns: the fused op reads one ``B x S`` score matrix (:func:`score_matrix`), the
    concatenation of ``s[ens.score]`` over the ensembles in order, so ensemble ``k`` owns columns
    ``ens_col[k] : ens_col[k] + ens_width[k]``. A score tensor used by two ensembles appears twice;
    autograd of the concatenation sums its gradient back.
    """

    graph: DistillGraph
    ens_inputs: Tensor   # int32 [E, max width], padded with 0
    ens_col: Tensor      # int32 [E], first score column of ensemble k
    ens_width: Tensor    # int32 [E]
    ce_count: Tensor     # float32 [N], number of CE terms on each node (0, 1, ...)
    mix_w: Tensor        # float32 [N, N], A_w above
    mix_t: Tensor        # float32 [N, N], A_t above
    mix_s: Tensor        # float32 [N, N], A_s above
    teacher_mode: int    # TEACHER_NONE: A_t == 0; TEACHER_SAME: A_t == A_w; TEACHER_OWN: otherwise

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


_ENCODINGS: dict[tuple[DistillGraph, torch.device], GraphTensors] = {}


def mixing_matrices(graph: DistillGraph) -> tuple[Tensor, Tensor, Tensor]:
    """(A_w, A_t, A_s) of the module docstring, float64 on CPU."""
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


def encode_graph(graph: DistillGraph, device: torch.device | str) -> GraphTensors:
    """The tensor encoding of ``graph`` on ``device``; cached, so built once per graph and device."""
    device = torch.device(device)
    enc = _ENCODINGS.get((graph, device))
    if enc is None:
        ens = graph.ensembles
        width = max((len(e.inputs) for e in ens), default=1)
        inputs = [list(e.inputs) + [0] * (width - len(e.inputs)) for e in ens] or [[0] * width]
        cols = [sum(len(e.inputs) for e in ens[:k]) for k in range(len(ens))]
        a_w, a_t, a_s = mixing_matrices(graph)
        mode = TEACHER_NONE if not a_t.any() else TEACHER_SAME if torch.equal(a_t, a_w) else TEACHER_OWN
        i32, f32 = dict(dtype=torch.int32, device=device), dict(dtype=torch.float32, device=device)
        enc = GraphTensors(
            graph=graph,
            ens_inputs=torch.tensor(inputs, **i32),
            ens_col=torch.tensor(cols or [0], **i32),
            ens_width=torch.tensor([len(e.inputs) for e in ens] or [0], **i32),
            ce_count=torch.tensor([float(graph.ce_nodes.count(n)) for n in range(graph.num_nodes)], **f32),
            mix_w=a_w.to(**f32), mix_t=a_t.to(**f32), mix_s=a_s.to(**f32), teacher_mode=mode)
        _ENCODINGS[(graph, device)] = enc
    return enc


def score_matrix(s: Sequence[Tensor], graph: DistillGraph, like: Tensor) -> Tensor:
    """The ``B x S`` score matrix the fused op reads (see :class:`GraphTensors`); ``B x 0`` without ensembles."""
    if not graph.ensembles:
        return like.new_zeros((like.shape[0], 0))
    order = [e.score for e in graph.ensembles]
    if order == [0]:
        return s[0]
    return torch.cat([s[j] for j in order], dim=1)


def _mix(a: Tensor, x: Tensor) -> Tensor:
    """``(a @ x)`` over the node axis: [N, N] x [N, B, K]; a broadcast-sum, which inductor fuses."""
    return (a[:, :, None, None] * x[None]).sum(1)


def okd_analytic(z: Sequence[Tensor], scores: Tensor, labels: Tensor, T: float, kd_scale: Tensor,
                 ce_count: Tensor, mix_w: Tensor, mix_t: Tensor, mix_s: Tensor, *,
                 graph: DistillGraph, teacher_mode: int, need_grad: bool = True):
    """Loss, CE sum, KD sum and (if ``need_grad``) the loss gradients w.r.t. ``z`` and ``scores``.

    The graph's tensors come as arguments (so a compiled version does not bake them in), its
    structure as keywords. Math in float32 (float64 for float64 inputs); gradients are returned in the
    input dtypes. Returns ``(loss, ce, kd, [dz_i], dscores)``; ``[]`` and zeros without ``need_grad``.
    """
    M = graph.num_branches
    dt = torch.float64 if z[0].dtype == torch.float64 else torch.float32
    B = z[0].shape[0]
    inv_b = 1.0 / B
    nodes = [zi.to(dt) for zi in z]
    gates, col = [], 0
    for ens in graph.ensembles:                       # gated ensembles, in topological order
        g = torch.softmax(scores[:, col:col + len(ens.inputs)].to(dt), dim=-1)
        col += len(ens.inputs)
        gates.append(g)
        acc = g[:, 0:1] * nodes[ens.inputs[0]]
        for j in range(1, len(ens.inputs)):
            acc = acc + g[:, j:j + 1] * nodes[ens.inputs[j]]
        nodes.append(acc)
    X = torch.stack(nodes)                            # [N, B, K]
    ce_count, mix_w, mix_t, mix_s = (t.to(dt) for t in (ce_count, mix_w, mix_t, mix_s))

    lse1 = torch.logsumexp(X, dim=-1)                 # [N, B]
    picked = X.gather(2, labels.view(1, B, 1).expand(X.shape[0], B, 1)).squeeze(2)
    ce = (ce_count[:, None] * (lse1 - picked)).sum() * inv_b
    logp = torch.log_softmax(X * (1.0 / T), dim=-1)
    p = logp.exp()
    lw = _mix(mix_w, logp)
    qw = (p * lw).sum(-1)                             # [N, B]: sum of w_e KL_row over edges taught by n
    kd = qw.sum() * (T * T * inv_b)
    kd_scale = kd_scale.to(dt)
    loss = ce + kd_scale * kd
    if not need_grad:
        return loss, ce, kd, [], torch.zeros_like(scores)

    onehot = torch.zeros_like(X[0]).scatter_(1, labels.view(B, 1), 1.0)
    D = (ce_count[:, None, None] * inv_b) * (torch.exp(X - lse1[..., None]) - onehot)
    c = kd_scale * (T * inv_b)
    D = D + c * _mix(mix_s, p)
    if teacher_mode != TEACHER_NONE:
        lt = lw if teacher_mode == TEACHER_SAME else _mix(mix_t, logp)
        qt = qw if teacher_mode == TEACHER_SAME else (p * lt).sum(-1)
        D = D + c * p * (lt - qt[..., None])

    dnodes = list(D.unbind(0))                        # back through the ensembles, last first
    dscores = []
    for k in range(len(graph.ensembles) - 1, -1, -1):
        ens, g = graph.ensembles[k], gates[k]
        a = dnodes[M + k]
        dg = torch.stack([(a * nodes[i]).sum(-1) for i in ens.inputs], dim=-1)     # [B, W]
        for j, i in enumerate(ens.inputs):
            dnodes[i] = dnodes[i] + g[:, j:j + 1] * a
        dscores.append(g * (dg - (g * dg).sum(-1, keepdim=True)))
    dscores.reverse()
    ds = torch.cat(dscores, dim=1).to(scores.dtype) if dscores else torch.zeros_like(scores)
    return loss, ce, kd, [dnodes[i].to(z[i].dtype) for i in range(M)], ds
