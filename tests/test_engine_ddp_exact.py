"""Exact data parallelism: 2 Gloo processes x batch 8 with SyncBN train the same weights as 1 process x batch 16.

Why it can be exact: with augmentation off, rank r's k-th batch is samples ``order[16k + r::2]`` of the same
epoch permutation, so the two ranks together hold the single process's batch (in another order); every term
of the objective is a batch mean and DDP averages the two ranks' gradients; SyncBN normalises with the
global batch's statistics. Without SyncBN each rank normalises its own 8 samples and the runs differ.

The runs train in float64 (``--precision fp64``), so the verdict does not depend on the CPU: in float32 the two
runs agree to 3e-6 for 3 steps, then differ by 1.7e-3 in a BatchNorm running variance after step 4 on an AVX-512
AMD EPYC (2.4e-6 on the same box under ``ONEDNN_MAX_CPU_ISA=AVX2``; measured 2026-12-06): the sums are ordered
differently, fp32 rounding flips an activation across a ReLU kink in this tiny 8-px net, and the difference grows
from there. In float64 the same 4 steps agree to 5e-15 on both instruction sets (``FP64_BOUND``). What float32
cannot flip is one step: the first step's loss, gradients and batch statistics are the same sums in another order,
so one fp32 step is also checked (``FP32_STEP_BOUND``).
torch's ``nn.SyncBatchNorm`` (and DDP around it) refuses CPU tensors, so on CPU the engine uses its own
``CpuSyncBatchNorm`` (differentiable all-reduces over Gloo), tested here; on CUDA it uses torch's (untested here).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from ahbf.engine.checkpoint import load_checkpoint
from test_engine_ddp import free_port

COMMON = ["--dataset", "synthetic", "data.synthetic_samples=64", "data.val_fraction=0", "data.augment=false",
          "--image-size", "8", "--arch", "resnet8", "--num-branches", "3", "--epochs", "1", "--precision", "fp64",
          "--objective-backend", "eager", "--deterministic", "--no-progress", "train.tensorboard=false",
          "--log-interval", "1", "--lr", "0.01", "--device", "cpu", "--threads", "1"]
pytestmark = pytest.mark.isa  # CI runs these again under ONEDNN_MAX_CPU_ISA=AVX2
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FP64_BOUND = 1e-10  # float64, 4 steps: measured 5.3e-15 (weights), 0 (losses) on AVX-512 and under AVX2
FP32_STEP_BOUND = 1e-5  # float32, 1 step: measured 1.3e-6 (weights), 9.5e-7 (loss) on AVX-512 and under AVX2
ONE_STEP = ["data.synthetic_samples=16", "--precision", "fp32"]  # 16 samples: one step of the global batch 16


def run(out, *args: str, procs: int = 1) -> tuple[dict[str, torch.Tensor], list[float]]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port()), "-m", "ahbf.engine.cli"] if procs > 1
                else [sys.executable, "-m", "ahbf.engine.cli"])
    proc = subprocess.run([*launcher, *COMMON, *args, "-o", str(out)], capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "metrics.csv") as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    return load_checkpoint(str(out / "last.pt"))["model"], losses


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), "-b", "16")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a if a[k].is_floating_point())


def assert_same_run(got: tuple[dict[str, torch.Tensor], list[float]],
                    ref: tuple[dict[str, torch.Tensor], list[float]], bound: float) -> None:
    (weights, losses), (ref_weights, ref_losses) = got, ref
    assert weights[next(iter(weights))].dtype == ref_weights[next(iter(ref_weights))].dtype
    assert losses == pytest.approx(ref_losses, rel=bound, abs=bound)
    diff, key = max_diff(weights, ref_weights)
    assert diff < bound, f"{key} differs by {diff:.3g}"
    assert any(torch.ne(weights[k], 0).any() and k.endswith("running_mean") for k in weights)


def test_two_ranks_with_sync_bn_equal_one_process(single, tmp_path):
    got = run(tmp_path, "-b", "8", "--sync-bn", procs=2)
    assert got[0]["trunk.conv1.weight"].dtype == torch.float64
    assert_same_run(got, single, FP64_BOUND)


def test_one_fp32_step_with_sync_bn_equals_one_process(tmp_path):
    """What fp32 rounding cannot flip: one step (the same sums in another order)."""
    ref = run(tmp_path / "single", "-b", "16", *ONE_STEP)
    got = run(tmp_path / "ranks", "-b", "8", "--sync-bn", *ONE_STEP, procs=2)
    assert len(got[1]) == 1 and got[0]["trunk.conv1.weight"].dtype == torch.float32
    assert_same_run(got, ref, FP32_STEP_BOUND)


def test_without_sync_bn_the_runs_differ(single, tmp_path):
    """The control: per-rank BatchNorm statistics of 8 samples change the result (so the test above can fail)."""
    weights, _ = run(tmp_path, "-b", "8", "--no-sync-bn", procs=2)
    diff, _ = max_diff(weights, single[0])
    assert diff > 1e-3


@pytest.mark.parametrize("arch, method", [("mobilenetv2_x0_5", "ahbf"), ("resnet8", "pcl")])
def test_sync_bn_conversion_keeps_frozen_parameters_frozen(arch, method):
    """MobileNetV2's unused blocks and PCL's EMA copy are frozen; a converted BN that trained them would make DDP
    fail ("Expected to have finished reduction") at step 2."""
    from ahbf.engine.distributed import CpuSyncBatchNorm, convert_sync_batchnorm
    from ahbf.models import create_model

    model = create_model(arch, method, 10, 3, 2)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not all(before.values())
    convert_sync_batchnorm(model)
    assert any(isinstance(m, CpuSyncBatchNorm) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
