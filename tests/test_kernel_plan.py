"""The fused op's host path (ahbf/kernels/plan.py, okd.py's autograd.Function): plans per call signature, the
reused gradient buffer, ``reuse_grads``, and what one call dispatches. Values are checked against float64;
the Triton kernel runs under the interpreter (conftest)."""
from __future__ import annotations

import pytest
import torch

from ahbf.kernels import okd_loss, triton_okd
from ahbf.kernels import plan as plans
from ahbf.methods.ahbf import ahbf_graph
from ahbf.methods.one import one_graph
from tests.test_kernel_okd import MIXED, make_inputs, reference64
from tests.utils import assert_close


def leaves(ts, scale=1.0):
    return [(t.detach() * scale).requires_grad_() for t in ts]


def check_grads(grads, z, s, y, graph, scale=1.0, go=1.0, T=3.0, kd=0.75):
    _, _, ref = reference64([t * scale for t in z], s, y, graph, T, kd, go)
    for i, (a, b) in enumerate(zip(grads, ref)):
        assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), name=f"grad {i}")


@pytest.mark.parametrize("backend", ["triton", "compiled"])
def test_two_live_graphs_of_one_signature_keep_their_own_gradients(backend):
    """The second call is made while the first one's graph still waits for its backward: it must not
    write into the buffer the first backward reads (the plan hands it a new one)."""
    g = ahbf_graph(3)
    z, s, y = make_inputs(g, 4, 20)
    za, sa, zb, sb = leaves(z), leaves(s), leaves(z, 2.0), leaves(s)
    la, _ = okd_loss(za, sa, y, g, backend=backend, kd_scale=0.75)
    lb, _ = okd_loss(zb, sb, y, g, backend=backend, kd_scale=0.75)
    gb = torch.autograd.grad(lb, zb + sb)
    ga = torch.autograd.grad(la, za + sa)
    check_grads(ga, z, s, y, g)
    check_grads(gb, z, s, y, g, scale=2.0)


def test_the_plan_buffer_is_reused_once_the_graph_is_gone():
    plans._PLANS.clear()  # earlier tests' plans of this graph (other shapes) would match the filter below
    g = one_graph(3)
    z, s, y = make_inputs(g, 4, 20)
    for scale in (1.0, -0.5):  # the second call reuses the buffer the first one wrote
        zl, sl = leaves(z, scale), leaves(s)
        loss, _ = okd_loss(zl, sl, y, g, backend="triton", kd_scale=0.75)
        check_grads(torch.autograd.grad(loss, zl + sl), z, s, y, g, scale=scale)
        del loss
    (plan,) = [p for k, p in plans._PLANS.items() if k[0] == g.key and k[1] == "triton"]
    assert plan.buffer_free()  # the last graph is gone: free for the next call
    zl, sl = leaves(z), leaves(s)
    loss, _ = okd_loss(zl, sl, y, g, backend="triton", kd_scale=0.75)
    assert not plan.buffer_free()  # until this graph is freed


