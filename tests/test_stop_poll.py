"""``train.stop_poll_every=k``: under DDP the ranks agree on stop / timed checkpoint every k-th step only, a
step-interval checkpoint still at its exact step, and a SIGTERM to one rank still stops every rank at one step."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from ahbf.engine import fault
from ahbf.engine.checkpoint import load_checkpoint
from ahbf.engine.fault import PREEMPTED_EXIT, StepControl, StopSignals
from test_engine_ddp import free_port
from test_engine_fault import TINY, _environ, _parent, wait_for_step


def test_polls_every_kth_step_and_at_every_due_checkpoint(monkeypatch):
    calls = []
    monkeypatch.setattr(fault, "is_distributed", lambda: True)
    monkeypatch.setattr(fault, "any_rank", lambda *flags: calls.append(flags) or [bool(f) for f in flags])
    signals = StopSignals()
    try:
        control = StepControl("4", signals, poll_every=3)
        got = {s: control.poll(s) for s in range(1, 13)}
        assert len(calls) == 6  # steps 3, 4, 6, 8, 9, 12
        assert [s for s, (_, save) in got.items() if save] == [4, 8, 12]  # the checkpoint steps, exactly
        signals.received = signal.SIGTERM  # arrives after step 12: acted on at step 15, the next poll
        assert [control.poll(s) for s in (13, 14, 15)] == [(False, False), (False, False), (True, True)]
    finally:
        signals.restore()
    monkeypatch.setattr(fault, "is_distributed", lambda: False)
    assert StepControl("off", StopSignals(), poll_every=5).poll_every == 1  # one process: no all-reduce to save


def test_sigterm_to_one_rank_with_poll_every_3_stops_all_ranks_at_one_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ahbf.engine.cli", *TINY, "--epochs", "4",
           "--checkpoint-every", "off", "train.stop_poll_every=3", "-o", str(tmp_path)]
    proc, lines = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   start_new_session=True), []
    try:
        wait_for_step(proc, 2, lines)
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == proc.pid]
        rank1 = [p for p in workers if _environ(p).get("RANK") == "1"]
        assert rank1, workers
        os.kill(rank1[0], signal.SIGTERM)  # one rank only: the other learns it at the next agreement
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    text = "".join(lines) + out
    steps = [int(s) for s in re.findall(r"stopped by .*? after step (\d+);", text)]
    assert len(steps) == 2 and steps[0] == steps[1], text[-3000:]  # both ranks, the same step
    assert steps[0] % 3 == 0 and steps[0] >= 3, steps
    assert "stopped by SIGTERM" in text and "stopped by a signal on another rank" in text
    assert f"exitcode: {PREEMPTED_EXIT}" in text and proc.returncode != 0  # each worker exits 75; torchrun fails
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["step"] == steps[0]
