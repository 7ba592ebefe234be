"""The fused OKD objective: one op computing loss and gradients, its autograd, and the backend switch.

Public entry point: :func:`okd_loss`, the same call and return as ``okd_objective_reference`` plus
``backend``:

- ``"triton"``: the fused Triton kernel (``triton_okd.py``); CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1`` (tests); fp32 / bf16 / fp16 logits with fp32 math, fp64 with fp64 math.
- ``"compiled"``: ``torch.compile`` of the analytic forward+gradient formulation (``analytic.py``),
  specialised per graph; the CPU default.
- ``"eager"``: the reference, ``okd_objective_reference`` (autograd through unfused PyTorch ops).
- ``"auto"``: ``triton`` on CUDA for fp32/bf16/fp16 logits, up to 8 branches and ``eps = 0``, else ``compiled``.

The fused backends compute, in one forward, the loss, its two logged terms, and the gradients of the loss
w.r.t. every branch logit and score tensor (one flat buffer, ``encoding.GradLayout``), kept in
``reference.grad_dtype`` (fp32, fp64 for fp64 inputs). Backward scales them by ``grad_output`` in that
dtype and only then rounds to the input dtype: an fp16 gradient rounded before AMP's loss scale (65536) is
applied would flush small values to zero, and the scale itself is inf in fp16. Two entries run the same
per-signature plan (``plan.py``: validation, backend choice, the Triton launcher and the reused buffers,
decided on the first call of a signature): an eager call goes through :class:`_OkdFunction`, an
``autograd.Function`` straight onto the plan (no dispatcher, no pytree; a few microseconds); a call that
``torch.compile`` traces goes through one ``torch.library.custom_op`` (``ahbf::okd_fused``), opaque to
the compiler (``register_fake`` gives shapes), so a compiled step calls the kernel as is.

Inputs: non-contiguous logits or scores are copied to contiguous ones first; branches of mixed
dtypes are promoted to a common dtype (both through autograd, so gradients flow back as usual).
``kd_scale`` may be a float or a 0-dim tensor: it enters the kernel as a tensor, so changing it every
epoch neither recompiles nor syncs, and a device tensor filled in place is read by a CUDA-graph replay;
a ``kd_scale`` that requires grad gets ``grad * kd``. A float becomes a tensor of the logits' math dtype
(float64 runs stay exact), made once per value and plan, so a training step launches no fill.
The gradients are constants of the forward: double backward (``create_graph=True``) is not supported.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Sequence

import torch
from torch import Tensor

from .encoding import GradLayout
from .graph import DistillGraph, graph_by_key
from .plan import _PLANS, low_precision, plan_for, prepare, scale_grads, signature, validate
from .reference import grad_dtype, okd_objective_reference

BACKENDS = ("auto", "triton", "compiled", "eager")
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what auto sends to triton (fp64: on request)


# ---- eager calls: an autograd.Function straight onto the plan (no dispatcher, no pytree)

class _OkdFunction(torch.autograd.Function):
    """The loss of a plan's forward; ``call = (plan, labels, kd, out, reuse_grads)``: ``ce`` and ``kd`` are
    appended to ``out``. A ``kd_scale`` that requires grad comes last in ``zs`` too. Backward scales the
    forward's gradients (``OkdPlan.scaled``)."""

    @staticmethod
    def forward(ctx, call, *zs):
        plan, labels, kd, out, reuse = call
        loss, ce, kdv, flat = plan.run(zs if len(zs) == plan.n_inputs else zs[:-1], labels, kd, True, reuse)
        ctx.saved = plan, flat, kd, kdv, reuse  # holds flat: the plan's buffer stays this graph's until it is freed
        out += ce, kdv
        return loss

    @staticmethod
    def backward(ctx, g):
        plan, flat, kd, kdv, reuse = ctx.saved
        grads = plan.scaled(flat, g, reuse)
        if len(ctx.needs_input_grad) > plan.n_inputs + 1:  # kd_scale requires grad
            return None, *grads, (g * kdv).reshape(kd.shape).to(g.dtype)
        return None, *grads


# ---- traced calls (torch.compile): one custom op, opaque to the compiler

