"""Surviving a cluster: preemption signals, per-step agreement on stopping / checkpointing, exit statuses.

- ``StopSignals``: SIGTERM / SIGINT / SIGUSR1 set a flag (a second Ctrl-C stops the run at once; repeated
  SIGTERM / SIGUSR1 are ignored);
  the trainer finishes its step, all ranks agree on that step, rank 0 writes ``last.pt``, and the process
  exits with ``PREEMPTED_EXIT``.
- ``watch_agent``: a torchrun worker ends, with one line, when its agent dies.
- the exit statuses a job script acts on (docs/fault-tolerance.md).
"""
from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
import time
from typing import Any

from .checks import parse_interval
from .distributed import any_rank, is_distributed

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; a checkpoint of the last finished step is on disk
NONFINITE_EXIT = 3
WRITE_FAILED_EXIT = 74  # EX_IOERR: a checkpoint (or another output file) could not be written: disk full, quota,
#                         file size limit, I/O error; the previous checkpoints are intact. Requeueing will not help
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
PEERS_LOST_EXIT = 69  # EX_UNAVAILABLE: another rank or node did not join in time, or died (torchrun restarts it)
AGENT_LOST_EXIT = 70  # this worker's torchrun agent died: the worker ends too (no one would restart or reap it)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)



class Preempted(Exception):
    """A stop signal arrived; the checkpoint of ``step`` is written. The CLI exits with ``PREEMPTED_EXIT``."""

    def __init__(self, signame: str, step: int, path: str):
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {path} written; continue with "
                         "--resume auto (the same command)")


class StopSignals:
    """Records the first of ``SIGNALS``; after it SIGINT's handler is restored, so a second Ctrl-C acts at once
    (KeyboardInterrupt), while repeats of SIGTERM / SIGUSR1 are ignored: under SLURM + torchrun a worker gets
    SLURM's SIGTERM and torchrun's forwarded one milliseconds apart, and must still write its checkpoint.
    Only the main thread can install handlers."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        if signal.SIGINT in self._previous:  # a second Ctrl-C acts at once (KeyboardInterrupt)
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


_AGENT: dict[str, Any] = {"lock": threading.Lock()}  # this worker's torchrun agent (pid), once watched


def agent_died() -> bool:
    """Whether this worker's torchrun agent (its parent when ``watch_agent`` started) is gone."""
    return "pid" in _AGENT and os.getppid() != _AGENT["pid"]


def end_orphan() -> None:
    """One line, then exit ``AGENT_LOST_EXIT`` at once (said once, by whichever thread sees the death first)."""
    with _AGENT["lock"]:
        print(f"ahbf-train: rank {os.environ.get('RANK', '?')}: its torchrun agent (pid {_AGENT['pid']}) died; this "
              "worker stops too, without a checkpoint (continue the run with --resume auto)", file=sys.stderr, flush=True)
        os._exit(AGENT_LOST_EXIT)


def watch_agent(interval_s: float = 0.2) -> None:
    """Under torchrun: a daemon thread that ends this worker (``end_orphan``) within ``interval_s`` of its agent's
    death (its parent: a SIGKILLed or OOM-killed agent would leave it training as an orphan, and the other
    nodes waiting). A thread, not PR_SET_PDEATHSIG, so that it can say why, and it acts even while the main
    thread waits in a collective."""
    if not os.environ.get("TORCHELASTIC_RUN_ID") or "pid" in _AGENT:  # not under torchrun, or watched already
        return
    _AGENT["pid"] = os.getppid()

    def watch() -> None:
        while not agent_died():
            time.sleep(interval_s)
        end_orphan()

    threading.Thread(target=watch, name="ahbf-agent-watch", daemon=True).start()


def restart_count() -> int:
    """torchrun's restart number of this worker group (0 on the first attempt and outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


class StepControl:
    """After each step: ``(stop, save)``, the same on every rank. ``stop``: a stop signal reached any rank;
    ``save``: ``train.checkpoint_every`` is due (every N steps, or N minutes since the last save on any rank's
    clock) or ``stop``. Under DDP the ranks agree with one tiny CPU all-reduce, at every ``poll_every``-th step
    and at every step a step-interval checkpoint is due (the same steps on every rank); a signal or a due time
    in between is acted on at the next such step. Nothing to agree on without DDP."""

    def __init__(self, every: str, signals: StopSignals, poll_every: int = 1):
        self.unit, self.value = parse_interval(every)
        self.signals, self.last = signals, time.monotonic()
        self.poll_every = max(1, int(poll_every)) if is_distributed() else 1  # alone: the flags cost nothing

    def poll(self, step: int) -> tuple[bool, bool]:
        due = self.unit == "steps" and step % int(self.value) == 0
        if step % self.poll_every and not due:
            return False, False
        timed = self.unit == "minutes" and time.monotonic() - self.last >= self.value * 60
        stop, timed = any_rank(self.signals.received is not None, timed)
        return stop, stop or timed or due

    def saved(self) -> None:
        self.last = time.monotonic()
