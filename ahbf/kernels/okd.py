"""The fused OKD objective: one op computing loss and gradients, its autograd, and the backend switch.

Public entry point: :func:`okd_loss`, the same call and return as ``okd_objective_reference`` plus
``backend``:

- ``"triton"``: the fused Triton kernel (``triton_okd.py``); CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1`` (tests); fp32 / bf16 / fp16 logits with fp32 math, fp64 with fp64 math.
- ``"compiled"``: ``torch.compile`` of the analytic forward+gradient formulation (``analytic.py``),
  specialised per graph; the CPU default.
- ``"eager"``: the reference, ``okd_objective_reference`` (autograd through unfused PyTorch ops).
- ``"auto"``: ``triton`` on CUDA for fp32/bf16/fp16 logits, up to 8 branches and ``eps = 0``, else ``compiled``.

The fused backends run as one ``torch.library.custom_op`` (``ahbf::okd_fused``) whose forward
returns the loss, its two logged terms, and the gradients of the loss w.r.t. every branch logit and
the score matrix, kept in ``reference.grad_dtype`` (fp32, fp64 for fp64 inputs). Backward scales them by
``grad_output`` in that dtype and only then rounds to the input dtype (``torch._foreach_mul``, plus one
``torch._foreach_copy_`` for bf16 / fp16): an fp16 gradient rounded before AMP's loss scale (65536) is
applied would flush small values to zero, and the scale itself is inf in fp16. The op is
opaque to ``torch.compile``, so a compiled training step calls the kernel as is (``register_fake``
gives shapes).

Inputs: non-contiguous logits or scores are copied to contiguous ones first; branches of mixed
dtypes are promoted to a common dtype (both through autograd, so gradients flow back as usual).
``kd_scale`` may be a float or a 0-dim tensor: it enters the op as a tensor, so changing it every
epoch neither recompiles nor syncs; a ``kd_scale`` that requires grad gets ``grad * kd``. A float
becomes a tensor of the logits' math dtype (float64 runs stay exact), made once per (value, device,
dtype) and cached, so a training step with a per-epoch float launches no fill.
The gradients are constants of the forward: double backward (``create_graph=True``) is not supported.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Sequence

import torch
from torch import Tensor

from .analytic import okd_analytic
from .encoding import EncodedGraph, encode, score_matrix
from .graph import DistillGraph
from .reference import check_inputs, compute_dtype, grad_dtype, okd_objective_reference

BACKENDS = ("auto", "triton", "compiled", "eager")
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what auto sends to triton (fp64: on request)


# ---- the compiled analytic formulation, one per graph

_COMPILED: dict[tuple[int, bool, float], object] = {}


def _compiled_fn(enc: EncodedGraph, need_grad: bool, eps: float = 0.0):
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
        fn = torch.compile(functools.partial(okd_analytic, enc=enc, need_grad=need_grad, eps=eps), dynamic=False)
        _COMPILED[key] = fn
    return fn


# ---- the custom op

@torch.library.custom_op("ahbf::okd_fused", mutates_args=())
def okd_fused(z: list[Tensor], scores: Tensor, labels: Tensor, kd_scale: Tensor, graph_key: int, T: float,
              impl: str, need_grad: bool, eps: float = 0.0) -> list[Tensor]:
    """``[loss, terms, dz_0 .. dz_{M-1}, dscores]``, ``terms = [ce, kd]``; no dz / dscores without ``need_grad``.

    ``graph_key``: the graph's ``DistillGraph.key``. ``impl``: ``triton``, ``compiled`` or ``analytic`` (the
    uncompiled formulation, for debugging). ``eps``: the teacher-probability offset of the KL
    (``reference.kl_t``); the Triton kernel takes 0 only.
    """
    enc = encode(graph_key)
    if impl == "triton":
        if eps:
            raise ValueError(f"eps: the Triton kernel computes the exact KL (eps = 0), got {eps}")
        from . import triton_okd  # lazily: importing ahbf.kernels must not need triton
        loss, terms, dz, ds = triton_okd.okd_fused_triton(list(z), scores, labels, kd_scale.reshape(1), enc, T,
                                                          need_grad)
    else:
        fn = (_compiled_fn(enc, need_grad, eps) if impl == "compiled" else
              functools.partial(okd_analytic, enc=enc, need_grad=need_grad, eps=eps))
        loss, ce, kd, dz, ds = fn(list(z), scores, labels, T, kd_scale.reshape(()))
        terms = torch.stack([ce, kd])
    return [loss, terms, *dz, ds] if need_grad else [loss, terms]


@okd_fused.register_fake
def _(z, scores, labels, kd_scale, graph_key, T, impl, need_grad, eps=0.0):
    dt = compute_dtype(z[0])
    out = [z[0].new_empty((), dtype=dt), z[0].new_empty((2,), dtype=dt)]
    if not need_grad:
        return out
    return out + [torch.empty_like(t, dtype=grad_dtype(t.dtype)) for t in (*z, scores)]


def _setup_context(ctx, inputs, output):
    kd_scale, need_grad = inputs[3], inputs[7]
    ctx.kd_needs_grad = isinstance(kd_scale, Tensor) and kd_scale.requires_grad
    ctx.kd_shape = kd_scale.shape
    ctx.dtypes = [t.dtype for t in (*inputs[0], inputs[1])]  # what backward casts each gradient to, last
    ctx.has_grads = need_grad
    ctx.set_materialize_grads(False)          # only the loss is differentiable: no zero-filled grads for the rest
    ctx.mark_non_differentiable(*output[1:])
    if need_grad:
        ctx.save_for_backward(*output[2:], output[1])


def _backward(ctx, grads):
    if not ctx.has_grads:
        raise RuntimeError("ahbf::okd_fused ran with need_grad=False; call it with need_grad=True to backprop")
    g = grads[0]
    *saved, terms = ctx.saved_tensors                   # the gradients, in the math dtype (fp32 / fp64)
    scaled = list(torch._foreach_mul(saved, g))       # scale first, in fp32 / fp64 (g's dtype too) ...
    low = [i for i, dt in enumerate(ctx.dtypes) if dt != scaled[i].dtype]
    if low:                                             # ... then cast, once, to the input dtypes
        cast = [torch.empty_like(scaled[i], dtype=ctx.dtypes[i]) for i in low]
        torch._foreach_copy_(cast, [scaled[i] for i in low])
        for i, c in zip(low, cast):
            scaled[i] = c
    dkd = (g * terms[1]).reshape(ctx.kd_shape).to(g.dtype) if ctx.kd_needs_grad else None
    return scaled[:-1], scaled[-1], None, dkd, None, None, None, None, None


okd_fused.register_autograd(_backward, setup_context=_setup_context)


# ---- public entry point

_KD_TENSORS: dict[tuple[float, torch.device, torch.dtype], Tensor] = {}


def _kd_tensor(value: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A Python-float ``kd_scale`` as a 0-dim tensor of the math dtype; cached (a fill once per epoch value)."""
    if torch.compiler.is_compiling():  # traced code: a constant of the graph
        return torch.full((), value, dtype=dtype, device=device)
    key = (value, device, dtype)
    t = _KD_TENSORS.get(key)
    if t is None:
        if len(_KD_TENSORS) >= 256:
            _KD_TENSORS.clear()
        t = _KD_TENSORS[key] = torch.full((), value, dtype=dtype, device=device)
    return t


