"""Issue 2: the eager objective equals a hand-written float64 transcription of SPEC 4 and 5.

The hand-written versions below do not use the graph: they spell out each method's terms directly.
"""
import math

import pytest
import torch

from ahbf.kernels import DistillGraph, Ensemble, KLEdge, ensemble_logits, okd_objective_reference
from ahbf.methods import build_graph
from ahbf.methods.ahbf import ahbf_graph
from ahbf.methods.dml import dml_graph
from ahbf.methods.one import one_graph
from tests.utils import assert_close

B, K, T = 6, 11, 3.0


def log_softmax(x):
    return x - torch.logsumexp(x, dim=1, keepdim=True)


def ce(x, y):
    return -log_softmax(x)[torch.arange(len(y)), y].mean()


def kl(s, t):
    """T^2 * sum_c p_t (log p_t - log p_s), averaged over the batch."""
    lt, ls = log_softmax(t / T), log_softmax(s / T)
    return T * T * (lt.exp() * (lt - ls)).sum(1).mean()


def hand_ahbf(z, s, y, w, kd_weight, l1, l2, detach=False):
    d = (lambda t: t.detach()) if detach else (lambda t: t)
    g = [torch.softmax(sk, 1) for sk in s]
    e = [g[0][:, :1] * z[0] + g[0][:, 1:] * z[1]]
    for k in range(1, len(z) - 1):
        e.append(g[k][:, :1] * e[k - 1] + g[k][:, 1:] * z[k + 1])
    dkd = kl(z[0], d(z[1])) + sum(kl(e[k - 1], d(z[k + 1])) for k in range(1, len(z) - 1))
    ekd = kl(z[0], d(e[0])) + kl(z[1], d(e[0]))
    ekd = ekd + sum(kl(z[k + 1], d(e[k])) + kl(e[k - 1], d(e[k])) for k in range(1, len(z) - 1))
    return sum(ce(zi, y) for zi in z) + sum(ce(ek, y) for ek in e) + w * kd_weight * (l2 * dkd + l1 * ekd)


def hand_one(z, s, y, kd_scale):
    g = torch.softmax(s[0], 1)
    e = sum(g[:, i:i + 1] * zi for i, zi in enumerate(z))
    return sum(ce(zi, y) for zi in z) + ce(e, y) + kd_scale * sum(kl(zi, e.detach()) for zi in z)


def hand_dml(z, s, y, kd_scale):
    M = len(z)
    kd = sum(sum(kl(z[i], z[j].detach()) for j in range(M) if j != i) / (M - 1) for i in range(M))
    return sum(ce(zi, y) for zi in z) + kd_scale * kd


def inputs(M, widths, scale=3.0):
    z = [(torch.randn(B, K, dtype=torch.float64) * scale).requires_grad_() for _ in range(M)]
    s = [torch.randn(B, w, dtype=torch.float64).abs().requires_grad_() for w in widths]
    return z, s, torch.randint(0, K, (B,))


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, retain_graph=True)


def check(ours, hand, leaves):
    assert_close(ours, hand, rtol=1e-12, atol=1e-12, name="loss")
    for i, (a, b) in enumerate(zip(grads(ours, leaves), grads(hand, leaves))):
        assert_close(a, b, rtol=1e-10, atol=1e-12, name=f"grad {i}")


def ramp(epoch, R):
    return 0.5 if R == 0 else 0.5 * math.exp(-5 * (1 - min(epoch, R) / R) ** 2)


@pytest.mark.parametrize("M", [2, 3, 4, 6])
@pytest.mark.parametrize("l1,l2", [(1.0, 1.0), (4.0, 2.0)])
def test_ahbf_matches_spec(M, l1, l2):
    z, s, y = inputs(M, [2] * (M - 1))
    w, kd_weight = ramp(60, 240), 1.5
    loss, terms = okd_objective_reference(z, s, y, ahbf_graph(M, l1, l2), T=T, kd_scale=w * kd_weight)
    hand = hand_ahbf(z, s, y, w, kd_weight, l1, l2)
    check(loss, hand, z + s)
    assert_close(terms["ce"] + w * kd_weight * terms["kd"], hand.detach(), 1e-12, 1e-12, "terms")


@pytest.mark.parametrize("M", [2, 4])
def test_one_matches_spec(M):
    z, s, y = inputs(M, [M])
    loss, _ = okd_objective_reference(z, s, y, one_graph(M), T=T, kd_scale=0.7)
    check(loss, hand_one(z, s, y, 0.7), z + s)


@pytest.mark.parametrize("M", [2, 3, 5])
def test_dml_matches_spec(M):
    z, s, y = inputs(M, [])
    loss, _ = okd_objective_reference(z, s, y, dml_graph(M), T=T, kd_scale=1.0)
    check(loss, hand_dml(z, s, y, 1.0), z)


