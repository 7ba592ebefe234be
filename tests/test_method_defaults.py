"""Issue 17: the methods' own defaults, matched to their authors' (or the public) code, in float64.

Each test transcribes the public training loss as that code writes it (no graph, no engine code) and
compares the engine's task or objective with it: loss and every gradient to 1e-10.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ahbf.engine.config import ConfigError, ObjectiveConfig, build_config
from ahbf.engine.resolve import resolve_objective
from ahbf.engine.task import OKDTask
from ahbf.kernels import okd_loss, okd_objective_reference
from ahbf.kernels.analytic import okd_analytic
from ahbf.kernels.encoding import encode, score_matrix
from ahbf.methods import build_graph
from ahbf.methods.kdcl import minlogit_target
from ahbf.models import BranchOutput

B, K = 6, 11


def logits(n, scale=3.0, k=K):
    return [(torch.randn(B, k, dtype=torch.float64) * scale).requires_grad_() for _ in range(n)]


class Fixed(nn.Module):
    """A 'model' returning given logits and scores: runs the task's whole path on chosen tensors."""

    def __init__(self, z, s):
        super().__init__()
        self.z, self.s = z, s

    def forward(self, x):
        return BranchOutput(self.z, self.s)


def task_for(method, z, s, epochs=300, branches=None, **objective):
    cfg = resolve_objective(ObjectiveConfig(backend="eager", **objective), method, epochs)
    return OKDTask(Fixed(z, s), build_graph(method, branches or len(z), cfg), cfg)


def check(loss, ref, inputs):
    assert abs(loss.item() - ref.item()) < 1e-10 * max(1.0, abs(ref.item())), (loss.item(), ref.item())
    ga = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    gb = torch.autograd.grad(ref, inputs, retain_graph=True, allow_unused=True)
    for i, (a, b) in enumerate(zip(ga, gb)):
        a = torch.zeros_like(inputs[i]) if a is None else a
        b = torch.zeros_like(inputs[i]) if b is None else b
        assert (a - b).abs().max().item() < 1e-10, (i, (a - b).abs().max().item())


# ---- transcriptions of the public code

def mean_teacher_sigmoid_rampup(current, rampup_length):
    """utils/ramps.py of the mean-teacher code that ONE's cifar_one.py and the OKDDip scripts import."""
    if rampup_length == 0:
        return 1.0
    current = np.clip(current, 0.0, rampup_length)
    phase = 1.0 - current / rampup_length
    return float(np.exp(-5.0 * phase * phase))


def public_kl(pred, label, T=3.0, eps=1e-7, detach=False):
    """KLLoss of ONE (loss/kl_loss.py, the target detached) / KL_Loss of OKDDip (not detached):
    target = softmax(label / T) + 1e-7; T^2 * sum target * (log target - log_softmax(pred / T)) / B."""
    predict = F.log_softmax(pred / T, dim=1)
    target = F.softmax(label / T, dim=1) + eps
    if detach:
        target = target.detach()
    return T * T * (target * (target.log() - predict)).sum(1).sum() / target.size(0)


def one_public_loss(z, gate_scores, y, epoch):
    """cifar_one.py train(): CE of the branches and of the gated ensemble, plus the consistency weight
    (sigmoid_rampup(epoch, 80)) times the KL of every branch to the ensemble (KLLoss: +1e-7, detached)."""
    g = torch.softmax(gate_scores, dim=1)
    ens = sum(g[:, i:i + 1] * zi for i, zi in enumerate(z))
    loss_cross = sum(F.cross_entropy(o, y) for o in (*z, ens))
    w = mean_teacher_sigmoid_rampup(epoch, 80)
    return loss_cross + w * sum(public_kl(zi, ens, detach=True) for zi in z)


@pytest.mark.parametrize("epoch", [0, 1, 40, 79, 80, 200])
def test_one_default_is_the_authors_consistency_ramp(epoch):
    """ONE's default (ramp auto, rampup auto at 300 epochs) is cifar_one.py's weight; with eps = 1e-7 the
    loss and gradients are the script's to 1e-10."""
    z, s, y = logits(4), [torch.randn(B, 4, dtype=torch.float64, requires_grad=True)], torch.randint(0, K, (B,))
    task = task_for("one", z, s, eps=1e-7)
    assert (task.cfg.ramp, task.cfg.rampup) == ("consistency", 80.0)
    task.set_epoch(epoch)
    assert abs(task.kd_scale - mean_teacher_sigmoid_rampup(epoch, 80)) < 1e-15
    check(task(None, y)["loss"], one_public_loss(z, s[0], y, epoch), z + s)


def test_one_constant_weight_stays_a_named_option():
    z, s = logits(3), [torch.randn(B, 3, dtype=torch.float64)]
    task = task_for("one", z, s, ramp="constant")
    task.set_epoch(0)
    assert task.kd_scale == 1.0


