"""The run folder: one per run under ``runs/``, named from its config, and a ``runs/latest`` link.

``--name NAME`` means ``runs/NAME`` (it wins over ``train.output``, so ``-c <run>/config.yaml --name again``
repeats a run into a new folder); ``-o PATH`` is used as given; otherwise
``runs/<dataset>-<arch>-<method>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3`` ... if taken). Under torchrun the
suffix is the rendezvous id (``TORCHELASTIC_RUN_ID``) instead of the time, so every rank and every
elastic restart resolves the same folder without a broadcast. ``--resume auto`` without a folder
continues the newest folder of the same ``<dataset>-<arch>-<method>``, if there is one (a requeued job).
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from typing import Callable, Mapping

from .checkpoint import newest_first, remove_temporaries
from .distributed import DistEnv, all_gather, any_rank
from .durable import write_text

RUNS = "runs"


def auto_stem(cfg) -> str:
    """``<dataset>-<arch>-<method>``: what the run is, without its suffix."""
    # torchvision:x -> torchvision-x; a user's method mypkg.mod:M -> mypkg.mod-M
    return f"{cfg.data.dataset}-{cfg.model.arch.replace(':', '-')}-{cfg.model.method.replace(':', '-')}"


def resolve_output(cfg, env_vars: Mapping[str, str] = os.environ, now: float | None = None,
                   create: bool = False) -> str:
    """The output folder of a run (a function of the config, the environment, the clock and the folders there).
    ``create``: make a time-suffixed folder with ``os.mkdir`` while choosing it, so that runs started in the same
    second (a job array) each get their own."""
    t = cfg.train
    if t.name:
        return os.path.join(RUNS, t.name)
    if t.output:
        return t.output
    run_id = env_vars.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":  # torchrun: the same id on every rank and across restarts
        return os.path.join(RUNS, f"{auto_stem(cfg)}-{run_id}")
    if t.resume == "auto" and (newest := newest_run(auto_stem(cfg))):
        return newest
    base = os.path.join(RUNS, f"{auto_stem(cfg)}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")
    if create:
        os.makedirs(RUNS, exist_ok=True)
    path, n = base, 1
    while not _take(path, create):
        n += 1
        path = f"{base}-{n}"
    return path


def _take(path: str, create: bool) -> bool:
    """Whether ``path`` is free; with ``create``, claim it (``os.mkdir`` is atomic: of several runs started in
    the same second, exactly one gets each name)."""
    if not create:
        return not os.path.exists(path)
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False


def newest_run(stem: str) -> str:
    """The most recently written folder ``runs/<stem>-*``, or ""."""
    try:
        names = [n for n in os.listdir(RUNS) if n.startswith(stem + "-")]
    except OSError:
        return ""
    folders = [os.path.join(RUNS, n) for n in names if os.path.isdir(os.path.join(RUNS, n))]
    return max(folders, key=os.path.getmtime, default="")


def shared_output(cfg, env_vars: Mapping[str, str] = os.environ) -> str:
    """``resolve_output`` on every rank; where the name has a time suffix (no torchrun run id), rank 0's
    choice is broadcast so that every rank writes to the same folder."""
    import torch.distributed as dist

    shared = dist.is_initialized() and dist.get_world_size() > 1
    path = resolve_output(cfg, env_vars, create=not shared or dist.get_rank() == 0)
    if not (cfg.train.output or cfg.train.name) and shared:
        shared = [path]
        dist.broadcast_object_list(shared, src=0)
        path = shared[0]
    return path


def discard_if_empty(path: str) -> None:
    """Remove an auto-named run folder that a failed start left empty."""
    try:
        os.rmdir(path)  # only succeeds on an empty folder
    except OSError:
        pass


def is_named_folder(cfg) -> bool:
    """A folder named with ``--name`` or chosen automatically (not given with ``-o``): ``runs/latest`` points at
    it. Read from the config before ``resolve`` (which records the folder as ``train.output``)."""
    return bool(cfg.train.name) or not cfg.train.output


def link_latest(output: str) -> str | None:
    """Point ``<parent of output>/latest`` at ``output`` (relative link); silently nothing where links are impossible.
    Returns what the link pointed at before ("" for no link; None: not linked), for ``restore_latest``."""
    parent, name = os.path.split(os.path.normpath(output))
    if not name or name == "latest":
        return None
    link = os.path.join(parent, "latest")
    if os.path.lexists(link) and not os.path.islink(link):
        return None  # a real file or folder named latest: leave it alone
    previous = os.readlink(link) if os.path.islink(link) else ""
    return previous if _point(link, name) else None


def restore_latest(output: str, previous: str | None) -> None:
    """A run that failed does not stay ``runs/latest``: the link points back at ``previous`` (or is removed)."""
    if previous is None:
        return
    parent, name = os.path.split(os.path.normpath(output))
    link = os.path.join(parent, "latest")
    if not (os.path.islink(link) and os.readlink(link) == name):
        return  # another run has taken the link since
    if previous:
        _point(link, previous)
    else:
        try:
            os.unlink(link)
        except OSError:
            pass


def _point(link: str, target: str) -> bool:
    tmp = f"{link}.tmp{os.getpid()}"
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def continued_run(path: str) -> tuple[str, str, str]:
    """``--resume PATH`` without ``-o`` / ``--name``: continue the run PATH belongs to, in its own folder.
    PATH is a run folder (its newest usable checkpoint, as ``--resume auto``) or a checkpoint file in one.
    Returns (the folder, the ``train.resume`` value, the file that records the run's config)."""
    if os.path.isdir(path):
        folder, resume = path, "auto"
    elif os.path.isfile(path):
        folder, resume = os.path.dirname(path) or ".", path
    else:
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file or run folder")
    recorded = os.path.join(folder, "config.yaml")
    if os.path.isfile(recorded):
        return folder, resume, recorded
    if resume == "auto":
        raise FileNotFoundError(f"--resume {path}: not a run folder (no config.yaml; ahbf-train writes one into "
                                "every run folder); give a checkpoint file, or -o with the settings to use")
    return folder, resume, ""  # a checkpoint outside a run folder: its own stored config


# ------------------------------------------------------------------ ownership: claim, lock, torchrun job
_RUN_FILES = r"last(\.\d+)?\.pt|best\.pt|epoch_\d+\.pt|results\.json|metrics\.csv"
RUN_FILES = re.compile(rf"^({_RUN_FILES})$")  # a folder holding one of these holds a run
CLEARED_ON_OVERWRITE = re.compile(rf"^({_RUN_FILES}|curves\.png|config\.yaml)$")


class RunFolderError(ValueError):
    """The output folder holds another run, or another live run writes to it (one line from the CLI)."""


OWNER = ".owner"  # the torchrun job that claimed the folder: a restart of that job (and only it) continues the run


def job_id() -> str:
    """This process's torchrun job: rendezvous id, host and the agent's pid (a worker's parent, alive across
    restarts); "" outside torchrun."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"run {run_id} agent {os.getppid()} on {os.uname().nodename}" if run_id else ""


def owned_by_this_job(folder: str) -> bool:
    """Whether ``folder`` was claimed by this torchrun job (any of its nodes' agents), e.g. by attempt 0."""
    try:
        with open(os.path.join(folder, OWNER)) as f:
            return bool(job_id()) and job_id() in f.read().splitlines()
    except OSError:
        return False


def run_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if RUN_FILES.match(f)) if os.path.isdir(folder) else []


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` (non-blocking), naming the holder's pid and host. The file is
    removed on release; a holder checks after locking that the path is still its file (a release in between)."""

    def __init__(self, folder: str):
        self.path, self.fd, self.warning = os.path.join(folder, ".lock"), None, ""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # no flock here (e.g. Lustre noflock)
                    os.close(fd)
                    self.warning = (f"warning: cannot lock {self.path} ({os.strerror(err.errno)}); nothing stops a "
                                    "second run from sharing this folder")
                    return
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunFolderError(f"{folder} is in use by a live run ({holder}); wait for it to end or choose "
                                     "another output folder") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder removed the file we locked: lock the new one
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.remove(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()


def claim_folder(folder: str, *, resume: bool, overwrite: bool, owners: list[str] = ()) -> tuple[FolderLock, list[str]]:
    """Lock ``folder`` for this run. A folder holding a run is refused (and left untouched) unless this run
    resumes it, or ``overwrite`` deletes that run's files. ``owners``: the torchrun job's ``job_id`` on every
    node, written to ``.owner`` once claimed. Returns (lock, notes for the log)."""
    found = run_files(folder)
    if found and not resume and not overwrite:
        raise RunFolderError(f"{folder} already holds a run ({', '.join(found[:4])}); continue it with --resume auto, "
                             "start afresh there with --overwrite (deletes its checkpoints), or choose another -o")
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the folder, or a folder above it, is a file
        path = os.path.abspath(folder)
        while os.path.dirname(path) != path and not os.path.isfile(path):
            path = os.path.dirname(path)
        raise RunFolderError(f"cannot use {folder} as the output folder: {path} is a file, not a folder; choose "
                             "another -o") from None
    lock = FolderLock(folder)
    notes = [lock.warning] if lock.warning else []
    if overwrite and not resume:
        cleared = [f for f in sorted(os.listdir(folder)) if CLEARED_ON_OVERWRITE.match(f)]
        for f in cleared:
            os.remove(os.path.join(folder, f))
        if cleared:
            notes.append(f"--overwrite: deleted the previous run's {', '.join(cleared)}")
    if any(owners):
        with open(os.path.join(folder, OWNER), "w") as f:
            f.write("".join(f"{o}\n" for o in sorted(set(owners))))
    stale = remove_temporaries(folder)
    if stale:
        notes.append(f"removed {len(stale)} temporary file(s) of an interrupted write: {', '.join(stale)}")
    return lock, notes


def restart_resume(output: str, given: str, env: DistEnv) -> str:
    """A torchrun restart continues its own run from the run folder's newest checkpoint, where this job
    claimed the folder (``.owner``) and wrote one; otherwise what the command says, so a folder attempt 0
    refused stays refused, and an explicit ``--resume PATH`` is used only until the run has its own."""
    ours = env.is_main and owned_by_this_job(output) and bool(newest_first(os.path.join(output, "last.pt")))
    (ours,) = any_rank(ours)
    return "auto" if ours else given


class RunFolder:
    """The one owner of a run's folder: the claim (lock, ``.owner``, refusal of another run's folder), paths,
    ``config.yaml``, the ``runs/latest`` link (undone if the run fails) and the release. Checkpoints written into
    it are ``RunState``'s."""

    def __init__(self, output: str, env: DistEnv, info: Callable[[str], None] = print):
        self.output, self.env, self.info = output, env, info
        self.lock: FolderLock | None = None
        self.previous_latest: str | None = None  # what runs/latest pointed at before this run (None: untouched)

    def path(self, name: str) -> str:
        return os.path.join(self.output, name)

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Rank 0 locks the folder (refusing one that holds another run); every rank learns the outcome."""
        error, notes = None, []
        owners = all_gather(job_id())  # the torchrun job's agents on every node: a restart of this job may resume
        if self.env.is_main:
            try:
                self.lock, notes = claim_folder(self.output, resume=resume, overwrite=overwrite, owners=owners)
            except (RunFolderError, OSError) as err:
                error = err
        (failed,) = any_rank(error is not None)
        if error is not None:
            raise error
        if failed:
            raise RunFolderError(f"rank 0 refused the output folder {self.output} (its error says why)")
        for note in notes:
            self.info(note)

    def write_config(self, text: str, link: bool) -> None:
        """Rank 0: ``config.yaml`` and, for a folder named with --name or automatically, ``runs/latest``."""
        if self.env.is_main:
            os.makedirs(self.output, exist_ok=True)
            write_text(self.path("config.yaml"), text)  # --resume <run folder> reads it back
            if link:
                self.previous_latest = link_latest(self.output)

    def undo_latest(self) -> None:
        """A run that failed does not stay ``runs/latest`` (rank 0)."""
        if self.env.is_main:
            restore_latest(self.output, self.previous_latest)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