def triton_max_branches() -> int:
    """The Triton kernel's branch slots (imports triton: call it only where ``TRITON_AVAILABLE``)."""
    from .triton_okd import MAX_BRANCHES

    return MAX_BRANCHES


def choose_backend(backend: str, z: Sequence[Tensor], eps: float = 0.0) -> str:
    """The backend ``okd_loss`` runs for ``backend``, branch logits ``z`` and KL offset ``eps`` (Triton: 0 only)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        fits = z[0].is_cuda and z[0].dtype in _TRITON_DTYPES and not eps and TRITON_AVAILABLE
        return "triton" if fits and len(z) <= triton_max_branches() else "compiled"
    return backend


def okd_loss(z: Sequence[Tensor], s: Sequence[Tensor], labels: Tensor, graph: DistillGraph, T: float = 3.0,
             kd_scale: float | Tensor = 1.0, backend: str = "auto",
             eps: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The OKD objective (SPEC 4): ``(loss, {"ce": ..., "kd": ...})`` with ``loss = ce + kd_scale * kd``.

    Same arguments and result as ``okd_objective_reference``; ``backend`` picks the implementation
    (module docstring). Fused backends compute the gradients in the forward pass; they are used only
    if autograd needs them. ``eps``: the teacher-probability offset of the public code's KL
    (``reference.kl_t``; 0 = exact); eager and compiled take any eps >= 0, ``auto`` runs compiled when
    eps != 0, and ``triton`` raises.
    """
    if len(labels) == 0:
        raise ValueError("okd_loss: empty batch (0 samples); the mean over samples is undefined")
    check_inputs(z, s, labels, graph)
    if not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps}")
    backend = choose_backend(backend, z, eps)
    if backend == "eager":
        return okd_objective_reference(z, s, labels, graph, T, kd_scale, eps)
    if backend == "triton" and eps:
        raise ValueError(f"eps: backend 'triton' computes the exact KL (eps = 0), got eps = {eps}; "
                         "use backend 'compiled' or 'auto'")
    if any(zi.dtype != z[0].dtype for zi in z):
        dtype = functools.reduce(torch.promote_types, [zi.dtype for zi in z])
        z = [zi.to(dtype) for zi in z]
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend 'triton' needs the triton package; use backend='compiled'")
        if z[0].dtype not in (*_TRITON_DTYPES, torch.float64):
            raise ValueError(f"logits: backend 'triton' takes fp32/bf16/fp16/fp64, got {z[0].dtype}")
    z = [zi.contiguous() for zi in z]  # a copy only where a branch is not contiguous
    if labels.device != z[0].device:
        raise ValueError(f"labels: on {labels.device}, the logits on {z[0].device}")
    labels = labels.long().contiguous()  # the kernel reads labels with stride 1
    scores = score_matrix(s, graph, z[0]).contiguous()
    if not isinstance(kd_scale, Tensor):
        kd_scale = _kd_tensor(float(kd_scale), z[0].device, compute_dtype(z[0]))
    elif kd_scale.device != z[0].device:
        kd_scale = kd_scale.to(z[0].device)  # one small copy: keep kd_scale on the logits' device
    need_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in (*z, scores)) or kd_scale.requires_grad)
    out = okd_fused(z, scores, labels, kd_scale, graph.key, float(T), backend, need_grad, float(eps))
    terms = out[1].detach()
    return out[0], {"ce": terms[0], "kd": terms[1]}
