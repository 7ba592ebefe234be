"""Checkpoints: atomic writes, ``weights_only`` loads, checksums, rotation, architecture checks, RNG state.

A checkpoint is a dict of tensors and primitive containers only (the config as a plain dict), so it
loads with ``torch.load(..., weights_only=True)``. ``save_checkpoint`` adds a SHA-256 of every tensor
(``checksum``) and the package version; ``load_checkpoint`` verifies the checksum. ``last.pt`` is the
newest checkpoint, ``last.1.pt`` ... the older ones kept (``train.keep_last``).
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import __version__

SPEC_KEYS = ("arch", "method", "num_classes", "num_branches", "aux", "split")  # split: torchvision / timm only
RESUME_KEYS = ("model", "optim", "epoch", "step", "spec", "history", "rng")
_TEMPORARY = re.compile(r"\.tmp\d*$")


class CheckpointError(ValueError):
    """A missing, unreadable or incompatible checkpoint (reported as one line by the CLI)."""


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file in the same folder, then ``os.replace``: a reader (or a crash) never
    sees a half-written file; the temporary file never outlives a failure."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_synced(obj: Any, tmp: str) -> None:
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` (flushed to disk) that a reader or a crash never sees half-written."""
    _atomic_write(path, lambda tmp: _save_synced(obj, tmp))


def atomic_copy(src: str, dst: str) -> None:
    _atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in nested dicts / lists, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 over the name, dtype, shape and bytes of every tensor of the checkpoint (``checksum`` left out)."""
    h = hashlib.sha256()
    for name, t in _tensors({k: v for k, v in state.items() if k != "checksum"}):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def non_finite(state: Any) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or inf (one blocking copy per device: a
    ``non_blocking`` device-to-host copy could be read before it is filled)."""
    named = [(n, t) for n, t in _tensors(state) if t.is_floating_point() and t.numel()]
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for n, t in named:
        by_device.setdefault(t.device, []).append((n, t))
    bad = set()
    for group in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in group]).cpu().tolist()
        bad.update(n for (n, _), ok in zip(group, finite) if not ok)
    return [n for n, _ in named if n in bad]


def older(path: str, i: int) -> str:
    """``last.pt`` -> ``last.<i>.pt`` (``i`` = 0: the path itself)."""
    root, ext = os.path.splitext(path)
    return path if i == 0 else f"{root}.{i}{ext}"


def save_checkpoint(state: dict[str, Any], path: str, keep_last: int = 1) -> None:
    """Write ``state`` (with its checksum and the package version) to ``path`` atomically, after moving the
    previous ``path`` to ``<path>.1`` ... (``keep_last`` files in all; each move is one atomic rename)."""
    state = {**state, "version": __version__}
    state["checksum"] = checksum(state)
    for i in range(keep_last - 1, 0, -1):
        if os.path.exists(older(path, i - 1)):
            os.replace(older(path, i - 1), older(path, i))
    i = keep_last
    while os.path.exists(older(path, i)):  # beyond keep_last (a resumed run may keep fewer)
        os.remove(older(path, i))
        i += 1
    atomic_save(state, path)


