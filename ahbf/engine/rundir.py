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
    return f"{cfg.data.dataset}-{cfg.model.arch}-{cfg.model.method}"


def resolve_output(cfg, env_vars: Mapping[str, str] = os.environ, now: float | None = None) -> str:
    """The output folder of a run (a pure function of the config, the environment and the clock)."""
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
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


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
    path = resolve_output(cfg, env_vars)
    import torch.distributed as dist

    if not (cfg.train.output or cfg.train.name) and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [path]
        dist.broadcast_object_list(shared, src=0)
        path = shared[0]
    return path


def link_latest(output: str) -> None:
    """Point ``<parent of output>/latest`` at ``output`` (relative link); silently nothing where links are impossible."""
    parent, name = os.path.split(os.path.normpath(output))
    if not name or name == "latest":
        return
    link = os.path.join(parent, "latest")
    tmp = f"{link}.tmp{os.getpid()}"
    try:
        if os.path.lexists(link) and not os.path.islink(link):
            return  # a real file or folder named latest: leave it alone
        os.symlink(name, tmp)
        os.replace(tmp, link)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
