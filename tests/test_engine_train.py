"""The trainer end to end on a tiny synthetic config: steps reduce the loss, bitwise resume in a fresh
process, eval / export round trips, one-line errors for mismatched checkpoints and non-finite losses."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from ahbf.engine.cli import eval_main, export_main, train_main
from ahbf.engine.config import RunConfig, build_config, load_yaml
from ahbf.engine.checkpoint import load_checkpoint
from ahbf.engine.optim import build_optimizer
from ahbf.engine.precision import AmpStepper
from ahbf.engine.resolve import resolve_objective
from ahbf.engine.task import OKDTask
from ahbf.methods import build_graph
from ahbf.models import create_model, create_plain

# 58 train / 6 val / 16 test images of 8 x 8 px, 10 classes, resnet8: about a second per epoch
TINY = ["--dataset", "synthetic", "data.synthetic_samples=64", "--image-size", "8", "--arch", "resnet8",
        "-b", "16", "data.eval_batch_size=32", "--epochs", "2", "--precision", "fp32", "--objective-backend", "eager",
        "--deterministic", "--no-progress", "train.tensorboard=false", "--log-interval", "2", "train.save_every=1",
        "--warmup-epochs", "0.5", "--lr", "0.05"]


def cli(*args: str) -> subprocess.CompletedProcess:
    """ahbf-train in a fresh Python process (what a user's second invocation is)."""
    return subprocess.run([sys.executable, "-m", "ahbf.engine.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """An uninterrupted 2-epoch run (fresh process), keeping epoch_1.pt."""
    out = tmp_path_factory.mktemp("run")
    proc = cli(*TINY, "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", ["ahbf", "one", "dml", "baseline"])
def test_a_few_steps_reduce_the_loss(method):
    torch.manual_seed(0)
    model = create_model("resnet8", method, 10, 2)
    cfg = RunConfig()
    objective = dataclasses.replace(resolve_objective(cfg.objective, method), backend="eager")
    amp = AmpStepper(build_optimizer(model.parameters(), cfg.optim), model.parameters(), torch.device("cpu"), "fp32")
    task = OKDTask(model, build_graph(method, model.spec["num_branches"], objective), objective, amp.autocast)
    task.set_epoch(10)
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % 10
    losses = []
    for _ in range(8):
        terms = task(x, y)
        assert set(terms) == {"loss", "ce", "kd"}
        losses.append(terms["loss"].item())
        amp.step(terms["loss"])
    assert losses[-1] < 0.7 * losses[0], losses


def test_task_calls_the_fused_objective_entry_point_with_the_configured_backend():
    from ahbf.engine.task import objective_fn
    from ahbf.kernels.okd import okd_loss

    for backend in ("auto", "triton", "compiled", "eager"):
        fn = objective_fn(backend)
        assert fn.func is okd_loss and fn.keywords == {"backend": backend, "reuse_grads": True}


def test_run_writes_every_output(run_dir):
    names = set(os.listdir(run_dir))
    assert {"last.pt", "best.pt", "epoch_1.pt", "epoch_2.pt", "config.yaml", "metrics.csv", "curves.png",
            "results.json"} <= names
    cfg = build_config([str(run_dir / "config.yaml")])  # the final config reloads as a config
    assert (cfg.model.aux, cfg.objective.kd_weight, cfg.objective.ramp, cfg.train.precision) == (4, 1.5, "sigmoid", "fp32")
    assert load_yaml(str(run_dir / "config.yaml"))["train"]["epochs"] == 2
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and "val_branch0_top1" in rows[0] and "val_ta2_top5" in rows[0]
    ckpt = load_checkpoint(str(run_dir / "last.pt"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["spec"]["arch"]) == (2, 8, "resnet8")


def test_resume_in_a_fresh_process_is_bitwise_identical(run_dir, tmp_path):
    proc = cli(*TINY, "-o", str(tmp_path), "--resume", str(run_dir / "epoch_1.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    a, b = load_checkpoint(str(run_dir / "last.pt")), load_checkpoint(str(tmp_path / "last.pt"))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optim"]["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optim"]["optimizer"]["state"][k]["momentum_buffer"]), k
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    ra, rb = (json.load(open(d / "results.json")) for d in (run_dir, tmp_path))
    assert (ra["checkpoint"], ra["best"], ra["test"]) == (rb["checkpoint"], rb["best"], rb["test"])
    assert (tmp_path / "best.pt").exists()


def test_eval_reproduces_the_runs_test_numbers(run_dir, capsys):
    assert eval_main([str(run_dir / "last.pt")]) == 0
    table = capsys.readouterr().out
    results = json.load(open(run_dir / "results.json"))
    for node in ("branch0", "branch3", "ta0", "ta2"):
        assert node in table
    expected = results["test_last"]["branch0"]["top1"]
    line = next(l for l in table.splitlines() if l.startswith("branch0"))
    assert float(line.split()[-2]) == pytest.approx(expected, abs=0.01)


def test_export_loads_strictly_into_the_plain_model_and_matches_branch0(run_dir, tmp_path, capsys):
    out = tmp_path / "target.pt"
    assert export_main([str(run_dir / "last.pt"), "-o", str(out)]) == 0
    assert "create_plain('resnet8', 10)" in capsys.readouterr().out
    plain = create_plain("resnet8", 10)
    plain.load_state_dict(torch.load(out, weights_only=True), strict=True)
    ckpt = load_checkpoint(str(run_dir / "last.pt"))
    model = create_model(**ckpt["spec"])
    model.load_state_dict(ckpt["model"])
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), model.eval()(x).logits[0])


def test_resume_with_another_architecture_is_a_one_line_error(run_dir, tmp_path, capsys):
    args = [a if a != "resnet8" else "resnet14" for a in TINY]
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    assert train_main([*args, "-o", str(run_dir), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("ahbf-train: error: checkpoint ") and "resnet8" in err and "resnet14" in err
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # nothing was overwritten


def test_gradient_clipping_bounds_the_norm():
    model = create_model("resnet8", "baseline", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    amp = AmpStepper(opt, model.parameters(), torch.device("cpu"), "fp32", clip_grad=0.5)
    captured = {}
    opt.register_step_pre_hook(lambda o, a, k: captured.update(
        norm=torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
    loss = model(torch.randn(8, 3, 8, 8)).logits[0].pow(2).sum()
    norm = amp.step(loss)
    assert norm > 0.5 and captured["norm"] == pytest.approx(0.5, rel=1e-4)


def test_non_finite_loss_stops_with_the_step(tmp_path, capsys):
    assert train_main([*TINY, "-o", str(tmp_path), "--lr", "1e30", "--warmup-epochs", "0", "--log-interval", "3"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ahbf-train: error: non-finite loss at step 2"), err


def test_a_final_batch_of_one_sample_is_skipped(tmp_path, capsys):
    """58 training images in batches of 19 leave one image: BatchNorm cannot train on it, so it is skipped."""
    args = [a if a != "16" else "19" for a in TINY]
    assert train_main([*args, "--epochs", "1", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "it holds 1 sample" in out.out + out.err
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 3  # 3 full batches, the single one skipped


def test_eval_does_not_prescan_every_image(run_dir, monkeypatch):
    """ahbf-eval must not check all training images up front (1.28M files for ImageNet) to evaluate a split."""
    from ahbf.engine import eval_export as ev

    seen, real = {}, ev.build_data

    def spy(cfg, **kwargs):
        seen["check_images"] = cfg.check_images
        return real(cfg, **kwargs)

    monkeypatch.setattr(ev, "build_data", spy)
    metrics = ev.run_eval(str(run_dir / "last.pt"))
    assert seen["check_images"] == "none" and 0 <= metrics["branch0"]["top1"] <= 100
    ev.run_eval(str(run_dir / "last.pt"), overrides=[("data.check_images", "full")])
    assert seen["check_images"] == "full"