@torch.library.custom_op("ahbf::okd_fused", mutates_args=())
def okd_fused(z: list[Tensor], s: list[Tensor], labels: Tensor, kd_scale: Tensor, graph_key: int, T: float,
              impl: str, need_grad: bool, eps: float) -> list[Tensor]:
    """``[loss, ce, kd, gradients]`` (the gradients of every branch and score tensor in one flat tensor,
    ``encoding.GradLayout``, only with ``need_grad``) for prepared inputs (``plan.prepare``).

    ``graph_key``: the graph's ``DistillGraph.key``. ``impl``: ``triton``, ``compiled`` or ``analytic`` (the
    uncompiled formulation, for debugging). ``eps``: the teacher-probability offset of the KL
    (``reference.kl_t``); the Triton kernel takes 0 only. No argument has a default: torch < 2.14's
    dispatcher drops an argument equal to its default, and backward's gradients then outnumber the inputs.
    """
    graph = graph_by_key(graph_key)
    plan = plan_for(signature((*z, *s), labels, graph, T, impl, eps, need_grad), z, s, labels, graph, impl, T, eps,
                    need_grad)
    loss, ce, kd, grads = plan.run((*z, *s), labels, kd_scale)  # no autograd node to hold a reused buffer: a new one
    return [loss, ce, kd, grads] if need_grad else [loss, ce, kd]


@okd_fused.register_fake
def _(z, s, labels, kd_scale, graph_key, T, impl, need_grad, eps):
    dt = grad_dtype(z[0].dtype)
    out = [z[0].new_empty((), dtype=dt) for _ in range(3)]
    if not need_grad:
        return out
    return out + [z[0].new_empty((sum(t.numel() for t in (*z, *s)),), dtype=dt)]


def _setup_context(ctx, inputs, output):
    z, s, kd_scale, need_grad = inputs[0], inputs[1], inputs[3], inputs[7]
    ctx.kd_needs_grad = isinstance(kd_scale, Tensor) and kd_scale.requires_grad
    ctx.kd_shape = kd_scale.shape
    ctx.dtypes = [t.dtype for t in (*z, *s)]  # what backward casts each gradient to, last
    ctx.low = low_precision(ctx.dtypes, grad_dtype(z[0].dtype))
    ctx.layout = GradLayout(tuple(tuple(t.shape) for t in (*z, *s)))
    ctx.M, ctx.has_grads = len(z), need_grad
    ctx.set_materialize_grads(False)          # only the loss is differentiable: no zero-filled grads for the rest
    ctx.mark_non_differentiable(*output[1:])
    if need_grad:
        ctx.save_for_backward(output[3], output[2])


def _backward(ctx, grads):
    if not ctx.has_grads:
        raise RuntimeError("ahbf::okd_fused ran with need_grad=False; call it with need_grad=True to backprop")
    g = grads[0]
    flat, kd = ctx.saved_tensors                       # the gradients, in the math dtype (fp32 / fp64)
    scaled = scale_grads(ctx.layout.views(flat), g, ctx.dtypes, ctx.low)
    dkd = (g * kd).reshape(ctx.kd_shape).to(g.dtype) if ctx.kd_needs_grad else None
    return list(scaled[:ctx.M]), list(scaled[ctx.M:]), None, dkd, None, None, None, None, None


okd_fused.register_autograd(_backward, setup_context=_setup_context)


# ---- public entry point

def triton_max_branches() -> int:
    """The Triton kernel's branch slots (imports triton: call it only where ``TRITON_AVAILABLE``)."""
    from .triton_okd import MAX_BRANCHES

    return MAX_BRANCHES


