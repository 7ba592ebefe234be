"""train.compile (off | model | branches), train.threads and the linear lr scaling rule."""
from __future__ import annotations

import os

import pytest
import torch
import yaml
from torch import nn

from ahbf.engine import run as run_module
from ahbf.engine.cli import parse_train_args
from ahbf.engine.compile import compile_model, compile_regions, compile_units
from ahbf.engine.config import ConfigError, RunConfig, build_config
from ahbf.engine.distributed import DistEnv, default_threads
from ahbf.engine.optim import build_optimizer
from ahbf.engine.precision import AmpStepper
from ahbf.engine.schedules import scaled_lr
from ahbf.engine.resolve import peak_lr, resolve_objective, resolve_values
from ahbf.engine.task import OKDTask
from ahbf.engine.run import build_run, wrap_model
from ahbf.engine.trainer import Trainer
from ahbf.methods import build_graph
from ahbf.models import create_model

CPU = DistEnv(0, 0, 1, torch.device("cpu"))


def train_losses(compile: str, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A few fp32 SGD steps of a tiny 2-branch AHBF net, built through the Trainer's wrap_model."""
    torch.manual_seed(0)
    model = create_model("resnet8", "ahbf", 10, 2)
    cfg = RunConfig().replace(optim={"lr": 0.02})  # small steps: fp32 rounding differences stay small instead of growing chaotically
    objective = resolve_objective(cfg.objective, "ahbf")
    amp = AmpStepper(build_optimizer(model.parameters(), cfg.optim), model.parameters(), CPU.device, "fp32")
    train_fwd, _ = wrap_model(model, CPU, compile)
    task = OKDTask(train_fwd, build_graph("ahbf", 2, objective), objective, amp.autocast)
    task.set_epoch(10)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    losses = []
    for _ in range(steps):
        terms = task(x, y)
        losses.append(terms["loss"].item())
        amp.step(terms["loss"])
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["model", "branches", "regions"])
def test_compiled_training_matches_eager(mode):
    torch.compiler.reset()
    eager_losses, eager_state = train_losses("off")
    losses, state = train_losses(mode)
    # inductor's CPU BatchNorm backward is less exact than eager's: trunk gradients 1-2e-3 off float64 at
    # 16 px (eager fp32: 1e-6; measured), so a few steps agree to 1e-3 in the loss, not to fp32 rounding
    assert losses == pytest.approx(eager_losses, rel=1e-3)
    assert losses[-1] < losses[0]  # the steps did train
    for k, v in eager_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-2, atol=1e-2, msg=k)


def test_branches_compiles_each_unit_in_place():
    model = create_model("resnet8", "ahbf", 10, 3)
    units = compile_units(model)
    assert units == [model.trunk, *model.branches, *model.fusions]
    keys = list(model.state_dict())
    assert compile_model(model, "branches") is model  # the parent's forward stays eager
    assert list(model.state_dict()) == keys  # checkpoints are unchanged
    dml = create_model("resnet8", "dml", 10, 2)
    assert len(compile_units(dml)) == 4  # trunk + branch of each peer


def test_regions_are_the_repeated_blocks_of_one_shape_at_least_twice():
    """AHBF ResNet-32: 53 of its 54 basic blocks in 4 shapes (the trunk's one 16 -> 32 block and the 3 fusion
    modules stay eager); VGG has no repeated block: the whole model is compiled, with a note."""
    from ahbf.models.resnet import BasicBlock

    model = create_model("resnet32", "ahbf", 100, 4, 4)
    regions = compile_regions(model)
    assert len(regions) == 53 and all(type(r) is BasicBlock for r in regions)
    assert model.trunk.layer2[0] not in regions and model.branches[3].layer3[0] in regions
    assert len({tuple(p.shape for p in r.parameters()) for r in regions}) == 4
    assert compile_regions(create_model("resnet8", "baseline", 10, 1)) == []  # each block shape once
    notes = []
    vgg = create_model("vgg16", "ahbf", 10, 2)
    assert compile_model(vgg, "regions", note=notes.append) is not vgg and "no repeated blocks" in notes[0]


def test_branches_without_compile_units_falls_back_to_model():
    notes = []
    plain = nn.Sequential(nn.Linear(4, 4))
    out = compile_model(plain, "branches", note=notes.append)
    assert out is not plain and isinstance(out, torch._dynamo.eval_frame.OptimizedModule)
    assert "compiling the whole model" in notes[0]


