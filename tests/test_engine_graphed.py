"""train.cuda_graph on a CPU (ahbf/engine/graphed.py): the static-buffer step, uncaptured, gives bitwise the
weights of the plain step; the capture branch's control flow runs with a simulated graph (a replay re-runs the
step); and the step's code traces as one torch.compile graph (no break, no host sync)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.sgd import sgd

from ahbf.engine.config import RunConfig, build_config
from ahbf.engine.distributed import DistEnv
from ahbf.engine.graphed import GraphedStep, capture_blockers
from ahbf.engine.optim import build_optimizer, set_lr
from ahbf.engine.precision import AmpStepper
from ahbf.engine.resolve import resolve_objective
from ahbf.engine.run import build_run
from ahbf.engine.task import OKDTask
from ahbf.methods import build_graph
from ahbf.models.branched import BranchOutput

CPU = DistEnv(0, 0, 1, torch.device("cpu"))


def tiny_run(cuda_graph: bool, backend: str, precision: str = "fp32"):
    cfg = build_config(overrides=[
        ("data.dataset", "synthetic"), ("data.synthetic_samples", 20), ("data.image_size", 8), ("data.batch_size", 8),
        ("data.val_fraction", 0), ("model.arch", "resnet8"), ("model.num_branches", 3), ("train.epochs", 3),
        ("train.precision", precision), ("train.threads", 1), ("objective.backend", backend),
        ("objective.rampup", 2), ("schedule.warmup_epochs", 1), ("train.cuda_graph", cuda_graph)])
    return build_run(cfg, CPU)


def train(run) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The trainer's loop, reduced: per epoch the KD ramp, per step the lr, then the step."""
    losses = []
    for epoch in range(run.cfg.train.epochs):
        run.task.set_epoch(epoch)
        run.data.train.set_epoch(epoch, 0)
        for i, (x, y) in enumerate(run.data.train):
            set_lr(run.amp.optimizer, run.schedule(epoch, i))
            losses.append(run.train_step(x, y)["loss"].item())
    run.close()
    return {k: v.clone() for k, v in run.model.state_dict().items()}, losses


@pytest.mark.parametrize("backend, precision", [("triton", "fp32"), ("eager", "fp32"), ("compiled", "fp64")])
def test_static_buffer_step_gives_bitwise_the_plain_steps_weights(backend, precision):
    """20 samples in batches of 8: two full batches per epoch through the graphed-style step (static inputs,
    lr and kd_scale as tensors filled in place), the last one of 4 through its eager fallback; the KD ramp
    and the warm-up lr change every epoch / step. Same weights and losses, bit for bit (fp64 too: kd_scale is a
    float64 tensor there, as the plain step's)."""
    plain, graphed = tiny_run(False, backend, precision), tiny_run(True, backend, precision)
    assert plain.graphed is None and isinstance(graphed.graphed, GraphedStep) and not graphed.graphed.capture
    assert isinstance(graphed.amp.optimizer.param_groups[0]["lr"], torch.Tensor)
    assert any("uncaptured" in note for note in graphed.notes)
    ref_state, ref_losses = train(plain)
    state, losses = train(graphed)
    assert graphed.graphed.noted_shape and graphed.graphed.warm == 6  # 2 full batches x 3 epochs
    assert losses == ref_losses and len(losses) == 9
    for k, v in ref_state.items():
        assert torch.equal(state[k], v), k


class ReplayByRerun:
    """``torch.cuda.CUDAGraph`` simulated on a CPU: a capture runs the step (a real one records without running,
    and the replay that follows runs it: here that first replay is skipped); a replay re-runs the step on the
    same static buffers and writes its results into the tensors the capture returned, as a replay does."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, -1

    def replay(self):
        self.replays += 1
        if self.replays:
            for k, v in self.fn().items():
                self.out[k].copy_(v)


def simulated_capture(monkeypatch, fail: bool = False):
    """GraphedStep's CUDA calls replaced: streams by nothing, ``record`` by :class:`ReplayByRerun` (or an error
    as a capture raises it)."""
    import contextlib

    from ahbf.engine import graphed

    def record(fn, stream):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        out = fn()
        return ReplayByRerun(fn, out), out, ["plans"]
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: object())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(graphed, "side_stream", lambda stream, device: contextlib.nullcontext())
    monkeypatch.setattr(graphed, "record", record)


@pytest.mark.parametrize("fail", [False, True], ids=["captured", "capture-fails"])
def test_the_capture_branch_warms_up_captures_once_and_replays(monkeypatch, fail):
    """The capture path's control flow, which only a GPU runs for real: WARMUP eager steps, one capture, then
    replays returning the same static result tensors; a batch of another shape runs eagerly; a failed capture
    notes its first line, clears the gradients and runs the eager step from then on. Either way the weights and
    losses are bitwise the plain run's."""
    simulated_capture(monkeypatch, fail)
    plain, run = tiny_run(False, "eager"), tiny_run(True, "eager")
    resets = []
    run.graphed = GraphedStep(run.eager_step, CPU.device, capture=True, note=run.notes.append,
                              reset=lambda: resets.append(run.amp.optimizer.zero_grad(set_to_none=True)))
    ref_state, ref_losses = train(plain)
    state, losses = train(run)
    g = run.graphed
    assert losses == ref_losses and all(torch.equal(state[k], v) for k, v in ref_state.items())
    if fail:
        assert g.graph is None and not g.capture and len(resets) == 1 and g.warm == 2 + 3  # 2 warm-ups, 3 after
        assert "train.cuda_graph: capture failed (operation not permitted when stream is capturing): the eager " \
               "step runs" in run.notes
    else:
        assert g.warm == 2 and g.graph.replays == 6 - 2 - 1 and g.pinned == ["plans"]  # 6 full batches in all
        assert set(g.terms) >= {"loss", "ce", "kd"}  # the static results every replay rewrites (the losses above)
    assert g.noted_shape  # the last batch of 4 of each epoch ran eagerly


