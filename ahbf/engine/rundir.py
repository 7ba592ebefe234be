"""The run folder: one per run under ``runs/``, named from its config, and a ``runs/latest`` link.

``--name NAME`` means ``runs/NAME`` (it wins over ``train.output``, so ``-c <run>/config.yaml --name again``
repeats a run into a new folder); ``-o PATH`` is used as given; otherwise
``runs/<dataset>-<arch>-<method>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3`` ... if taken). Under torchrun the
suffix is the rendezvous id (``TORCHELASTIC_RUN_ID``) instead of the time, so every rank and every
elastic restart resolves the same folder without a broadcast. ``--resume auto`` without a folder
continues the newest folder of the same ``<dataset>-<arch>-<method>``, if there is one (a requeued job).
"""
from __future__ import annotations

import os
import time
from typing import Mapping

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
