"""Fused OKD objective in Triton: loss and every gradient in one launch over the batch.

Layout: the ``@triton.jit`` kernel and its helpers, then the launcher (:class:`Launcher`, prepared once
per call signature, and the one-shot :func:`okd_fused_triton`), then notes. The autograd wiring lives in
``okd.py``, the per-signature plan that owns a launcher in ``plan.py``.

The eager formula it implements (``okd_objective_reference``)::

    nodes = z + [sum_j softmax(s[score])_j * nodes[inputs[j]] for each ensemble]
    loss  = sum_{n in ce_nodes} F.cross_entropy(nodes[n], y)
          + kd_scale * sum_e w_e * T^2 * F.kl_div(log_softmax(nodes[s_e] / T), log_softmax(nodes[t_e] / T),
                                                   reduction="batchmean", log_target=True)

One program per row. The row's node logits (branches, then gated ensembles) form an ``[NP, BK]``
register tile, rebuilt from the branch logits for each chunk of ``BK`` classes (NP = number of nodes
rounded up to a power of two). Pass 1 streams the chunks once with an online softmax and keeps, per
node, the running max and sum at temperature T and at 1, the label logit, and the running
``sum_k exp(y - max) * (A y)`` with ``y = x / T`` (A = the KL mixing matrices of ``analytic.py``,
which fold all KL edges into N x N matrices; ``encoding.py`` lays the graph out as two tables). That gives the row's CE and KL terms. Pass 2 streams the
chunks again and writes the gradient of every branch logit and every score column:

    D_n    = ce_count_n / B * (softmax(x_n) - onehot(y))
           + kd_scale * T / B * [ (A_s p)_n + p_n * ((A_t y)_n - E_{p_n}[(A_t y)_n]) ]
    back through the ensembles, last first:  D_in_j += g_j D_e,  dL/dg_j += <D_e, x_in_j>
    dL/ds  = g * (dL/dg - <g, dL/dg>)

When the row fits in one chunk (``K <= BK``) the tile is loaded once and reused by both passes.
Per row only 2 floats (CE and KD partials) are written besides the gradients; the last program to
finish (an atomic counter, reset by that program) sums them in row order and writes the loss, CE and KD:
no host-side reduction, no memset. The score tensors are read where the model left them (one pointer per
ensemble, no concatenation); all gradients go to one buffer (``encoding.GradLayout``), stored in
``reference.grad_dtype`` (fp32 for every input dtype the kernel takes);
``okd.py``'s backward scales them by ``grad_output`` and then casts (an fp16 store before the loss scale
would flush small gradients to zero).
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import encoding
from .encoding import EncodedGraph, GradLayout
from .reference import grad_dtype

MAX_BRANCHES = 8  # pointer slots z0..z7 (branches) and s0..s7 (ensembles) below (okd.py's ``auto`` reads it)
# how teacher-side KL gradients are formed (encoding.py): a compile-time switch of the kernel
_TEACHER_NONE: tl.constexpr = tl.constexpr(encoding.TEACHER_NONE)
_TEACHER_OWN: tl.constexpr = tl.constexpr(encoding.TEACHER_OWN)


@triton.jit
def _pick(i: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    """The i-th of eight pointers (i is a compile-time constant)."""
    p = p0
    if i == 1:
        p = p1
    if i == 2:
        p = p2
    if i == 3:
        p = p3
    if i == 4:
        p = p4
    if i == 5:
        p = p5
    if i == 6:
        p = p6
    if i == 7:
        p = p7
    return p


@triton.jit
def _row(X, rows, n):
    """Row n of the [NP, BK] tile X (n may be a runtime value)."""
    return tl.sum(tl.where(rows[:, None] == n, X, 0.0), axis=0)


@triton.jit
def _gates(sp, row, col, width, jw, ACC: tl.constexpr):
    """softmax over this row of an ensemble's B x width score tensor ``sp``, as a [WP] vector; an ensemble
    without scores (col < 0) reads zeros: equal weights 1 / width, as softmax(0)."""
    v = tl.load(sp + row * width + jw, mask=(jw < width) & (col >= 0), other=0.0).to(ACC)
    v = tl.where(jw < width, v, float("-inf"))
    e = tl.exp(v - tl.max(v, axis=0))  # masked columns: exp(-inf) = 0
    return e / tl.sum(e, axis=0)


@triton.jit
def _nodes(z0, z1, z2, z3, z4, z5, z6, z7, offs, mask, s0, s1, s2, s3, s4, s5, s6, s7, row, ens_in_ptr, ens_col_ptr,
           ens_w_ptr, M: tl.constexpr, E: tl.constexpr, NP: tl.constexpr, WMAX: tl.constexpr, WP: tl.constexpr,
           BK: tl.constexpr, ACC: tl.constexpr):
    """[NP, BK] tile of node logits for one chunk: branch rows 0..M-1, then ensemble rows M..M+E-1.

    Masked (k >= K) lanes hold 0; so do padding rows.
    """
    rows = tl.arange(0, NP)
    jw = tl.arange(0, WP)
    X = tl.zeros([NP, BK], dtype=ACC)
    for i in tl.static_range(M):
        zi = tl.load(_pick(i, z0, z1, z2, z3, z4, z5, z6, z7) + offs, mask=mask, other=0.0).to(ACC)
        X = tl.where(rows[:, None] == i, zi[None, :], X)
    for k in tl.static_range(E):
        col = tl.load(ens_col_ptr + k)
        width = tl.load(ens_w_ptr + k)
        g = _gates(_pick(k, s0, s1, s2, s3, s4, s5, s6, s7), row, col, width, jw, ACC)
        acc = tl.zeros([BK], dtype=ACC)
        for j in range(width):
            src = tl.load(ens_in_ptr + k * WMAX + j)
            acc += tl.sum(tl.where(jw == j, g, 0.0), axis=0) * _row(X, rows, src)
        X = tl.where(rows[:, None] == M + k, acc[None, :], X)
    return X


@triton.jit
def _mix(mix_ptr, Y, N: tl.constexpr, NP: tl.constexpr):
    """(A @ Y) over the node axis, A an N x N row-major matrix in memory, Y an [NP, BK] tile."""
    rows = tl.arange(0, NP)
    acc = tl.zeros_like(Y)
    for m in range(N):
        a = tl.load(mix_ptr + rows * N + m, mask=rows < N, other=0.0)
        acc += a[:, None] * _row(Y, rows, m)[None, :]
    return acc


@triton.jit
def _mix_vec(mix_ptr, v, N: tl.constexpr, NP: tl.constexpr):
    """(A @ v) for a [NP] vector v."""
    rows = tl.arange(0, NP)
    acc = tl.zeros_like(v)
    for m in range(N):
        a = tl.load(mix_ptr + rows * N + m, mask=rows < N, other=0.0)
        acc += a * tl.sum(tl.where(rows == m, v, 0.0), axis=0)
    return acc


@triton.jit
def _stats_chunk(X, mask, offs, y, inv_T, mT, lT, m1, l1, pick, acc_w, acc_t, mixw_ptr, mixt_ptr,
                 N: tl.constexpr, NP: tl.constexpr, TEACHER: tl.constexpr):
    """Pass 1 on one chunk: online softmax statistics at T and at 1, label logit, KL expectations."""
    Y = X * inv_T
    Xm = tl.where(mask[None, :], X, float("-inf"))
    mT_new = tl.maximum(mT, tl.max(Xm, axis=1) * inv_T)
    alpha = tl.exp(mT - mT_new)
    eT = tl.exp(tl.where(mask[None, :], Y - mT_new[:, None], float("-inf")))
    lT = lT * alpha + tl.sum(eT, axis=1)
    m1_new = tl.maximum(m1, tl.max(Xm, axis=1))
    e1 = tl.exp(tl.where(mask[None, :], X - m1_new[:, None], float("-inf")))
    l1 = l1 * tl.exp(m1 - m1_new) + tl.sum(e1, axis=1)
    pick += tl.sum(tl.where(offs[None, :] == y, X, 0.0), axis=1)
    acc_w = acc_w * alpha + tl.sum(eT * _mix(mixw_ptr, Y, N, NP), axis=1)
    if TEACHER == _TEACHER_OWN:  # the teacher-side mixing differs from the loss mixing
        acc_t = acc_t * alpha + tl.sum(eT * _mix(mixt_ptr, Y, N, NP), axis=1)
    return mT_new, lT, m1_new, l1, pick, acc_w, acc_t


@triton.jit
def _grad_chunk(X, mask, offs, y, inv_T, mT, logT, m1, log1, e_t, ce_w, coef, dg, s0, s1, s2, s3, s4, s5, s6, s7,
                row, ens_in_ptr, ens_col_ptr, ens_w_ptr, mixt_ptr, mixs_ptr, inv_B, dz_ptr, plane, out_offs,
                M: tl.constexpr, N: tl.constexpr, E: tl.constexpr, NP: tl.constexpr, WMAX: tl.constexpr,
                WP: tl.constexpr, SP: tl.constexpr, TEACHER: tl.constexpr, ACC: tl.constexpr):
    """Pass 2 on one chunk: dL/dnode, then back through the ensembles; stores dL/dz (branch i at
    ``dz_ptr + i * plane``), returns dL/dg over the score columns (ensembles sharing a score add up)."""
    rows = tl.arange(0, NP)
    jw = tl.arange(0, WP)
    cols = tl.arange(0, SP)
    Y = X * inv_T
    # shifted by the row max before the log-sum: ``Y - lseT`` would cancel two numbers of the logits' size
    # (at |x| = 1e4 the largest probabilities kept ~1e-3 relative accuracy in fp32)
    P = tl.exp(tl.where(mask[None, :], (Y - mT[:, None]) - logT[:, None], float("-inf")))  # softmax(x / T)
    Q = tl.exp(tl.where(mask[None, :], (X - m1[:, None]) - log1[:, None], float("-inf")))  # softmax(x)
    onehot = tl.where(offs == y, 1.0, 0.0)
    D = (ce_w * inv_B)[:, None] * (Q - onehot[None, :])
    D += coef * _mix(mixs_ptr, P, N, NP)
    if TEACHER != _TEACHER_NONE:
        D += coef * P * (_mix(mixt_ptr, Y, N, NP) - e_t[:, None])
    for kk in tl.static_range(E):
        k = E - 1 - kk
        col = tl.load(ens_col_ptr + k)
        width = tl.load(ens_w_ptr + k)
        g = _gates(_pick(k, s0, s1, s2, s3, s4, s5, s6, s7), row, col, width, jw, ACC)
        a = _row(D, rows, M + k)
        for j in range(width):
            src = tl.load(ens_in_ptr + k * WMAX + j)
            gj = tl.sum(tl.where(jw == j, g, 0.0), axis=0)
            D += tl.where(rows[:, None] == src, gj * a[None, :], 0.0)
            dg = tl.where((cols == col + j) & (col >= 0), dg + tl.sum(a * _row(X, rows, src), axis=0), dg)
    for i in tl.static_range(M):
        tl.store(dz_ptr + i * plane + out_offs, _row(D, rows, i).to(dz_ptr.dtype.element_ty), mask=mask)
    return dg


@triton.jit
def _okd_row(z0, z1, z2, z3, z4, z5, z6, z7, s0, s1, s2, s3, s4, s5, s6, s7, row, dz_ptr, ds_ptr, plane,
             labels_ptr, kd_scale_ptr, part_ptr, ens_in_ptr, ens_col_ptr, ens_w_ptr, ens_wr_ptr, ce_ptr, mixw_ptr,
             mixt_ptr, mixs_ptr, B, K, T, inv_T, inv_B,
             M: tl.constexpr, N: tl.constexpr, E: tl.constexpr, NP: tl.constexpr, WMAX: tl.constexpr,
             WP: tl.constexpr, SP: tl.constexpr, BK: tl.constexpr, TEACHER: tl.constexpr, ONE_CHUNK: tl.constexpr,
             NEED_GRAD: tl.constexpr, ACC: tl.constexpr):
    """One row: pass 1 (statistics, the row's CE and KD partials) and, with NEED_GRAD, pass 2 (gradients)."""
    rows = tl.arange(0, NP)
    node_ok = rows < N
    y = tl.load(labels_ptr + row).to(tl.int32)
    base = row * K
    ar = tl.arange(0, BK)

    # ---- pass 1: statistics
    mT = tl.full([NP], float("-inf"), ACC)
    m1 = tl.full([NP], float("-inf"), ACC)
    lT = tl.zeros([NP], ACC)
    l1 = tl.zeros([NP], ACC)
    pick = tl.zeros([NP], ACC)
    acc_w = tl.zeros([NP], ACC)
    acc_t = tl.zeros([NP], ACC)
    if ONE_CHUNK:
        mask = ar < K
        X = _nodes(z0, z1, z2, z3, z4, z5, z6, z7, base + ar, mask, s0, s1, s2, s3, s4, s5, s6, s7, row, ens_in_ptr,
                   ens_col_ptr, ens_w_ptr, M, E, NP, WMAX, WP, BK, ACC)
        mT, lT, m1, l1, pick, acc_w, acc_t = _stats_chunk(X, mask, ar, y, inv_T, mT, lT, m1, l1, pick, acc_w,
                                                          acc_t, mixw_ptr, mixt_ptr, N, NP, TEACHER)
    else:
        for c0 in range(0, K, BK):
            offs = c0 + ar
            mask = offs < K
            Xc = _nodes(z0, z1, z2, z3, z4, z5, z6, z7, base + offs, mask, s0, s1, s2, s3, s4, s5, s6, s7, row,
                        ens_in_ptr, ens_col_ptr, ens_w_ptr, M, E, NP, WMAX, WP, BK, ACC)
            mT, lT, m1, l1, pick, acc_w, acc_t = _stats_chunk(Xc, mask, offs, y, inv_T, mT, lT, m1, l1, pick,
                                                              acc_w, acc_t, mixw_ptr, mixt_ptr, N, NP, TEACHER)
    lT = tl.where(node_ok, lT, 1.0)
    l1 = tl.where(node_ok, l1, 1.0)
    mT = tl.where(node_ok, mT, 0.0)                          # padding rows: finite, unused
    m1 = tl.where(node_ok, m1, 0.0)
    logT = tl.log(lT)
    log1 = tl.log(l1)
    lseT = mT + logT                                         # log-sum-exp of x / T, per node
    ce_w = tl.load(ce_ptr + rows, mask=node_ok, other=0.0)
    ce_row = tl.sum(ce_w * ((m1 - pick) + log1), axis=0)    # max first: lse1 - pick would cancel
    # sum_n <p_n, (A_w logp)_n> = sum_n E_{p_n}[(A_w y)_n] - (A_w lseT)_n
    e_w = tl.where(node_ok, acc_w / lT, 0.0)
    kd_row = T * T * tl.sum(e_w - _mix_vec(mixw_ptr, lseT, N, NP), axis=0)
    tl.store(part_ptr + row * 2, ce_row)
    tl.store(part_ptr + row * 2 + 1, kd_row)

    # ---- pass 2: gradients
    if NEED_GRAD:
        coef = tl.load(kd_scale_ptr).to(ACC) * T * inv_B
        e_t = e_w
        if TEACHER == _TEACHER_OWN:
            e_t = tl.where(node_ok, acc_t / lT, 0.0)
        dg = tl.zeros([SP], ACC)
        if ONE_CHUNK:
            dg = _grad_chunk(X, mask, ar, y, inv_T, mT, logT, m1, log1, e_t, ce_w, coef, dg,
                             s0, s1, s2, s3, s4, s5, s6, s7, row, ens_in_ptr, ens_col_ptr, ens_w_ptr, mixt_ptr,
                             mixs_ptr, inv_B, dz_ptr, plane, base + ar, M, N, E, NP, WMAX, WP, SP, TEACHER, ACC)
        else:
            for c0 in range(0, K, BK):
                offs = c0 + ar
                mask = offs < K
                Xc = _nodes(z0, z1, z2, z3, z4, z5, z6, z7, base + offs, mask, s0, s1, s2, s3, s4, s5, s6, s7, row,
                            ens_in_ptr, ens_col_ptr, ens_w_ptr, M, E, NP, WMAX, WP, BK, ACC)
                dg = _grad_chunk(Xc, mask, offs, y, inv_T, mT, logT, m1, log1, e_t, ce_w, coef, dg,
                                 s0, s1, s2, s3, s4, s5, s6, s7, row, ens_in_ptr, ens_col_ptr, ens_w_ptr, mixt_ptr,
                                 mixs_ptr, inv_B, dz_ptr, plane, base + offs, M, N, E, NP, WMAX, WP, SP, TEACHER, ACC)
        # softmax backward of every score tensor, written by the first ensemble that reads it (the others
        # sharing it added their dL/dg to the same columns): score columns col.. at ds_ptr + col * B, row-major
        jw = tl.arange(0, WP)
        cols = tl.arange(0, SP)
        for k in tl.static_range(E):
            col = tl.load(ens_col_ptr + k)
            width = tl.load(ens_w_ptr + k)
            writes = tl.load(ens_wr_ptr + k)
            g = _gates(_pick(k, s0, s1, s2, s3, s4, s5, s6, s7), row, col, width, jw, ACC)
            dgk = tl.sum(tl.where(cols[None, :] == col + jw[:, None], dg[None, :], 0.0), axis=1)
            dsk = g * (dgk - tl.sum(g * dgk, axis=0))
            out = ds_ptr + col.to(tl.int64) * B + row * width + jw
            tl.store(out, dsk.to(ds_ptr.dtype.element_ty), mask=(jw < width) & (writes != 0))


@triton.jit
def _okd_fused_kernel(
    z0, z1, z2, z3, z4, z5, z6, z7,            # branch logits, B x K contiguous (unused slots repeat z0)
    s0, s1, s2, s3, s4, s5, s6, s7,            # the score tensor of each ensemble, B x width (none / unused: z0)
    grad_ptr,                                  # gradients (NEED_GRAD): M x B x K, then the score columns (below)
    labels_ptr, kd_scale_ptr, part_ptr, loss_out, ce_out, kd_out,  # the three results: 0-dim each
    gi_ptr, gf_ptr,                            # the graph as an int32 and an ACC table (EncodedGraph.tables)
    B, K_units, inv_B,
    M: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, WMAX: tl.constexpr, WP: tl.constexpr,
    SP: tl.constexpr, BK: tl.constexpr, TEACHER: tl.constexpr, ONE_CHUNK: tl.constexpr,
    NEED_GRAD: tl.constexpr, ROWS: tl.constexpr, RB: tl.constexpr, ACC: tl.constexpr, F64: tl.constexpr,
    KA: tl.constexpr,
):
    K = K_units * KA  # K = K_units * KA with KA a power of two: row offsets provably KA-aligned (vector loads)
    E: tl.constexpr = N - M                              # ensembles
    # ints = [ens_inputs (E x WMAX), ens_col (E), ens_width (E), ens_writes (E)] (encoding.py);
    # floats = [T, 1/T, ce_count (N), A_w, A_t, A_s (N x N each)]
    ens_in_ptr = gi_ptr
    ens_col_ptr = gi_ptr + E * WMAX
    ens_w_ptr = ens_col_ptr + E
    ens_wr_ptr = ens_w_ptr + E
    T = tl.load(gf_ptr)
    inv_T = tl.load(gf_ptr + 1)
    ce_ptr = gf_ptr + 2
    mixw_ptr = ce_ptr + N
    mixt_ptr = mixw_ptr + N * N
    mixs_ptr = mixt_ptr + N * N
    plane = B.to(tl.int64) * K                           # one branch's B x K gradient
    ds_ptr = grad_ptr + M * plane                        # score j's B x w_j gradient at ds_ptr + col_j * B
    inv_b = inv_B                                        # 1/B rounded to fp32 on the host
    if F64:
        inv_b = 1.0 / B.to(tl.float64)                   # fp64 division is correctly rounded
    for r in range(ROWS):
        row = tl.program_id(0).to(tl.int64) * ROWS + r
        if row < B:
            _okd_row(z0, z1, z2, z3, z4, z5, z6, z7, s0, s1, s2, s3, s4, s5, s6, s7, row, grad_ptr, ds_ptr, plane,
                     labels_ptr, kd_scale_ptr, part_ptr, ens_in_ptr, ens_col_ptr, ens_w_ptr, ens_wr_ptr, ce_ptr,
                     mixw_ptr, mixt_ptr, mixs_ptr, B, K, T, inv_T, inv_b, M, N, E, NP, WMAX, WP, SP, BK, TEACHER,
                     ONE_CHUNK, NEED_GRAD, ACC)
    # The last program to finish sums the row partials in a fixed order (deterministic, no host-side
    # reduction) and writes loss, ce and kd. part = [2 B partials, finished-program count]: the
    # count is zeroed once when the buffer is made and reset here by the last program, so a launch needs
    # no memset (and every CUDA-graph replay finds it at zero).
    tl.debug_barrier()                                   # every thread's partial stores precede the release
    count_ptr = part_ptr + 2 * B
    done = tl.atomic_add(count_ptr, 1.0, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        ce_acc = tl.zeros([RB], ACC)
        kd_acc = tl.zeros([RB], ACC)
        rb = tl.arange(0, RB)
        for r0 in range(0, B, RB):
            ok = r0 + rb < B
            ce_acc += tl.load(part_ptr + (r0 + rb) * 2, mask=ok, other=0.0, volatile=True)
            kd_acc += tl.load(part_ptr + (r0 + rb) * 2 + 1, mask=ok, other=0.0, volatile=True)
        ce = tl.sum(ce_acc, axis=0) * inv_b
        kd = tl.sum(kd_acc, axis=0) * inv_b
        tl.store(loss_out, ce + tl.load(kd_scale_ptr).to(ACC) * kd)
        tl.store(ce_out, ce)
        tl.store(kd_out, kd)
        tl.store(count_ptr, 0.0)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


TILE_ELEMENTS = 8192           # NP * BK per program on a GPU (registers); see notes
TILE_ELEMENTS_INTERPRET = 1 << 16  # the interpreter runs numpy per op: bigger tiles, fewer ops
REDUCE_BLOCK = 256             # rows the last program sums per step


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape of one launch: ``np`` node rows x ``block_k`` classes per chunk, ``rows`` batch rows
    per program (handled one after the other), ``num_warps``."""

    np: int
    block_k: int
    rows: int
    num_warps: int


def launch_config(num_nodes: int, K: int, B: int, interpret: bool = False, *, tile: int | None = None,
                  block_k: int | None = None, rows: int | None = None, num_warps: int | None = None) -> LaunchConfig:
    """The default tile for ``num_nodes`` nodes and ``K`` classes, each part overridable.

    ``tile``: elements of the [NP, BK] node tile (default ``TILE_ELEMENTS``); ``block_k``: chunk width
    (a power of two; overrides ``tile``); ``rows``: batch rows per program (default 1); ``num_warps``:
    default 4 up to 4096 tile elements, 8 up to 8192, else 16.
    """
    NP = _next_pow2(num_nodes)
    tile = tile or (TILE_ELEMENTS_INTERPRET if interpret else TILE_ELEMENTS)
    BK = block_k or min(_next_pow2(K), max(16, tile // NP))
    if BK & (BK - 1):
        raise ValueError(f"block_k: expected a power of two, got {BK}")
    warps = num_warps or (4 if NP * BK <= 4096 else 8 if NP * BK <= 8192 else 16)
    return LaunchConfig(NP, BK, max(1, rows or 1), warps)


class Launcher:
    """One launch of the fused kernel, prepared once per (graph, B, K, dtype, device, need_grad, T): tile, grid,
    constexprs, the graph's tables and the per-row scratch, so a call only gathers pointers and launches.

    The scratch (``part``) holds the rows' [ce, kd] partials and, last, the finished-program count that the
    kernel's last program resets: zeroed once here, never per launch. Launches of one ``Launcher`` must
    therefore not overlap (one stream; a CUDA graph replays it in order). ``block_k``, ``rows``,
    ``num_warps`` override parts of the tile (:func:`launch_config`).
    """

    def __init__(self, enc: EncodedGraph, B: int, K: int, dtype: torch.dtype, device: torch.device, need_grad: bool,
                 T: float, block_k: int | None = None, rows: int | None = None, num_warps: int | None = None):
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import "
                               "(use backend='compiled' on CPU)")
        M, N, E = enc.num_branches, enc.num_nodes, enc.num_ensembles
        if M > MAX_BRANCHES or E > MAX_BRANCHES:
            raise ValueError(f"logits: backend 'triton' supports up to {MAX_BRANCHES} branches and ensembles, "
                             f"got {M} and {E}")
        cfg = launch_config(N, K, B, device.type == "cpu", block_k=block_k, rows=rows, num_warps=num_warps)
        acc = grad_dtype(dtype)  # the math dtype too: fp64 for fp64 logits, else fp32
        ka = min(16, K & -K)  # the largest power of two (<= 16) dividing K: aligned rows, 128-bit loads / stores
        self.acc, self.device, self.guard = acc, device, device.type == "cuda"
        self.new = functools.partial(torch.empty, (), dtype=acc, device=device)
        self.tables = enc.tables(float(T), acc, device)  # (int32, ACC) tables
        self.part = torch.zeros(2 * B + 1, dtype=acc, device=device)
        self.ints = (B, K // ka, 1.0 / B)
        # the 16 pointer slots from (*z, *s): branches, then each ensemble's score tensor; z0 where unused
        slots = [*range(M), *[0] * (MAX_BRANCHES - M), *[0 if e.score is None else M + e.score for e in enc.graph.ensembles],
                 *[0] * (MAX_BRANCHES - E)]
        self.pointers = operator.itemgetter(*slots)
        # the constexprs, positional after the runtime arguments (kernel order): one tuple, no kwargs per call
        self.tail = (*self.tables, B, K // ka, 1.0 / B, M, N, cfg.np, enc.max_width, _next_pow2(enc.max_width),
                     _next_pow2(max(enc.score_cols, 1)), cfg.block_k, enc.teacher_mode, K <= cfg.block_k, need_grad,
                     cfg.rows, REDUCE_BLOCK, _TL_DTYPES[acc], acc == torch.float64, ka)
        self.kernel = functools.partial(_okd_fused_kernel[(triton.cdiv(B, cfg.rows),)], num_warps=cfg.num_warps)

    def __call__(self, zs, labels: Tensor, kd_scale: Tensor, grads: Tensor | None,
                 terms: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Launch on ``zs = (*z, *s)``: contiguous branch logits (B x K) and score tensors (B x w_j), with
        ``labels`` (B, any integer dtype) and a one-element ``kd_scale``; writes the gradients into ``grads``
        (``encoding.GradLayout``, the math dtype) when built with ``need_grad``. Returns a new 0-dim ``loss``
        and ``ce``, ``kd``: ``terms`` if given (0-dim, the math dtype), else new ones."""
        new = self.new
        loss = new()
        ce, kd = (new(), new()) if terms is None else terms
        args = (*self.pointers(zs), self.part if grads is None else grads, labels, kd_scale, self.part, loss, ce, kd,
                *self.tail)
        if self.guard:
            with _device_guard(self.device):  # launch on z's GPU, not the current one
                self.kernel(*args)
        else:
            self.kernel(*args)
        return loss, ce, kd


def okd_fused_triton(z: list[Tensor], s: list[Tensor], labels: Tensor, kd_scale: Tensor, enc: EncodedGraph,
                     T: float, need_grad: bool = True, **tile):
    """Launch the fused kernel once (tests, benchmarks). Returns ``(loss, tensor([ce, kd]), [dz_i], [ds_j])``,
    gradients in ``grad_dtype`` (views of one buffer; empty lists without ``need_grad``).

    ``z``: M contiguous B x K tensors of one dtype (fp32 / bf16 / fp16, or fp64: then the math is fp64 too);
    ``s``: the graph's contiguous score tensors; ``tile``: ``block_k``, ``rows``, ``num_warps`` (:class:`Launcher`).
    """
    B, K = z[0].shape
    launch = Launcher(enc, B, K, z[0].dtype, z[0].device, need_grad, T, **tile)
    layout = GradLayout.of(enc, B, K)
    grads = torch.empty(layout.numel, dtype=grad_dtype(z[0].dtype), device=z[0].device) if need_grad else None
    loss, ce, kd = launch((*z, *s), labels, kd_scale, grads)
    views = layout.views(grads) if need_grad else []
    return loss, torch.stack([ce, kd]), views[:enc.num_branches], views[enc.num_branches:]


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _device_guard(dev: torch.device):
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


# Notes
# - Tile size. NP * BK <= TILE_ELEMENTS keeps the node tile (and the few [NP, BK] temporaries) in registers;
#   num_warps grows with the tile. For K = 1000 and M <= 4 (NP = 8) a row is one chunk, read from HBM once;
#   larger K reads the branch logits twice (the second mostly from L2). Compiled for sm_90 the default takes
#   ~255 registers at 8 warps (benchmarks/kernel_registers.py); gpu_suite.py times every variant on a GPU.
# - The in-kernel reduction: every program stores its row partials, then (after a CTA barrier) a release-acquire
#   atomic counts finished programs; the last one sums the partials in row order with volatile loads, writes
#   loss / CE / KD and resets the counter. The counter sits at the end of the Launcher's scratch, zeroed once:
#   no memset per launch, every CUDA-graph replay finds it at zero; two launches of one Launcher must not run
#   concurrently (other streams).
# - _row/_mix select rows with masked sums (O(NP) per element, NP <= 16), so every graph index stays a
#   runtime value and one compiled kernel serves all graphs with the same (M, N, widths); TEACHER_NONE /
#   _SAME / _OWN (encoding.py) skip or share the teacher-side mixing at compile time.
# - KL is exact (log_target); the AHBF reference code adds 1e-7 to the teacher probabilities (SPEC 4).