def test_capture_blockers_name_each_reason():
    model = nn.Linear(2, 2)
    fused = build_optimizer(model.parameters(), RunConfig().optim)
    foreach = build_optimizer(model.parameters(), RunConfig().optim.__class__(impl="foreach"))
    cuda = torch.device("cuda")
    assert capture_blockers(cuda, "bf16", 1, fused, "default") == []
    assert len(capture_blockers(cuda, "fp16", 4, foreach, "reduce-overhead")) == 4
    assert capture_blockers(torch.device("cpu"), "fp32", 1, fused, "default")[0].startswith("cpu: no CUDA graphs")


class TinyBranched(nn.Module):
    """A 3-branch stand-in for the AHBF nets (conv + BatchNorm trunk, linear heads, fusion scores), small
    enough for a quick compile."""

    def __init__(self, k: int = 5):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.heads = nn.ModuleList(nn.Linear(4 * 16, k) for _ in range(3))
        self.scores = nn.ModuleList(nn.Linear(4 * 16, 2) for _ in range(2))

    def forward(self, x):
        h = self.trunk(x)
        return BranchOutput([head(h) for head in self.heads], [s(h) for s in self.scores])


def test_the_whole_step_traces_as_one_graph_without_host_syncs():
    """torch.compile(fullgraph=True) of forward + objective (OKDTask, the fused op) + backward + the SGD update
    with a tensor lr and a device kd_scale: a graph break, an .item() or a data-dependent branch would fail
    the compile. The update is torch's functional SGD on the optimiser's state (what SGD.step runs; the
    step method itself graph-breaks on purpose, and the fused kernel is not traced, so it is foreach here)."""
    torch.manual_seed(0)
    model = TinyBranched()
    cfg = RunConfig().replace(objective={"backend": "triton"})  # the GPU's op (interpreted here), opaque to dynamo
    objective = resolve_objective(cfg.objective, "ahbf")
    opt = build_optimizer(model.parameters(), cfg.optim.__class__(impl="foreach"))
    opt.param_groups[0]["lr"] = torch.tensor(0.05)
    amp = AmpStepper(opt, model.parameters(), CPU.device, "fp32")
    task = OKDTask(model, build_graph("ahbf", 3, objective), objective, amp.autocast)
    task.kd_on_device(CPU.device)
    task.set_epoch(100)
    x, y = torch.randn(6, 3, 4, 4), torch.randint(0, 5, (6,))
    amp.step(task(x, y)["loss"])  # the momentum buffers exist from here on, as after the warm-up

    def step(x, y):
        terms = task(x, y)
        terms["loss"].backward()
        with torch.no_grad():
            for g in opt.param_groups:
                ps = [p for p in g["params"] if p.grad is not None]
                sgd(ps, [p.grad for p in ps], [opt.state[p]["momentum_buffer"] for p in ps], foreach=True,
                    weight_decay=g["weight_decay"], momentum=g["momentum"], lr=g["lr"], dampening=g["dampening"],
                    nesterov=g["nesterov"], maximize=g["maximize"], has_sparse_grad=False)
        for p in model.parameters():
            p.grad = None
        return {k: v.detach() for k, v in terms.items()}

    before = [p.detach().clone() for p in model.parameters()]
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True)
        losses = [compiled(x, y)["loss"] for _ in range(2)]
        with torch._dynamo.config.patch(error_on_recompile=True):
            task.set_epoch(0)                   # a new kd_scale and lr: filled in place, no recompile
            opt.param_groups[0]["lr"].fill_(0.01)
            losses.append(compiled(x, y)["loss"])
    assert all(torch.isfinite(v) for v in losses) and losses[1] < losses[0]
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