def test_compile_values_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  compile: branches\n")
    assert build_config([str(path)]).train.compile == "branches"
    path.write_text("train:\n  compile: true\n")  # the old boolean: one line naming the values
    with pytest.raises(ConfigError, match="train.compile: unknown value 'true'; choose from off, model, branches"):
        build_config([str(path)])
    assert parse_train_args(["--compile"]).train.compile == "model"
    assert parse_train_args(["--no-compile"]).train.compile == "off"
    cfg = parse_train_args(["--compile", "objective.T=4", "--compile-mode", "max-autotune"])  # not swallowed
    assert (cfg.train.compile, cfg.objective.T, cfg.train.compile_mode) == ("model", 4.0, "max-autotune")
    assert parse_train_args(["--compile", "branches", "--epochs", "2"]).train.compile == "branches"
    with pytest.raises(ConfigError, match="train.compile_mode"):
        build_config(overrides=[("train.compile_mode", "fast")])


def test_first_compiled_step_is_timed_apart(tmp_path, monkeypatch):
    """img/s leaves out the first (compiling) step, whose seconds are reported as compile_s."""
    monkeypatch.setattr(run_module, "compile_model", lambda model, *args: model)  # no real compile: fast
    cfg = build_config(overrides=[("data.dataset", "synthetic"), ("data.synthetic_samples", 40),
                                  ("data.image_size", 8), ("data.batch_size", 9), ("data.val_fraction", 0),
                                  ("model.arch", "resnet8"), ("model.num_branches", 2), ("train.epochs", 2),
                                  ("train.precision", "fp32"), ("train.compile", "model"),
                                  ("train.output", str(tmp_path)),
                                  ("train.progress", False), ("train.tensorboard", False), ("optim.lr_base_batch", 18),
                                  ("train.threads", 1)])
    trainer = Trainer(build_run(cfg, CPU))
    assert trainer.schedule.lr == pytest.approx(0.1 * 9 / 18)  # the peak lr: resolve.peak_lr, held by the schedule
    # one lr path: scaled peak -> schedule -> optimiser (its first lr is the schedule's first step's)
    assert trainer.amp.optimizer.param_groups[0]["lr"] == trainer.schedule(0, 0) < trainer.schedule.lr
    trainer.fit()
    first, second = trainer.state.history
    assert first["compile_s"] > 0 and "compile_s" not in second
    assert first["img_per_s"] == pytest.approx(31 / first["epoch_s"])  # 40 images, the first batch of 9 untimed
    assert second["img_per_s"] == pytest.approx(40 / second["epoch_s"])
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["threads"] == torch.get_num_threads() == 1


def test_min_lr_is_checked_against_the_scaled_peak_lr():
    scaled = [("optim.lr", 0.1), ("optim.lr_base_batch", 32), ("data.batch_size", 64), ("schedule.min_lr", 0.15)]
    cfg = build_config(overrides=scaled)  # unscaled lr 0.1 < min_lr 0.15 < scaled peak 0.2: a valid run
    assert peak_lr(resolve_values(cfg, CPU), CPU.world_size) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match=r"schedule.min_lr must be in \[0, peak lr = 0.1\], got 0.5"):
        resolve_values(build_config(overrides=[("schedule.min_lr", 0.5)]), CPU)
    with pytest.raises(ConfigError, match=r"peak lr = 0.05, optim.lr 0.1 scaled to the global batch\], got 0.15"):
        resolve_values(build_config(overrides=[*scaled, ("data.batch_size", 16)]), CPU)


def test_threads_and_lr_scaling(monkeypatch):
    assert resolve_values(RunConfig(), CPU).train.threads == default_threads() >= 1  # auto, written to config.yaml
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert default_threads() == 1
    assert scaled_lr(0.1, 256, 1024) == pytest.approx(0.4)
    assert scaled_lr(0.1, 0, 1024) == 0.1
    with pytest.raises(ConfigError, match="train.threads must be >= 0"):
        build_config(overrides=[("train.threads", -1)])


def test_threads_respect_omp_num_threads_then_the_affinity_mask(monkeypatch):
    from ahbf.engine.distributed import busy_hint, threads_origin

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3 and threads_origin(3) == "OMP_NUM_THREADS" and threads_origin(5) == "train.threads"
    assert resolve_values(RunConfig(), CPU).train.threads == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5})  # a job's share of a bigger machine
    assert default_threads() == 2 and threads_origin(2) == "2 usable cores"
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))  # another job keeps both cores busy
    assert "load average 1.9 on 2 cores" in busy_hint(2) and "--threads 1" in busy_hint(2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert busy_hint(2) == ""
