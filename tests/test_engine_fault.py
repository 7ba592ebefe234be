"""Long runs on a cluster: stop signals, mid-epoch checkpoints, kill -9, non-finite guard, corrupt checkpoints,
refused output folders, the folder lock. Runs that must be interrupted are fresh processes; the rest run
in-process through ``train_main``."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from ahbf.engine.checkpoint import load_checkpoint
from ahbf.engine.cli import train_main
from ahbf.engine.fault import NONFINITE_EXIT, PREEMPTED_EXIT
from ahbf.engine.rundir import FolderLock

# 58 train / 6 val / 16 test images of 8 x 8 px, batch 8: 8 steps per epoch, 16 in all
TINY = ["--dataset", "synthetic", "data.synthetic_samples=64", "--image-size", "8", "--arch", "resnet8", "-b", "8",
        "--epochs", "2", "--precision", "fp32", "--objective-backend", "eager", "--deterministic", "--no-progress",
        "train.tensorboard=false", "train.threads=1", "--log-interval", "1", "--device", "cpu"]


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ahbf.engine.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_step(proc: subprocess.Popen, step: int, lines: list[str]) -> None:
    """Read the plain progress lines ("... (N)  loss ...") until global step ``step`` is done."""
    for line in proc.stdout:
        lines.append(line)
        if f"({step})  loss" in line:
            return
    raise AssertionError("the run ended before step %d:\n%s" % (step, "".join(lines[-20:])))


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(str(path))["model"]


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final weights."""
    out = tmp_path_factory.mktemp("reference")
    assert train_main([*TINY, "-o", str(out), "--checkpoint-every", "off"]) == 0
    return weights(out / "last.pt")


def test_sigterm_mid_epoch_writes_that_step_and_resume_is_bitwise(tmp_path, reference, capsys):
    proc, lines = start(*TINY, "-o", str(tmp_path), "--checkpoint-every", "off"), []
    wait_for_step(proc, 3, lines)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, rest[-2000:]
    assert "stopped by SIGTERM after step" in rest and "--resume auto" in rest
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["epoch"] == 0 and 3 <= ckpt["step"] == ckpt["batch"] < 8  # mid-epoch: the step it stopped at
    assert train_main([*TINY, "-o", str(tmp_path), "--resume", "auto"]) == 0
    assert f"{ckpt['batch']} batches of epoch 1" in capsys.readouterr().out
    assert_bitwise(weights(tmp_path / "last.pt"), reference)