def choose_backend(backend: str, z: Sequence[Tensor], eps: float = 0.0, graph: DistillGraph | None = None) -> str:
    """The backend ``okd_loss`` runs for ``backend``, branch logits ``z`` and KL offset ``eps`` (Triton: 0 only);
    ``auto`` also checks the graph's ensembles against the kernel's slots when ``graph`` is given."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        fits = z[0].is_cuda and z[0].dtype in _TRITON_DTYPES and not eps and TRITON_AVAILABLE
        if fits:
            slots = triton_max_branches()
            fits = len(z) <= slots and (graph is None or len(graph.ensembles) <= slots)
        return "triton" if fits else "compiled"
    return backend


def _implementation(z: Sequence[Tensor], backend: str, graph: DistillGraph, eps: float) -> str:
    """The implementation a validated call runs (not ``eager``), or a one-line error."""
    impl = choose_backend(backend, z, eps, graph)
    if impl == "triton":
        if eps:
            raise ValueError(f"eps: backend 'triton' computes the exact KL (eps = 0), got eps = {eps}; "
                             "use backend 'compiled' or 'auto'")
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend 'triton' needs the triton package; use backend='compiled'")
        dtype = functools.reduce(torch.promote_types, [zi.dtype for zi in z])  # what prepare promotes to
        if dtype not in (*_TRITON_DTYPES, torch.float64):
            raise ValueError(f"logits: backend 'triton' takes fp32/bf16/fp16/fp64, got {z[0].dtype}")
    return impl


def okd_loss(z: Sequence[Tensor], s: Sequence[Tensor], labels: Tensor, graph: DistillGraph, T: float = 3.0,
             kd_scale: float | Tensor = 1.0, backend: str = "auto", eps: float = 0.0,
             reuse_grads: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """The OKD objective (SPEC 4): ``(loss, {"ce": ..., "kd": ...})`` with ``loss = ce + kd_scale * kd``.

    Same arguments and result as ``okd_objective_reference``; ``backend`` picks the implementation
    (module docstring). Fused backends compute the gradients in the forward pass; they are used only
    if autograd needs them. ``eps``: the teacher-probability offset of the public code's KL
    (``reference.kl_t``; 0 = exact); eager and compiled take any eps >= 0, ``auto`` runs compiled when
    eps != 0, and ``triton`` raises.

    ``reuse_grads``: backward returns the gradients, and the forward ``ce`` and ``kd``, in buffers that the
    next call of the same signature overwrites (Triton backend; the gradients when the inputs have one
    dtype; saves allocating them every step). For callers whose gradients flow straight into other
    autograd nodes and who read the terms at once, as the training step does; a caller that keeps such a
    tensor, or a view of it, past the next call must clone it (one held directly is detected and not
    overwritten).
    """
    if backend == "eager" or torch.compiler.is_dynamo_compiling():  # (reuse_grads: the custom op allocates)
        return _checked_call(z, s, labels, graph, T, kd_scale, backend, eps)
    kd_grad = isinstance(kd_scale, Tensor) and kd_scale.requires_grad
    try:
        zs = (*z, *s)
        need_grad = torch.is_grad_enabled() and (zs[0].requires_grad or kd_grad or any(t.requires_grad for t in zs))
        key = signature(zs, labels, graph, T, backend, eps, need_grad)
    except (IndexError, AttributeError, TypeError):  # not tensors, or none: the checks say what is wrong
        validate(z, s, labels, graph, eps)
        raise
    plan = _PLANS.get(key)
    if plan is None:
        validate(z, s, labels, graph, eps)
        plan = plan_for(key, z, s, labels, graph, _implementation(z, backend, graph, eps), T, eps, need_grad)
    if plan.needs_prepare:
        z, s, labels = prepare(z, s, labels, plan.impl)
        zs = (*z, *s)
    kd = plan.kd_tensor(kd_scale)
    if not need_grad:
        loss, ce, kdv, _ = plan.run(zs, labels, kd)
        return loss, {"ce": ce, "kd": kdv}
    out: list[Tensor] = []
    call = (plan, labels, kd, out, reuse_grads)
    loss = _OkdFunction.apply(call, *zs, kd) if kd_grad else _OkdFunction.apply(call, *zs)
    return loss, {"ce": out[0], "kd": out[1]}


def _checked_call(z, s, labels, graph, T, kd_scale, backend, eps):
    """The eager reference, or the custom op where torch.compile traces the call: every check on every call."""
    validate(z, s, labels, graph, eps)
    if backend == "eager":
        return okd_objective_reference(z, s, labels, graph, T, kd_scale, eps)
    impl = _implementation(z, backend, graph, eps)
    z, s, labels = prepare(z, s, labels, impl)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*z, *s, kd_scale) if isinstance(t, Tensor))
    if not isinstance(kd_scale, Tensor):  # traced code: a constant of the graph
        kd_scale = torch.full((), float(kd_scale), dtype=grad_dtype(z[0].dtype), device=z[0].device)
    elif kd_scale.device != z[0].device:
        kd_scale = kd_scale.to(z[0].device)  # one small copy: keep kd_scale on the logits' device
    out = okd_fused(z, s, labels, kd_scale, graph.key, float(T), impl, need_grad, float(eps))
    return out[0], {"ce": out[1].detach(), "kd": out[2].detach()}