def test_detach_teacher_removes_exactly_the_teacher_side_gradients():
    M = 4
    z, s, y = inputs(M, [2] * (M - 1))
    full, _ = okd_objective_reference(z, s, y, ahbf_graph(M), T=T, kd_scale=1.0)
    det, _ = okd_objective_reference(z, s, y, ahbf_graph(M, detach_teacher=True), T=T, kd_scale=1.0)
    assert_close(det, full, 1e-12, 1e-12, "detach must not change the loss value")
    check(det, hand_ahbf(z, s, y, 1.0, 1.0, 1.0, 1.0, detach=True), z + s)
    # full - detached = the gradient that flows through the teacher side of the KL terms only
    g_full, g_det = grads(full, z + s), grads(det, z + s)
    teacher_side = hand_ahbf(z, s, y, 1.0, 1.0, 1.0, 1.0) - hand_ahbf(z, s, y, 1.0, 1.0, 1.0, 1.0, detach=True)
    g_teacher = grads(teacher_side, z + s)
    for i, (a, b, c) in enumerate(zip(g_full, g_det, g_teacher)):
        assert_close(a - b, c, 1e-10, 1e-12, name=f"teacher-side grad {i}")
    assert any(c.abs().max() > 1e-3 for c in g_teacher)  # the option really changes something


def test_kd_scale_zero_leaves_only_cross_entropy():
    z, s, y = inputs(3, [2, 2])
    loss, terms = okd_objective_reference(z, s, y, ahbf_graph(3), T=T, kd_scale=0.0)
    assert_close(loss, terms["ce"], 0, 1e-12, "loss")
    assert terms["kd"] > 0


def test_ensemble_logits_are_the_tas():
    z, s, y = inputs(3, [2, 2])
    e = ensemble_logits(z, s, ahbf_graph(3))
    g0, g1 = torch.softmax(s[0], 1), torch.softmax(s[1], 1)
    e0 = g0[:, :1] * z[0] + g0[:, 1:] * z[1]
    assert_close(e[0], e0, 1e-12, 1e-12, "e0")
    assert_close(e[1], g1[:, :1] * e0 + g1[:, 1:] * z[2], 1e-12, 1e-12, "e1")


def test_low_precision_inputs_are_computed_in_fp32():
    z, s, y = inputs(3, [2, 2])
    ref, _ = okd_objective_reference(z, s, y, ahbf_graph(3))
    low, _ = okd_objective_reference([x.bfloat16() for x in z], [x.bfloat16() for x in s], y, ahbf_graph(3))
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 2e-2 * abs(ref.item())


@pytest.mark.parametrize("mutate,match", [
    (lambda z, s, y: (z[:-1], s, y), "logits"),
    (lambda z, s, y: ([z[0], z[1][:, :5], z[2]], s, y), "logits"),
    (lambda z, s, y: (z, s[:1], y), "scores"),
    (lambda z, s, y: (z, [s[0], s[1][:, :1]], y), "scores"),
    (lambda z, s, y: (z, s, y[:3]), "labels"),
])
def test_mismatched_inputs_give_one_line_errors(mutate, match):
    z, s, y = inputs(3, [2, 2])
    with pytest.raises(ValueError, match=match) as err:
        okd_objective_reference(*mutate(z, s, y), ahbf_graph(3))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method,M", [("ahbf", 1), ("one", 1), ("dml", 1), ("kd", 3)])
def test_bad_graph_arguments(method, M):
    with pytest.raises(ValueError, match="num_branches|method"):
        build_graph(method, M)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ensembles=(), ce_nodes=(), kl_edges=()), "ce_nodes"),
    (dict(ensembles=(Ensemble((0, 1), 1),), ce_nodes=(0,), kl_edges=()), "score indices"),
    (dict(ensembles=(), ce_nodes=(0,), kl_edges=(KLEdge(0, 0),)), "KL edge"),
])
def test_invalid_custom_graphs_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        DistillGraph("custom", 2, **kwargs)
    assert "\n" not in str(err.value)


def test_graph_key_is_a_content_hash_of_the_structure():
    """The fused op receives ``graph.key``: the same structure gives the same key (names do not count),
    in this process and in a fresh one (also after unpickling there); another structure another key; an unknown
    key a clear error."""
    import dataclasses
    import pickle
    import subprocess
    import sys

    from ahbf.kernels.encoding import encode
    from ahbf.kernels.graph import graph_by_key

    g = ahbf_graph(4)
    assert ahbf_graph(4).key == g.key and encode(ahbf_graph(4)) is encode(g)  # encoded once per structure
    assert dataclasses.replace(g, name="renamed", names=tuple("abcdefg")).key == g.key
    others = [ahbf_graph(4, detach_teacher=True), ahbf_graph(4, lambda1=0.5), ahbf_graph(5), one_graph(4), dml_graph(4)]
    assert len({g.key, *(o.key for o in others)}) == 1 + len(others)
    assert graph_by_key(g.key) == g and 0 < g.key < 2 ** 63  # an int64 argument of the custom op
    # a graph unpickled in another process (spawned workers) is registered there under the same key
    code = ("import pickle, sys; from ahbf.kernels.graph import graph_by_key; g = pickle.loads(sys.stdin.buffer.read());"
            "from ahbf.methods.ahbf import ahbf_graph; print(ahbf_graph(4).key, graph_by_key(g.key) == g)")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(others[1]), capture_output=True, timeout=120)
    assert out.stdout.decode().split() == [str(g.key), "True"], out.stderr.decode()[-2000:]
    with pytest.raises(KeyError, match="no distillation graph with key 12345"):
        encode(12345)
