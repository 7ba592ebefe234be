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


def _resume_rank(rank: int, port: int, out: str, steps: str) -> None:
    """One of 2 Gloo ranks resuming ``out`` with --resume auto; rank 1 sees only ``last.1.pt`` (as after a
    transient read error of last.pt on its node). Writes the step it resumed to ``steps/<rank>``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from ahbf.engine import distributed, state, trainer
    from ahbf.engine.run import build_run
    from ahbf.engine.cli import _parse_train_args

    if rank == 1:
        original = state.newest_first
        state.newest_first = lambda path: original(path)[1:]
    cfg, _ = _parse_train_args([*TINY, "-o", out, "--resume", "auto", "train.threads=1"])
    env = distributed.setup("cpu", 60)
    try:
        run = trainer.Trainer(build_run(cfg, env))
        run.close()
        with open(os.path.join(steps, str(rank)), "w") as f:
            f.write(str(run.state.step))
    finally:
        distributed.teardown()


def test_every_rank_resumes_the_checkpoint_rank_0_chose(tmp_path):
    from ahbf.engine.cli import train_main

    out = tmp_path / "run"
    assert train_main([*TINY, "-o", str(out), "--epochs", "1", "--checkpoint-every", "3", "train.threads=1"]) == 0
    assert [load_checkpoint(str(out / f))["step"] for f in ("last.pt", "last.1.pt")] == [8, 6]
    (tmp_path / "steps").mkdir()
    torch.multiprocessing.spawn(_resume_rank, args=(free_port(), str(out), str(tmp_path / "steps")), nprocs=2)
    assert [(tmp_path / "steps" / r).read_text() for r in "01"] == ["8", "8"]


def _first_rank(rank: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import time

    from ahbf.engine import distributed

    env = distributed.setup("cpu", 60)
    try:
        with distributed.local_main_first(env):
            if rank == 0:
                time.sleep(1.0)  # a slow download
                with open(os.path.join(folder, "archive"), "w") as f:
                    f.write("done")
            else:  # rank 1 starts only once local rank 0 has finished
                with open(os.path.join(folder, "seen"), "w") as f:
                    f.write(open(os.path.join(folder, "archive")).read())
    finally:
        distributed.teardown()


def _first_rank_fails(rank: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import time

    from ahbf.engine import distributed

    env = distributed.setup("cpu", 120)
    start = time.monotonic()
    try:
        with distributed.local_main_first(env):
            if rank == 0:
                raise OSError("download failed")
            open(os.path.join(folder, "ran"), "w").close()  # must not happen: local rank 0 failed
    except (OSError, distributed.LocalMainFailed) as err:
        with open(os.path.join(folder, f"rank{rank}"), "w") as f:
            f.write(f"{type(err).__name__} {time.monotonic() - start:.1f}")
    finally:
        distributed.teardown()


def test_a_failed_first_block_stops_the_other_ranks_at_once(tmp_path):
    """A download that fails on local rank 0: that rank has its own error, the others stop at once with
    LocalMainFailed (they used to wait at a barrier until train.dist_timeout) and never run the block."""
    torch.multiprocessing.spawn(_first_rank_fails, args=(free_port(), str(tmp_path)), nprocs=2)
    assert not (tmp_path / "ran").exists()
    kind0, _ = (tmp_path / "rank0").read_text().split()
    kind1, seconds = (tmp_path / "rank1").read_text().split()
    assert (kind0, kind1) == ("OSError", "LocalMainFailed")
    assert float(seconds) < 60  # not the 120 s timeout


def test_local_rank_0_downloads_first(tmp_path):
    """``--download`` under torchrun: one download per node, the other ranks find its files (no race with the
    clean-up of a failed download)."""
    torch.multiprocessing.spawn(_first_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    assert (tmp_path / "seen").read_text() == "done"
