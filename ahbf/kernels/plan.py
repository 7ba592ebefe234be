"""The fused OKD op's plan: what ``okd_loss`` decides once per call signature, reused by every later call.

A call's signature is its graph, backend, T, eps, whether gradients are needed, the device, and every
tensor's shape, dtype and contiguity (:func:`signature`). The first call of a signature validates the
inputs and builds an :class:`OkdPlan`; every later call finds it in a dictionary and goes straight to the
launch. A plan holds:

- whether the inputs need preparing (mixed branch dtypes promoted, non-contiguous tensors copied; in a
  training step, nothing);
- the implementation: the Triton kernel's :class:`~ahbf.kernels.triton_okd.Launcher` (tile, grid,
  constexprs, the graph's tables, a per-row scratch whose finished-program counter the kernel resets
  itself: no memset per call), or the compiled / uncompiled analytic formulation;
- the gradient layout (``encoding.GradLayout``: one flat buffer in the math dtype) and, for Triton, one
  such buffer with its views, reused by every call made while no live autograd graph holds it (the
  graph's node keeps a reference until the graph is freed; the buffer's reference count tells); a call
  made while it is held gets a new buffer;
- the ``kd_scale`` tensor of the last Python float seen (a fill once per epoch, not per step).
"""
from __future__ import annotations

import functools
import sys
from typing import Sequence

import torch
from torch import Tensor

from .analytic import okd_analytic_flat
from .encoding import EncodedGraph, GradLayout, encode
from .graph import DistillGraph
from .reference import check_inputs, grad_dtype

MAX_PLANS = 64  # signatures kept (train and eval batch shapes, last partial batches); all dropped when full


def signature(zs: Sequence[Tensor], labels: Tensor, graph: DistillGraph, T: float, backend: str, eps: float,
              need_grad: bool) -> tuple:
    """The key of a call's plan (module docstring) for ``zs = (*z, *s)``; a few microseconds."""
    return (graph.key, backend, T, eps, need_grad, labels.shape, labels.dtype, labels.device, zs[0].device,
            *[(t.shape, t.dtype, t.is_contiguous()) for t in zs])


def validate(z: Sequence[Tensor], s: Sequence[Tensor], labels: Tensor, graph: DistillGraph, eps: float) -> None:
    """Shape and argument checks: a one-line ValueError naming the offending argument."""
    if len(labels) == 0:
        raise ValueError("okd_loss: empty batch (0 samples); the mean over samples is undefined")
    check_inputs(z, s, labels, graph)
    if not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps}")
    if labels.device != z[0].device:
        raise ValueError(f"labels: on {labels.device}, the logits on {z[0].device}")


def prepare(z: Sequence[Tensor], s: Sequence[Tensor], labels: Tensor, impl: str):
    """One dtype for every branch (promoted, through autograd), contiguous tensors (a copy only where one is
    not), and labels as the implementation reads them (Triton: any integer dtype; the analytic formulation
    gathers with int64)."""
    if any(zi.dtype != z[0].dtype for zi in z):
        dtype = functools.reduce(torch.promote_types, [zi.dtype for zi in z])
        z = [zi.to(dtype) for zi in z]
    z = [zi.contiguous() for zi in z]
    s = [sj.contiguous() for sj in s]
    labels = labels.contiguous() if impl == "triton" else labels.long().contiguous()
    return z, s, labels


_COMPILED: dict[tuple[int, bool, float], object] = {}


def compiled_formulation(enc: EncodedGraph, need_grad: bool, eps: float = 0.0):
    """``torch.compile`` of the analytic formulation for one (cached) graph encoding.

    All of these share one code object, so dynamo's per-function recompile limit (8 by default)
    counts graphs x dtypes x need_grad x shape changes together; past it the op runs the same
    formulation uncompiled (correct, slower) with a warning.
    """
    key = (enc.graph.key, need_grad, eps)
    fn = _COMPILED.get(key)
    if fn is None:
        # static shapes: a new batch shape compiles once more (the last batch, eval), but the training
        # shape keeps its static kernels (dynamic ones measured ~15% slower on CPU)
        fn = torch.compile(functools.partial(okd_analytic_flat, enc=enc, need_grad=need_grad, eps=eps), dynamic=False)
        _COMPILED[key] = fn
    return fn


