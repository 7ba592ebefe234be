"""Two CPU processes under torchrun (Gloo): DDP training, rank-0-only outputs, metrics summed over ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from ahbf.engine.checkpoint import load_checkpoint

TINY = ["--dataset", "synthetic", "data.synthetic_samples=64", "--image-size", "8", "--arch", "resnet8", "-b", "8",
        "--epochs", "2", "--precision", "fp32", "--objective-backend", "eager", "--no-progress",
        "train.tensorboard=false", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ahbf.engine.cli", *TINY, "-o", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("TARGET (branch0) TEST TOP-1") == 1  # rank 0 reports, rank 1 stays quiet
    assert "58 train / 6 val" in proc.stdout  # the global split, sharded by global rank
    results = json.load(open(tmp_path / "results.json"))
    assert results["test"]["_samples"]["n"] == 16  # the test set counted once, summed over both ranks
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["step"] == 2 * 4  # ceil(58 / 2 ranks / 8) = 4 steps per epoch
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not any(name.endswith(".tmp") or ".tmp" in name for name in os.listdir(tmp_path))