def test_rampup_auto_is_the_method_fraction_of_the_run():
    # AHBF: 240 of 300 epochs (and so 72 of 90, 24 of the demo's 30); ONE, CL-ILR, OKDDip, PCL: 80 of 300
    assert resolve_objective(ObjectiveConfig(), "ahbf", 300).rampup == 240.0
    assert resolve_objective(ObjectiveConfig(), "ahbf", 90).rampup == 72.0
    assert resolve_objective(ObjectiveConfig(), "ahbf", 30).rampup == 24.0
    for method in ("one", "cl_ilr", "okddip", "pcl"):
        assert resolve_objective(ObjectiveConfig(), method, 300).rampup == 80.0, method
    assert resolve_objective(ObjectiveConfig(rampup=17.0), "one", 300).rampup == 17.0


# ---- eps: the public code's 1e-7 on the teacher probabilities

def okddip_public_loss(leader, peers, energy, y, w, eps):
    """train_GL.py with its KL_Loss (softmax(teacher / T) + eps, nothing detached)."""
    pro = torch.stack(peers, dim=-1)
    x_m = torch.bmm(pro, torch.softmax(energy, dim=-1).permute(0, 2, 1))
    group = sum(public_kl(pro[:, :, i], x_m[:, :, i], eps=eps) for i in range(len(peers)))
    return (sum(F.cross_entropy(p, y) for p in peers) + F.cross_entropy(leader, y)
            + w * (group + public_kl(leader, torch.mean(pro, dim=2), eps=eps)))


def cl_ilr_public_loss(z, y, w, eps):
    """train_one.py --avg with KL_Loss (+ eps): each branch to the mean of the others' logits."""
    M = len(z)
    target = [sum(z[j] for j in range(M) if j != i) / (M - 1) for i in range(M)]
    return sum(F.cross_entropy(zi, y) for zi in z) + w * sum(public_kl(z[i], target[i], eps=eps) for i in range(M))


@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_eps_matches_okddip_and_cl_ilr_public_kl(eps):
    M, y = 4, torch.randint(0, K, (B,))
    z = logits(M)
    energy = torch.randn(B, M - 1, M - 1, dtype=torch.float64, requires_grad=True)
    loss, _ = okd_objective_reference(z, list(energy.unbind(1)), y, build_graph("okddip", M), 3.0, 0.8, eps=eps)
    check(loss, okddip_public_loss(z[0], z[1:], energy, y, 0.8, eps), z + [energy])
    loss, _ = okd_objective_reference(z, [], y, build_graph("cl_ilr", M), 3.0, 0.6, eps=eps)
    check(loss, cl_ilr_public_loss(z, y, 0.6, eps), z)


@pytest.mark.parametrize("method", ["okddip", "cl_ilr", "ahbf", "one", "pcl"])
def test_eps_in_the_analytic_formulation_matches_the_reference(method):
    """The compiled backend's formulation (run uncompiled here, float64) with eps against the eager one."""
    graph = build_graph(method, 3)
    z = logits(graph.num_branches)
    s = [torch.randn(B, w, dtype=torch.float64, requires_grad=True) for w in graph.score_widths]
    y = torch.randint(0, K, (B,))
    ref, _ = okd_objective_reference(z, s, y, graph, 3.0, 0.7, eps=1e-3)
    scores = score_matrix(s, graph, z[0])
    kd = torch.tensor(0.7, dtype=torch.float64)
    loss, *_, dz, ds = okd_analytic([t.detach() for t in z], scores.detach(), y, 3.0, kd,
                                    enc=encode(graph), eps=1e-3)
    assert abs(loss.item() - ref.item()) < 1e-10
    g = torch.autograd.grad(ref, z + s, allow_unused=True)
    for i in range(len(z)):
        want = torch.zeros_like(z[i]) if g[i] is None else g[i]
        assert (dz[i] - want).abs().max().item() < 1e-10, i
    if s:
        gs = torch.autograd.grad(scores, s, ds, retain_graph=True)
        for a, b in zip(gs, g[len(z):]):
            assert (a - b).abs().max().item() < 1e-10