class OkdPlan:
    """One call signature's decisions and buffers (module docstring). ``impl``: triton, compiled or analytic.
    ``z``, ``s``, ``labels``: the prepared inputs of the first call (shapes, dtypes, device)."""

    def __init__(self, graph: DistillGraph, impl: str, T: float, eps: float, need_grad: bool, z, s, labels,
                 needs_prepare: bool = False):
        self.enc, self.impl, self.T, self.eps, self.need_grad = encode(graph), impl, float(T), float(eps), need_grad
        self.M, self.n_inputs, self.needs_prepare = len(z), len(z) + len(s), needs_prepare
        B, K = z[0].shape
        self.device, self.acc = z[0].device, grad_dtype(z[0].dtype)  # the math dtype (fp64 for fp64, else fp32)
        self.layout = GradLayout.of(self.enc, B, K)
        self.dtypes = tuple(t.dtype for t in (*z, *s))  # what backward casts each gradient to
        self.low = low_precision(self.dtypes, self.acc)
        self.launch = None
        if impl == "triton":
            from .triton_okd import Launcher  # lazily: importing ahbf.kernels must not need triton

            self.launch = Launcher(self.enc, B, K, z[0].dtype, self.device, need_grad, self.T)
        self.flat: Tensor | None = None   # the reusable gradient buffer (Triton)
        self.views: list[Tensor] = []
        if self.launch is not None and need_grad:
            self.flat = self._new_buffer()
            self.views = self.layout.views(self.flat)
            self._flat_refs = sys.getrefcount(self.flat)  # held by the plan alone; an autograd node adds one
        self._kd_value, self._kd = None, None
        # reuse_grads: backward's results, in the inputs' one dtype (None: mixed dtypes, no reuse)
        self.out_dtype = self.dtypes[0] if len(set(self.dtypes)) == 1 else None
        self.out: Tensor | None = None
        self.out_views: list[Tensor] = []
        self._out_refs: tuple[int, ...] = ()
        self._terms: tuple[Tensor, Tensor] | None = None  # reuse_grads: the [ce, kd] results, 0-dim each

    def kd_tensor(self, kd_scale: float | Tensor) -> Tensor:
        """``kd_scale`` as a tensor on the logits' device; a float becomes a 0-dim tensor of the math dtype
        (float64 runs stay exact), made once per value."""
        if isinstance(kd_scale, Tensor):
            return kd_scale if kd_scale.device == self.device else kd_scale.to(self.device)
        if kd_scale != self._kd_value:
            self._kd_value = kd_scale
            self._kd = torch.full((), float(kd_scale), dtype=self.acc, device=self.device)
        return self._kd

    def run(self, zs: tuple[Tensor, ...], labels: Tensor, kd: Tensor, reuse: bool = False, reuse_terms: bool = False):
        """``(loss, ce, kd, flat gradients or None)`` for prepared inputs ``zs = (*z, *s)``. ``reuse``: the
        caller is an autograd node that keeps the gradients (and only them) until it is freed: it gets the
        plan's buffer if no live node holds it. ``reuse_terms`` (``okd_loss(reuse_grads=True)``): ``ce`` and
        ``kd`` are the plan's two 0-dim tensors unless a caller still holds one."""
        if self.launch is not None:
            grads = None
            if self.need_grad:
                grads = self.flat if reuse and self.buffer_free() else self._new_buffer()
            return (*self.launch(zs, labels, kd, grads, self._held_terms() if reuse_terms else None), grads)
        fn = (compiled_formulation(self.enc, self.need_grad, self.eps) if self.impl == "compiled" else
              functools.partial(okd_analytic_flat, enc=self.enc, need_grad=self.need_grad, eps=self.eps))
        M = self.M
        return fn(list(zs[:M]), list(zs[M:]), labels, self.T, kd.reshape(()))

    def grad_views(self, flat: Tensor) -> list[Tensor]:
        """Each input's gradient as a view of ``flat`` (the plan's own views when it is the plan's buffer)."""
        return self.views if flat is self.flat else self.layout.views(flat)

    def _held_terms(self) -> tuple[Tensor, Tensor] | None:
        if self._terms is None:
            self._terms = (torch.empty((), dtype=self.acc, device=self.device),
                           torch.empty((), dtype=self.acc, device=self.device))
            self._terms_refs = tuple(map(sys.getrefcount, self._terms))
        return self._terms if tuple(map(sys.getrefcount, self._terms)) == self._terms_refs else None

    def buffer_free(self) -> bool:
        """No live autograd node holds the gradient buffer (the nodes of ``_OkdFunction`` keep a reference
        to it until the graph is freed, after backward or without one)."""
        return sys.getrefcount(self.flat) == self._flat_refs

    def scaled(self, flat: Tensor, g: Tensor, reuse: bool):
        """``grad_output * gradient`` for every input (:func:`scale_grads`). ``reuse`` (``okd_loss(reuse_grads=
        True)``): written into the plan's output buffer with one multiply (fp32 math, rounded once to the
        inputs' dtype) and returned as its views, unless a caller still holds one of the views it returned
        last time (then new tensors)."""
        if reuse and flat is self.flat and self.out_dtype is not None:
            if self.out is None:
                self.out = torch.empty(self.layout.numel, dtype=self.out_dtype, device=self.device)
                self.out_views = self.layout.views(self.out)
                self._out_refs = tuple(map(sys.getrefcount, self.out_views))
            if tuple(map(sys.getrefcount, self.out_views)) == self._out_refs:
                torch.mul(flat, g, out=self.out)
                return self.out_views
        return scale_grads(self.grad_views(flat), g, self.dtypes, self.low)

    def _new_buffer(self) -> Tensor:
        return torch.empty(self.layout.numel, dtype=self.acc, device=self.device)