def remove_temporaries(folder: str) -> list[str]:
    """Delete the ``*.tmp<pid>`` files a killed run left behind (call while holding the folder's lock)."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if _TEMPORARY.search(name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load on the CPU with ``weights_only=True``; check that it is an ahbf training checkpoint and that its
    tensors match its checksum (files written before checksums existed are not checked)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means "not a readable checkpoint"
        reason = " ".join(str(err).split()) or type(err).__name__
        if reason.startswith("Weights only load failed"):  # keep torch's reason, drop its advice to load unsafely
            for marker in ("trusted source.", "compatible with your use case:", "WeightsUnpickler error:"):
                reason = reason.split(marker)[-1]
            reason = "refused by the weights-only unpickler: " + reason.split(" Check the documentation")[0].strip()
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "spec" not in ckpt:
        raise CheckpointError(f"{path} is not an ahbf-train checkpoint (no 'model' and 'spec' entries)")
    if "checksum" in ckpt and checksum(ckpt) != ckpt["checksum"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match its checksum")
    return ckpt


def check_resumable(ckpt: dict[str, Any], path: str) -> None:
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot resume a run: no {', '.join(repr(k) for k in missing)} "
                              "entries (it is not a training checkpoint of ahbf-train)")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """``model.load_state_dict(state)`` after checking names and shapes: one line naming what does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)]
    problems = [f"{len(v)} {what} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                for what, v in (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped)) if v]
    if problems:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model: {'; '.join(problems)} tensors")
    model.load_state_dict(state)


def describe(spec: dict[str, Any]) -> str:
    m = spec.get("method")
    shape = "" if m == "baseline" else f", {spec.get('num_branches')} branches, aux {spec.get('aux')}"
    split = f" split at {spec['split']}" if spec.get("split") else ""
    return f"{spec.get('arch')}{split} ({m}{shape}) with {spec.get('num_classes')} classes"


class ModelMismatchError(CheckpointError):
    """A readable checkpoint of another model or run: a configuration error, not a damaged file (no fallback)."""


def check_spec(found: dict[str, Any], expected: dict[str, Any], path: str) -> None:
    """One-line ``ModelMismatchError`` naming both models when a checkpoint belongs to another model."""
    if any(found.get(k) != expected.get(k) for k in SPEC_KEYS):
        raise ModelMismatchError(f"checkpoint {path} holds {describe(found)}, but this run builds {describe(expected)}")


# what a resume may change: where the data lives, how it is loaded, which kernels run. Every other value of these
# sections, and train.seed, says which run this is (train.epochs may grow: a resume can extend a run)
RUN_SECTIONS = ("data", "model", "objective", "optim", "schedule")
MAY_CHANGE = {"data.root", "data.backend", "data.workers", "data.eval_batch_size", "data.download",
              "data.skip_bad_images", "data.check_images", "optim.impl", "objective.backend"}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for each value that defines the run and differs (values this run resolves
    later, ``auto`` and ``data.image_size`` 0, are not compared; neither are keys one side lacks)."""
    changes = []
    for key in [f"{s}.{k}" for s in RUN_SECTIONS for k in current.get(s, {})] + ["train.seed"]:
        section, name = key.split(".")
        if key in MAY_CHANGE or name not in saved.get(section, {}) or name not in current.get(section, {}):
            continue
        old, new = saved[section][name], current[section][name]
        if key == "objective.rampup" and _same_fraction_of_epochs(saved, current):
            continue  # rampup auto is a fraction of train.epochs, which may grow: it grows with them
        if new != "auto" and not (key == "data.image_size" and not new) and old != new:
            changes.append(f"{key} {old!r} -> {new!r}")
    return changes


def _same_fraction_of_epochs(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    try:
        (r0, e0), (r1, e1) = ((float(c["objective"]["rampup"]), float(c["train"]["epochs"])) for c in (saved, current))
    except (KeyError, TypeError, ValueError):
        return False
    return e0 > 0 and e1 > 0 and abs(r0 / e0 - r1 / e1) <= 1e-6 * max(1.0, r1 / e1)


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The CPU and Python RNG states, and ``device``'s if it is a GPU (this rank's only: a resume may see fewer
    GPUs; ``device`` itself, not the current one: ``--device cuda:1`` without ``set_device``)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu") -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.device(device).type == "cuda":
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda, device)  # older: all devices


def newest_first(path: str) -> list[str]:
    """``path`` (e.g. last.pt) and its older copies last.1.pt, last.2.pt ... that exist, newest first."""
    folder, name = os.path.split(path)
    root, ext = os.path.splitext(name)
    pattern = re.compile(rf"^{re.escape(root)}\.(\d+){re.escape(ext)}$")
    found = sorted((int(m.group(1)), f) for f in (os.listdir(folder or ".") if os.path.isdir(folder or ".") else [])
                   if (m := pattern.match(f)))
    return ([path] if os.path.isfile(path) else []) + [os.path.join(folder, f) for _, f in found]
