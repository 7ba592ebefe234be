"""Surviving a cluster: preemption signals, the run folder's lock, and DataLoader workers that die with
their trainer.

- ``StopSignals``: SIGTERM / SIGINT / SIGUSR1 set a flag (a second one acts as usual: the run dies at once);
  the trainer finishes its step, all ranks agree on that step, rank 0 writes ``last.pt``, and the process
  exits with ``PREEMPTED_EXIT``.
- ``claim_folder``: refuses a folder that holds another run unless it is resumed or ``--overwrite`` is given,
  and holds an ``flock`` on ``<folder>/.lock`` for the run's life (the kernel drops it when the process dies,
  so a killed run never leaves a stale lock).
- ``watch_trainer``: a DataLoader ``worker_init_fn`` that ends the worker when the trainer is gone (SIGKILL
  included): workers are children of the fork server, not of the trainer, so they cannot rely on their parent.
"""
from __future__ import annotations

import fcntl
import os
import re
import signal
import threading
import time
from typing import Any

from .checkpoint import remove_temporaries

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; a checkpoint of the last finished step is on disk
NONFINITE_EXIT = 3
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
RUN_FILES = re.compile(r"^(last(\.\d+)?\.pt|best\.pt|epoch_\d+\.pt|results\.json|metrics\.csv)$")
CLEARED_ON_OVERWRITE = re.compile(r"^(last(\.\d+)?\.pt|best\.pt|epoch_\d+\.pt|results\.json|metrics\.csv|"
                                  r"curves\.png|config\.yaml)$")


class RunFolderError(ValueError):
    """The output folder holds another run, or another live run writes to it (one line from the CLI)."""


class Preempted(Exception):
    """A stop signal arrived; the checkpoint of ``step`` is written. The CLI exits with ``PREEMPTED_EXIT``."""

    def __init__(self, signame: str, step: int, path: str):
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {path} written; continue with "
                         "--resume auto (the same command)")


class StopSignals:
    """Records the first of ``SIGNALS``; the handlers are restored after it, so a second signal acts as usual
    (SIGINT: KeyboardInterrupt, SIGTERM: the process dies). Only the main thread can install handlers."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        self.restore()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def restart_count() -> int:
    """torchrun's restart number of this worker group (0 on the first attempt and outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def run_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if RUN_FILES.match(f)) if os.path.isdir(folder) else []


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` (non-blocking); the file names the holder's pid and host."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise RunFolderError(f"{folder} is in use by a live run ({holder}); wait for it to end or choose "
                                 "another output folder") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (removing it would race a newcomer)
            self.fd = None


def claim_folder(folder: str, *, resume: bool, overwrite: bool) -> tuple[FolderLock, list[str]]:
    """Lock ``folder`` for this run. A folder holding a run is refused (and left untouched) unless this run
    resumes it, or ``overwrite`` deletes that run's files. Returns (lock, notes for the log)."""
    found = run_files(folder)
    if found and not resume and not overwrite:
        raise RunFolderError(f"{folder} already holds a run ({', '.join(found[:4])}); continue it with --resume auto, "
                             "start afresh there with --overwrite (deletes its checkpoints), or choose another -o")
    os.makedirs(folder, exist_ok=True)
    lock = FolderLock(folder)
    notes = []
    if overwrite and not resume:
        cleared = [f for f in sorted(os.listdir(folder)) if CLEARED_ON_OVERWRITE.match(f)]
        for f in cleared:
            os.remove(os.path.join(folder, f))
        if cleared:
            notes.append(f"--overwrite: deleted the previous run's {', '.join(cleared)}")
    stale = remove_temporaries(folder)
    if stale:
        notes.append(f"removed {len(stale)} temporary file(s) of an interrupted write: {', '.join(stale)}")
    return lock, notes


def _watch(pid: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:  # a pid reused by another user's process: the trainer is gone
            os._exit(0)


class watch_trainer:
    """``worker_init_fn`` for DataLoader workers: a daemon thread ends the worker within ``interval`` s once the
    trainer (``pid``) is gone. A class, not a closure, so that it pickles for the fork server."""

    def __init__(self, pid: int | None = None, interval: float = 1.0):
        self.pid, self.interval = pid or os.getpid(), interval

    def __call__(self, worker_id: int) -> None:
        threading.Thread(target=_watch, args=(self.pid, self.interval), daemon=True, name="watch-trainer").start()