def test_eps_through_the_fused_op_and_the_backend_switch():
    graph = build_graph("okddip", 4)
    z, y = logits(4), torch.randint(0, K, (B,))
    s = [torch.randn(B, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    ref, _ = okd_objective_reference(z, s, y, graph, 3.0, 0.5, eps=1e-7)
    loss, _ = okd_loss(z, s, y, graph, 3.0, 0.5, backend="compiled", eps=1e-7)
    check(loss, ref, z + s)
    with pytest.raises(ValueError, match="eps"):
        okd_loss(z, s, y, graph, 3.0, 0.5, backend="triton", eps=1e-7)
    from ahbf.kernels.okd import choose_backend
    cuda_like = [torch.empty(2, 3, device="meta")]
    assert choose_backend("auto", cuda_like, eps=1e-7) == "compiled"
    with pytest.raises(ConfigError, match="objective.eps"):
        build_config(overrides=[("objective.backend", "triton"), ("objective.eps", 1e-7)])
    with pytest.raises(ConfigError, match="objective.eps"):
        build_config(overrides=[("objective.eps", -1e-7)])


def test_eps_shift_per_edge_is_about_k_t2_eps():
    """The documented size (docs/methods.md): per KL edge, K = 100, T = 3, unit-scale logits, the loss
    moves by about K * T^2 * eps = 9e-5 (the leading term of sum_k (p + eps) log(p + eps) - p log p)."""
    torch.manual_seed(0)
    s, t = (torch.randn(128, 100, dtype=torch.float64) for _ in range(2))
    graph = build_graph("dml", 2)  # two edges of weight 1
    y = torch.randint(0, 100, (128,))
    exact, _ = okd_objective_reference([s, t], [], y, graph, 3.0, 1.0)
    shifted, _ = okd_objective_reference([s, t], [], y, graph, 3.0, 1.0, eps=1e-7)
    per_edge = (shifted - exact).item() / 2
    assert abs(per_edge - 100 * 9 * 1e-7) < 0.05 * 9e-5, per_edge


# ---- PCL: the KL to the mean of the EMA peers' logits, or the mean of the KLs (the public reproduction)

def pcl_public_loss(z, head, ema, y, w, T=3.0):
    """shaoeric/Peer-Collaborative-Learning loss_wrapper.py + PMLoss: per peer CE + w * (KL(z_i || head)
    + mean over the other EMA peers of KL(z_i || ema_j)); plus CE of the head; targets detached."""
    def kd(p, t):
        return F.kl_div(F.log_softmax(p / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean") * T * T

    M, loss = len(z), F.cross_entropy(head, y)
    for i in range(M):
        others = [ema[j] for j in range(M) if j != i]
        pm = sum(kd(z[i], t.detach()) for t in others) / len(others)
        loss = loss + F.cross_entropy(z[i], y) + kd(z[i], head.detach()) * w + pm * w
    return loss


@pytest.mark.parametrize("M", [2, 3, 4])
def test_pcl_mean_kl_matches_the_public_reproduction(M):
    z, head, ema, y = logits(M), logits(1)[0], [t.detach() for t in logits(M)], torch.randint(0, K, (B,))
    task = task_for("pcl", [*z, head, *ema], [], branches=M, pcl_target="mean_kl")
    task.set_epoch(30)
    w = task.kd_scale
    check(task(None, y)["loss"], pcl_public_loss(z, head, ema, y, w), z + [head])
    names = task.node_names
    assert not any(n.startswith("peer_mean_teacher") for n in names)
    mean_logits = task_for("pcl", [*z, head, *ema], [], branches=M)
    assert (mean_logits.graph != task.graph) == (M > 2)  # with one other peer the two forms are one graph
    assert mean_logits.cfg.pcl_target == "mean_logits"


# ---- KDCL: (1 - a) CE + a KL at T = 4, a = 0.5 (public reimplementations)

def kdcl_public_loss(z, y, alpha, T=4.0):
    """Per peer: (1 - alpha) * CE + alpha * T^2 * KL(softmax(target / T) || softmax(z / T)), target =
    MinLogit of all peers (detached)."""
    t = torch.stack([zi - zi.gather(1, y[:, None]) for zi in z]).min(0).values.detach()
    return sum((1 - alpha) * F.cross_entropy(zi, y)
               + alpha * T * T * F.kl_div(F.log_softmax(zi / T, 1), F.softmax(t / T, 1), reduction="batchmean")
               for zi in z)


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.9])
def test_kdcl_alpha_form_is_ce_weight_and_kd_weight(alpha):
    """(1 - a) CE + a KL = (1 - a) * (CE + a / (1 - a) KL): the task scales by ce_weight, the kernel is unchanged."""
    z, y = logits(3), torch.randint(0, K, (B,))
    task = task_for("kdcl", z, [], T=4.0, ce_weight=1 - alpha, kd_weight=alpha)
    task.set_epoch(5)
    out = task(None, y)
    check(out["loss"], kdcl_public_loss(z, y, alpha), z)
    plain, _ = okd_loss([*z, minlogit_target(z, y)], [], y, task.graph, 4.0, 1.0, backend="eager")
    assert abs(out["ce"].item() + out["kd"].item() - plain.item()) < 1e-10  # the logged terms stay unweighted


def test_ce_weight_must_be_positive():
    with pytest.raises(ConfigError, match="objective.ce_weight must be > 0"):
        build_config(overrides=[("objective.ce_weight", 0)])
    assert math.isclose(build_config(overrides=[("objective.ce_weight", 0.5)]).objective.ce_weight, 0.5)
