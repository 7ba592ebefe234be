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

The graph is encoded once (``encoding.py``): the matrices as a table for the Triton kernel, and as Python
constants (the nonzero entries of each row) that :func:`okd_analytic` unrolls, so ``torch.compile``
(``okd.py``) specialises it per graph and fuses each node's work into a few passes over [B, K]. Measured
on a 2-core CPU (B=256, K=1000, AHBF M=4), the unrolled sparse form was the fastest of three compiled variants: edge gathers ``logp[edge_index]`` plus
``index_add`` ran slower than eager (inductor's indirect indexing does not vectorise), dense ``A @ logp``
over a stacked [N, B, K] tensor reached about 2.7x, this form about 4x.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .encoding import TEACHER_OWN, TEACHER_SAME, EncodedGraph, score_matrix
from .graph import DistillGraph
from .reference import compute_dtype, grad_dtype


def _mix_row(row: tuple[tuple[int, float], ...], xs: list[Tensor]) -> Tensor | None:
    """``sum_m a[n, m] * xs[m]`` over the nonzero entries of one row of a mixing matrix (None if empty)."""
    acc = None
    for m, a in row:
        term = xs[m] * a
        acc = term if acc is None else acc + term
    return acc


def _log_sum(x: Tensor, m: Tensor) -> Tensor:
    """``log sum_k exp(x_k - m)`` along the last axis (m: the row max): log-softmax is ``(x - m) - _log_sum``."""
    return (x - m).exp().sum(-1, keepdim=True).log()


def _kl_eps(graph: DistillGraph, p: list[Tensor], logp: list[Tensor], eps: float, need_grad: bool):
    """The KL terms with the public code's ``q = p_t + eps`` (``reference.kl_t``), edge by edge.

    Returns ``sum_e w_e sum_rows sum_k q (log q - log p_s)`` and, per node, the gradient of that sum times
    B / T (``None`` where no edge reaches): student ``w (p_s sum_k q - q)``; teacher, unless detached,
    ``w p_t (d - <p_t, d>)`` with ``d = log q - log p_s``.
    """
    grads: list[Tensor | None] = [None] * len(p)
    kd = torch.zeros((), dtype=p[0].dtype, device=p[0].device)
    teachers: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def add(n: int, g: Tensor) -> None:
        grads[n] = g if grads[n] is None else grads[n] + g

    for e in graph.kl_edges:
        if e.teacher not in teachers:
            q = p[e.teacher] + eps
            teachers[e.teacher] = (q, q.log(), q.sum(-1, keepdim=True))
        q, logq, qsum = teachers[e.teacher]
        d = logq - logp[e.student]
        kd = kd + e.weight * (q * d).sum()
        if need_grad:
            add(e.student, e.weight * (p[e.student] * qsum - q))
            if not e.detach:
                pt = p[e.teacher]
                add(e.teacher, e.weight * pt * (d - (pt * d).sum(-1, keepdim=True)))
    return kd, grads


def okd_analytic(z: Sequence[Tensor], scores: Tensor, labels: Tensor, T: float, kd_scale: Tensor, *,
                 enc: EncodedGraph, need_grad: bool = True, eps: float = 0.0):
    """Loss, CE sum, KD sum and (if ``need_grad``) the loss gradients w.r.t. ``z`` and ``scores``.

    The graph's structure (ensembles, CE counts, nonzero entries of the mixing matrices) is read from
    ``enc`` as Python constants, so ``torch.compile`` specialises and unrolls it per graph; per node the
    work is a few fused elementwise passes and row reductions over [B, K]. Math in float32 (float64 for
    float64 inputs); gradients come back in ``grad_dtype`` (the op's backward scales, then casts). Returns
    ``(loss, ce, kd, [dz_i], dscores)``, with ``[]`` and zeros for the gradients without ``need_grad``.
    ``eps > 0``: the KL terms with the public code's ``p_t + eps`` (:func:`_kl_eps`, edge by edge).
    """
    graph = enc.graph
    M = graph.num_branches
    dt = compute_dtype(z[0])
    B = z[0].shape[0]
    inv_b, inv_t = 1.0 / B, 1.0 / T
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
    N = len(nodes)
    lab = labels.view(B, 1)

    # log-softmax from the logits shifted by their row max first (as torch.log_softmax): ``x - logsumexp(x)``
    # cancels two numbers of the logits' size (at |x| = 1e4 in fp32 that left the largest probabilities a
    # ~1e-3 relative error, the score gradients ~1% of the largest gradient). One max per node serves both
    # temperatures: max(x * inv_t) = max(x) * inv_t exactly (rounding is monotone).
    mx = [x.amax(-1, keepdim=True) for x in nodes]
    mx = [torch.where(m.abs() == float("inf"), 0.0, m) for m in mx]  # as inductor's logsumexp
    ls1 = [_log_sum(x, m) if c else None for x, m, c in zip(nodes, mx, enc.ce_weights)]  # CE nodes, T = 1
    ce = sum(c * ((mx[n] - nodes[n].gather(1, lab)) + ls1[n]).sum() for n, c in enumerate(enc.ce_weights) if c)
    ce = ce * inv_b
    logp = [(x * inv_t - m * inv_t) - _log_sum(x * inv_t, m * inv_t) for x, m in zip(nodes, mx)]
    p = [lp.exp() for lp in logp]
    if eps:
        kd, dkl = _kl_eps(graph, p, logp, eps, need_grad)
    else:
        lw = [_mix_row(row, logp) for row in enc.rows_w]
        qw = [None if l is None else (p[n] * l).sum(-1, keepdim=True) for n, l in enumerate(lw)]  # sum of w_e KL_row
        kd = sum((q.sum() for q in qw if q is not None), torch.zeros((), dtype=dt, device=z[0].device))
    kd = kd * (T * T * inv_b)
    kd_scale = kd_scale.to(dt)
    loss = ce + kd_scale * kd
    if not need_grad:
        return loss, ce, kd, [], torch.zeros_like(scores)

    onehot = torch.zeros_like(nodes[0]).scatter_(1, lab, 1.0)
    c = kd_scale * (T * inv_b)
    dnodes = []
    for n in range(N):
        terms = []
        if enc.ce_weights[n]:
            terms.append((enc.ce_weights[n] * inv_b) * (torch.exp((nodes[n] - mx[n]) - ls1[n]) - onehot))
        if eps:
            if dkl[n] is not None:
                terms.append(c * dkl[n])
        else:
            if enc.rows_s[n]:
                terms.append(c * _mix_row(enc.rows_s[n], p))
            if enc.teacher_mode == TEACHER_SAME and lw[n] is not None:
                terms.append(c * p[n] * (lw[n] - qw[n]))
            elif enc.teacher_mode == TEACHER_OWN and enc.rows_t[n]:
                lt = _mix_row(enc.rows_t[n], logp)
                terms.append(c * p[n] * (lt - (p[n] * lt).sum(-1, keepdim=True)))
        dnodes.append(sum(terms[1:], terms[0]) if terms else torch.zeros_like(nodes[0]))

    dscores = []                                      # back through the ensembles, last first
    for k in range(len(graph.ensembles) - 1, -1, -1):
        ens, g = graph.ensembles[k], gates[k]
        a = dnodes[M + k]
        dg = torch.stack([(a * nodes[i]).sum(-1) for i in ens.inputs], dim=-1)     # [B, W]
        for j, i in enumerate(ens.inputs):
            dnodes[i] = dnodes[i] + g[:, j:j + 1] * a
        dscores.append(g * (dg - (g * dg).sum(-1, keepdim=True)))
    dscores.reverse()
    ds = torch.cat(dscores, dim=1) if dscores else torch.zeros_like(scores)
    return loss, ce, kd, [dnodes[i].to(grad_dtype(z[i].dtype)) for i in range(M)], ds.to(grad_dtype(scores.dtype))


def okd_analytic_flat(z: Sequence[Tensor], s: Sequence[Tensor], labels: Tensor, T: float, kd_scale: Tensor, *,
                      enc: EncodedGraph, need_grad: bool = True, eps: float = 0.0):
    """:func:`okd_analytic` on the score tensors themselves, in the fused op's layout: ``(loss, ce, kd,
    gradients)``, the gradients one flat tensor (``encoding.GradLayout``: every branch, then every score
    tensor, ensembles sharing a score summed) or ``None`` without ``need_grad``. Compiled as a whole, so the
    concatenations are inside the graph."""
    graph = enc.graph
    loss, ce, kd, dz, ds = okd_analytic(z, score_matrix(s, graph, z[0]), labels, T, kd_scale, enc=enc,
                                        need_grad=need_grad, eps=eps)
    if not need_grad:
        return loss, ce, kd, None
    per_score: list[Tensor | None] = [None] * len(s)
    col = 0
    for ens in graph.ensembles:                      # ds: the ensembles' columns, in ensemble order
        w = len(ens.inputs)
        if ens.score is not None:
            block = ds[:, col:col + w]
            per_score[ens.score] = block if per_score[ens.score] is None else per_score[ens.score] + block
        col += w
    return loss, ce, kd, torch.cat([g.reshape(-1) for g in (*dz, *per_score)])