def scale_grads(views: Sequence[Tensor], g: Tensor, dtypes: Sequence[torch.dtype], low: Sequence[int]) -> list[Tensor]:
    """``grad_output * gradient`` for each input, new tensors: scaled in the math dtype (``g``'s too), then
    rounded once to each input's dtype (an fp16 gradient rounded before AMP's loss scale would flush small
    values to zero, and the scale itself is inf in fp16). ``low``: the inputs whose dtype is not the math
    dtype (:func:`low_precision`)."""
    scaled = torch._foreach_mul(views, g)
    if low:
        scaled = list(scaled)
        cast = [torch.empty_like(scaled[i], dtype=dtypes[i]) for i in low]
        torch._foreach_copy_(cast, [scaled[i] for i in low])
        for i, c in zip(low, cast):
            scaled[i] = c
    return scaled


def low_precision(dtypes: Sequence[torch.dtype], math: torch.dtype) -> tuple[int, ...]:
    return tuple(i for i, dt in enumerate(dtypes) if dt != math)


_PLANS: dict[tuple, OkdPlan] = {}


def pinned() -> list[OkdPlan]:
    """The plans alive now (a captured CUDA graph holds them: their buffers must outlive a cache clear)."""
    return list(_PLANS.values())


def plan_for(key: tuple, z, s, labels: Tensor, graph: DistillGraph, impl: str, T: float, eps: float,
             need_grad: bool) -> OkdPlan:
    """The plan of signature ``key`` (:func:`signature`), built on first use from validated inputs."""
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        zp, sp, lp = prepare(z, s, labels, impl)
        changed = any(a is not b for a, b in zip((*zp, *sp, lp), (*z, *s, labels)))
        plan = _PLANS[key] = OkdPlan(graph, impl, T, eps, need_grad, zp, sp, lp, needs_prepare=changed)
    return plan