def test_kill_9_at_random_steps_loses_at_most_one_interval_and_resumes_bitwise(tmp_path, reference):
    seed = os.getpid()
    rng, every, done = random.Random(seed), 3, 0
    for last in (9, 14):  # two kills at random steps, each resumed with the same command
        kill_at = rng.randint(max(done, every) + 1, last)  # after the first checkpoint: there is one to lose
        proc, lines = start(*TINY, "-o", str(tmp_path), "--resume", "auto", "--checkpoint-every", str(every)), []
        wait_for_step(proc, kill_at, lines)
        proc.kill()
        proc.communicate(timeout=60)
        done = load_checkpoint(str(tmp_path / "last.pt"))["step"]
        assert kill_at - every <= done <= kill_at + 1, (seed, kill_at, done)  # at most one interval lost
    proc = start(*TINY, "-o", str(tmp_path), "--resume", "auto", "--checkpoint-every", str(every))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert_bitwise(weights(tmp_path / "last.pt"), reference)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    assert train_main([*TINY, "-o", str(tmp_path), "--epochs", "1", "--checkpoint-every", "4"]) == 0
    assert load_checkpoint(str(tmp_path / "last.1.pt"))["step"] == 4  # keep_last 2: the mid-epoch one
    size = os.path.getsize(tmp_path / "last.pt")
    with open(tmp_path / "last.pt", "r+b") as f:
        f.truncate(size // 2)
    (tmp_path / "best.pt").write_bytes(b"")  # a broken best.pt does not block the resume either
    capsys.readouterr()
    assert train_main([*TINY, "-o", str(tmp_path), "--resume", "auto", "--checkpoint-every", "off"]) == 0
    out = capsys.readouterr().out
    assert "last.pt" in out and "resumed from the previous good checkpoint" in out and "last.1.pt" in out
    assert "resumed from" in out and "4 batches of epoch 1" in out
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 16


def test_flipped_bit_is_caught_by_the_checksum(tmp_path, capsys):
    assert train_main([*TINY, "-o", str(tmp_path), "--epochs", "1", "--checkpoint-every", "off"]) == 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    next(v for v in ckpt["model"].values() if v.is_floating_point()).add_(1e-3)  # the checksum is not updated
    torch.save(ckpt, tmp_path / "last.pt")
    assert not (tmp_path / "last.1.pt").exists()  # one checkpoint only: nothing to fall back to
    capsys.readouterr()
    assert train_main([*TINY, "-o", str(tmp_path), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "do not match its checksum" in err and "no usable checkpoint" in err


def test_huge_lr_stops_and_leaves_no_non_finite_checkpoint(tmp_path, capsys):
    code = train_main([*TINY, "-o", str(tmp_path), "--lr", "1e39", "--log-interval", "20", "--checkpoint-every", "3"])
    assert code == NONFINITE_EXIT
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "non-finite" in err and "step" in err
    assert "last good checkpoint" in err
    for name in os.listdir(tmp_path):
        if name.endswith(".pt"):
            ckpt = load_checkpoint(str(tmp_path / name))
            assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), name


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(tmp_path, capsys):
    assert train_main([*TINY, "-o", str(tmp_path), "--epochs", "1"]) == 0
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    capsys.readouterr()
    assert train_main([*TINY, "-o", str(tmp_path), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    assert train_main([*TINY, "-o", str(tmp_path), "--epochs", "1", "--overwrite"]) == 0
    assert "--overwrite: deleted the previous run's" in capsys.readouterr().out
    assert "overwrite: false" in (tmp_path / "config.yaml").read_text()  # -c config.yaml must not delete it again
    assert load_checkpoint(str(tmp_path / "last.pt"))["config"]["train"]["overwrite"] is False  # the same config


def test_a_live_run_holds_the_folder(tmp_path, capsys):
    lock = FolderLock(str(tmp_path))  # what a live run holds
    try:
        assert train_main([*TINY, "-o", str(tmp_path)]) == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    finally:
        lock.release()
    (tmp_path / "last.pt.tmp4242").write_bytes(b"half a checkpoint")  # a write cut by kill -9
    assert train_main([*TINY, "-o", str(tmp_path), "--epochs", "1", "--checkpoint-every", "off"]) == 0
    assert "removed 1 temporary file(s)" in capsys.readouterr().out
    assert not (tmp_path / "last.pt.tmp4242").exists()


def test_dataloader_workers_die_with_a_killed_trainer(tmp_path):
    """kill -9 of the trainer on the torchvision folder path: its fork server and workers end too."""
    from test_pipelines_folder import write_tree

    write_tree(str(tmp_path / "images"), per_class=(6, 2))
    proc, lines = start(*TINY, "--dataset", "imagenet", "--data-dir", str(tmp_path / "images"), "data.backend=torch",
                        "-j", "2", "--image-size", "32", "-b", "4", "--epochs", "20", "-o", str(tmp_path / "run")), []
    wait_for_step(proc, 2, lines)
    family = _descendants(proc.pid)
    assert len(family) >= 3, family  # the fork server and two workers at least
    proc.kill()
    proc.wait(timeout=60)
    proc.stdout.close()  # the children hold the pipe's write end: do not wait for its end
    deadline = time.time() + 15
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in family):
        time.sleep(0.2)
    alive = [p for p in family if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
    for p in alive:  # never leave them behind, even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not alive, f"{len(alive)} of {len(family)} child processes outlived the trainer"


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [int(c) for t in os.listdir(f"/proc/{p}/task") if os.path.exists(f"/proc/{p}/task/{t}/children")
                for c in open(f"/proc/{p}/task/{t}/children").read().split()] if os.path.exists(f"/proc/{p}") else []
        found += kids
        todo += kids
    return found


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_torchrun_restart_after_a_killed_worker_resumes(tmp_path):
    """torchrun --max-restarts 1, rank 1 SIGKILLed after a mid-epoch checkpoint: the group restarts, resumes
    (no --resume flag) and ends with the weights of an uninterrupted 2-process run."""
    from test_engine_ddp import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ahbf.engine.cli",
               *TINY, "--checkpoint-every", "2", "-o", str(out), *extra]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    proc, lines = torchrun(tmp_path / "killed"), []
    wait_for_step(proc, 5, lines)  # 4 steps per epoch and rank: mid-epoch 2 after the checkpoint of step 4
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid]
    rank1 = [p for p in workers if _environ(p).get("RANK") == "1"]
    assert rank1, workers
    os.kill(rank1[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(lines)[-2000:] + out[-3000:]
    assert "resumed from" in out
    ref = torchrun(tmp_path / "reference")
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_out[-3000:]
    assert_bitwise(weights(tmp_path / "killed" / "last.pt"), weights(tmp_path / "reference" / "last.pt"))


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def test_mid_epoch_checkpoints_never_replace_an_epoch_snapshot(tmp_path):
    assert train_main([*TINY, "-o", str(tmp_path), "--checkpoint-every", "3", "train.save_every=1"]) == 0
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("epoch_")) == ["epoch_1.pt", "epoch_2.pt"]
    for n in (1, 2):
        ckpt = load_checkpoint(str(tmp_path / f"epoch_{n}.pt"))
        assert (ckpt["epoch"], ckpt["batch"]) == (n, 0)


def test_resume_auto_refuses_a_sibling_run_of_a_sweep(tmp_path, monkeypatch, capsys):
    """Without -o, --resume auto takes the newest runs/<dataset>-<arch>-<method>-* folder: in a sweep that may be
    another seed's or lr's run, which must not be continued (or re-reported) as this one."""
    monkeypatch.chdir(tmp_path)
    assert train_main([*TINY, "--epochs", "1", "--lr", "0.05", "--checkpoint-every", "off"]) == 0
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert train_main([*TINY, "--epochs", "1", "--lr", "0.02", "--seed", "3", "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another run's checkpoint" in err
    assert "optim.lr 0.05 -> 0.02" in err and "train.seed 0 -> 3" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # the run's own command (a requeued job; more epochs extend it) resumes: resolved values are no difference
    assert train_main([*TINY, "--epochs", "2", "--lr", "0.05", "--resume", "auto", "--checkpoint-every", "off"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_a_torchrun_restart_resumes_only_its_own_run(tmp_path, monkeypatch, capsys):
    """A restart (TORCHELASTIC_RESTART_COUNT > 0) continues the folder that this job (run id + agent pid, written
    to .owner) claimed; a folder that attempt 0 refused stays refused: a restart cannot fix that error."""
    other, own = tmp_path / "other", tmp_path / "own"
    assert train_main([*TINY, "-o", str(other), "--epochs", "1"]) == 0  # a finished run of someone else
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # attempt 0 was refused (exit 2), torchrun restarted
    capsys.readouterr()
    assert train_main([*TINY, "-o", str(other), "--epochs", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # this job's attempt 0 ...
    assert train_main([*TINY, "-o", str(own), "--epochs", "2", "--resume", str(other / "last.pt")]) == 0
    assert f"run job7 agent {os.getppid()} on " in (own / ".owner").read_text()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # ... restarted: its own newest checkpoint, not --resume's
    capsys.readouterr()
    assert train_main([*TINY, "-o", str(own), "--epochs", "3", "--resume", str(other / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {own / 'last.pt'}: 2 epochs" in out and f"resumed from {other}" not in out


def test_a_stop_at_an_epochs_last_step_resumes_with_that_epochs_lr(tmp_path, reference, monkeypatch):
    """A checkpoint at the last batch of an epoch resumes into an empty loop: its history row keeps the lr of the
    epoch's last step (was 0.0) and reports no img/s (nan, was 0); the weights are still bitwise those of the
    uninterrupted run."""
    import csv
    import math

    from ahbf.engine.fault import StepControl

    poll = StepControl.poll
    monkeypatch.setattr(StepControl, "poll", lambda self, step: (True, True) if step == 8 else poll(self, step))
    assert train_main([*TINY, "-o", str(tmp_path), "--checkpoint-every", "off"]) == PREEMPTED_EXIT
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (0, 8, 8)
    monkeypatch.setattr(StepControl, "poll", poll)
    assert train_main([*TINY, "-o", str(tmp_path), "--resume", "auto", "--checkpoint-every", "off"]) == 0
    assert_bitwise(weights(tmp_path / "last.pt"), reference)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert 0 < float(rows[0]["lr"]) < float(rows[1]["lr"])  # the 2-epoch warm-up: epoch 1 ends at half the peak
    assert math.isnan(float(rows[0]["img_per_s"])) and float(rows[1]["img_per_s"]) > 0