@pytest.mark.parametrize("graph", [ahbf_graph(4), MIXED], ids=["ahbf4", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_reuse_grads_held_and_retained_graph_results_are_not_overwritten(graph, dtype):
    """``reuse_grads``: gradients land in the plan's output buffer; one still held by the caller is not
    overwritten by the next backward (a new tensor is returned instead), nor by a second backward through
    a retained graph."""
    z, s, y = make_inputs(graph, 4, 20, dtype)
    rtol = 1e-5 if dtype != torch.bfloat16 else 1e-2
    zl, sl = leaves(z), leaves(s)
    loss, terms = okd_loss(zl, sl, y, graph, kd_scale=0.75, backend="triton", reuse_grads=True)
    first = torch.autograd.grad(loss, zl + sl, retain_graph=True)
    again = torch.autograd.grad(2 * loss, zl + sl)      # the same graph: first is held, so new tensors
    assert all(a.dtype == t.dtype for a, t in zip(first, z + s))
    del loss
    z2, s2 = leaves(z, -1.0), leaves(s)
    loss2, terms2 = okd_loss(z2, s2, y, graph, kd_scale=0.75, backend="triton", reuse_grads=True)
    third = torch.autograd.grad(loss2, z2 + s2)
    ref_loss, ref_terms, ref = reference64(z, s, y, graph, 3.0, 0.75, 1.0)
    for name in ("ce", "kd"):  # the first call's terms, still held, were not overwritten by the second call
        assert terms[name] is not terms2[name]
        assert_close(terms[name], ref_terms[name], rtol=1e-5, atol=1e-6, name=name)
    _, _, ref2 = reference64([-t for t in z], s, y, graph, 3.0, 0.75, 1.0)
    for i in range(len(ref)):
        tol = dict(rtol=rtol, atol=rtol * ref[i].abs().max().item())
        assert_close(first[i], ref[i], name=f"first {i}", **tol)
        assert_close(again[i], 2 * ref[i], name=f"again {i}", rtol=rtol, atol=2 * tol["atol"])
        assert_close(third[i], ref2[i], name=f"third {i}", rtol=rtol, atol=rtol * ref2[i].abs().max().item())


def test_reuse_grads_reuses_the_output_buffer_when_nothing_holds_it():
    g = ahbf_graph(3)
    z, s, y = make_inputs(g, 4, 20)
    ptrs = []
    for _ in range(2):
        zl, sl = leaves(z), leaves(s)
        loss, terms = okd_loss(zl, sl, y, g, kd_scale=0.75, backend="triton", reuse_grads=True)
        grads = torch.autograd.grad(loss, zl + sl)
        check_grads(grads, z, s, y, g)
        ptrs.append((grads[0].data_ptr(), terms["ce"].data_ptr()))
        del loss, grads, terms
    assert ptrs[0] == ptrs[1]


def test_the_hot_call_dispatches_no_cat_no_memset(monkeypatch):
    """One call with a plan in place: three 0-dim outputs and the launch (stubbed here); backward: one
    multiply (reuse_grads) or one multi-tensor multiply; no concatenation of the scores, no fill."""
    from torch.profiler import ProfilerActivity, profile

    launches = []

    class Stub:  # the kernel's launch replaced by a no-op that counts
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(grid)

    monkeypatch.setattr(triton_okd, "_okd_fused_kernel", Stub())
    monkeypatch.setattr(plans, "_PLANS", {})
    g = ahbf_graph(4)
    z, s, y = make_inputs(g, 8, 10)
    zl, sl = leaves(z), leaves(s)
    for reuse, backward_ops in ((False, ["aten::_foreach_mul"]), (True, ["aten::mul"])):  # reuse: into the buffer
        warm, warm_terms = okd_loss(zl, sl, y, g, kd_scale=0.75, backend="triton", reuse_grads=reuse)  # the plan
        torch.autograd.grad(warm, zl + sl)                                                   # and the buffers
        del warm, warm_terms
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss, terms = okd_loss(zl, sl, y, g, kd_scale=0.75, backend="triton", reuse_grads=reuse)
            torch.autograd.grad(loss, zl + sl)
        del loss, terms  # the graph goes: the next round's call may take the plan's buffer
        ops = [e.name for e in prof.events() if e.name.startswith("aten::") and
               not any(p.name.startswith("aten::") for p in _parents(e))]
        assert ops.count("aten::empty") == (1 if reuse else 3) and "aten::cat" not in ops  # reuse: ce, kd kept
        assert not {"aten::zeros", "aten::zero_", "aten::fill_", "aten::copy_"} & set(ops), ops
        # what launches work besides the kernel: autograd's grad_output seed, then our backward's one op
        assert [o for o in ops if o not in ("aten::empty", "aten::promote_types")] == ["aten::ones_like", *backward_ops], ops
    assert len(launches) == 4  # one launch per call


def _parents(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
        yield event


def test_bad_inputs_still_raise_one_line_errors_before_any_plan():
    g = ahbf_graph(3)
    z, s, y = make_inputs(g, 4, 10)
    with pytest.raises(ValueError, match="logits"):
        okd_loss([], s, y, g, backend="triton")
    with pytest.raises(ValueError, match="empty batch"):
        okd_loss([t[:0] for t in z], [t[:0] for t in s], y[:0], g, backend="triton")
