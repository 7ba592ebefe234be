"""Checkpoints: ``weights_only`` loads, checksums, rotation, architecture checks, RNG state.

A checkpoint is a dict of tensors and primitive containers only (the config as a plain dict), so it
loads with ``torch.load(..., weights_only=True)``. ``save_checkpoint`` adds the package version and a
SHA-256 of every value (``checksum``), writes a temporary file, flushes it to disk and reads it back before
the rotation (``last.pt`` the newest, ``last.1.pt`` ... the older ones kept, ``train.keep_last``) moves;
``load_checkpoint`` verifies the checksum. A failed write is one ``WriteError`` line.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .. import __version__
from .durable import WriteError, atomic_write, fsync_folder, save_synced, signals_held

SPEC_KEYS = ("arch", "method", "num_classes", "num_branches", "aux", "split")  # split: torchvision / timm only
RESUME_KEYS = ("model", "optim", "epoch", "step", "spec", "history", "rng")
_TEMPORARY = re.compile(r"\.tmp\d*$")


class CheckpointError(ValueError):
    """A missing, unreadable or incompatible checkpoint (reported as one line by the CLI)."""


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


def _tensor_bytes(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def _feed(h, obj: Any) -> None:
    """Every value of ``obj`` into the hash ``h``, with its type, in its order: tensors (dtype, shape, bytes,
    requires_grad), containers (and a state dict's ``_metadata``, which ``load_state_dict`` reads), scalars."""
    kind = type(obj).__name__
    if isinstance(obj, torch.Tensor):
        h.update(f"T{int(obj.requires_grad)}|".encode())
        _tensor_bytes(h, obj)
    elif isinstance(obj, dict):
        h.update(f"{kind}{len(obj)}|".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
        if getattr(obj, "_metadata", None) is not None:
            _feed(h, obj._metadata)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{kind}{len(obj)}|".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"str{len(data)}|".encode() + data)
    else:  # int, float, bool, None, bytes, torch.dtype ...: repr is exact (floats round-trip)
        h.update(f"{kind}:{obj!r}|".encode())


DIGEST = "sha256:"  # the checksum of every value of the checkpoint; a bare 64-digit hex: tensors only (older files)


def checksum(state: dict[str, Any]) -> str:
    """``sha256:`` + SHA-256 of every value of the checkpoint (``checksum`` left out): the metadata a resume reads
    (epoch, batch, step, RNG states, history, config, optimiser settings) as well as every tensor."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"})
    return DIGEST + h.hexdigest()


def _tensor_checksum(state: dict[str, Any]) -> str:
    """The checksum of older files: SHA-256 over the name, dtype, shape and bytes of every tensor only."""
    h = hashlib.sha256()
    for name, t in _tensors({k: v for k, v in state.items() if k != "checksum"}):
        h.update(f"{name}|".encode())
        _tensor_bytes(h, t)
    return h.hexdigest()


def verify(ckpt: dict[str, Any], path: str) -> None:
    """``CheckpointError`` unless ``ckpt`` matches its checksum (a file of this version: every value; of an
    older one, a bare hex digest: its tensors)."""
    stored = ckpt.get("checksum")
    if isinstance(stored, str) and stored.startswith(DIGEST):
        ok = checksum(ckpt) == stored
    elif isinstance(stored, str) and re.fullmatch(r"[0-9a-f]{64}", stored):
        ok = _tensor_checksum(ckpt) == stored
    else:
        raise CheckpointError(f"checkpoint {path} is corrupt: it has no readable checksum")
    if not ok:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match its checksum")


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


def save_checkpoint(state: dict[str, Any], path: str, keep_last: int = 1, corrupt: Iterable[str] = ()) -> None:
    """Write ``state`` (with its checksum and the package version) to ``path``, keeping ``keep_last`` files in
    all (``path``, ``<path>.1`` ...). The new file is written to a temporary name, flushed to disk and read back
    (its checksum verified) before any older file moves or goes: a failed write (``WriteError``)
    leaves every checkpoint as it was. ``corrupt``: files of the rotation known to be damaged (a resume fell
    back past them); they are never kept in place of a good one, and are deleted once the new file is in place."""
    state = {**state, "version": __version__}
    state["checksum"] = checksum(state)
    tmp = atomic_write(path, lambda t: _write_verified(state, t, path), keep=True)
    try:
        with signals_held():  # a second Ctrl-C now would leave the verified file unnamed
            _rotate(path, keep_last, corrupt)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_folder(path)


def _write_verified(state: dict[str, Any], tmp: str, path: str) -> None:
    save_synced(state, tmp)
    try:
        verify(torch.load(tmp, map_location="cpu", weights_only=True), tmp)
    except Exception as err:  # noqa: BLE001 - whatever went wrong, this file must not replace a good one
        raise WriteError(f"cannot write {path}: the file read back is not what was written "
                                   f"({' '.join(str(err).split())})") from None


def _rotate(path: str, keep: int, corrupt: Iterable[str]) -> None:
    """Make room for the new ``path``: the ``keep - 1`` newest files of the rotation not known to be corrupt move
    to ``path.1``, ``path.2`` ... (keeping their order); every other file of the rotation but ``path`` is deleted.
    A file moves one place up or to a lower place (over deleted ones); the moves down in increasing order, then
    those up in decreasing order, never overwrite a file that has still to move."""
    bad = {os.path.abspath(p) for p in corrupt}
    chain = _chain(path)
    kept = [(i, p) for i, p in chain if os.path.abspath(p) not in bad][:max(keep - 1, 0)]
    moves = [(i, j, p) for j, (i, p) in enumerate(kept, start=1)]
    for i, j, p in [m for m in moves if m[0] > m[1]] + [m for m in reversed(moves) if m[0] < m[1]]:
        os.replace(p, older(path, j))
    for i, p in chain:
        if 0 < i and not 0 < i <= len(kept) and os.path.exists(p):  # beyond the kept ones, or a corrupt one
            os.remove(p)


def remove_temporaries(folder: str) -> list[str]:
    """Delete the ``*.tmp<pid>`` files a killed run left behind (call while holding the folder's lock)."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if _TEMPORARY.search(name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load on the CPU with ``weights_only=True``; check that it is an ahbf training checkpoint and that it
    matches its checksum (``verify``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means "not a readable checkpoint"
        raise CheckpointError(f"cannot read checkpoint {path}: {_unreadable(err)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "spec" not in ckpt:
        raise CheckpointError(f"{path} is not an ahbf-train checkpoint (no 'model' and 'spec' entries)")
    verify(ckpt, path)
    return ckpt


def _unreadable(err: Exception) -> str:
    """Why torch.load failed, in words: a refused object (a pickle that would run code) or a damaged file; never
    torch's advice to load the file unsafely."""
    reason = " ".join(str(err).split())
    if reason.startswith("Weights only load failed"):
        for marker in ("trusted source.", "compatible with your use case:", "WeightsUnpickler error:"):
            reason = reason.split(marker)[-1]
        reason = reason.split(" Check the documentation")[0].split(" Please file an issue")[0].strip()
        if "GLOBAL" in reason:  # a pickle naming a function or class: what a malicious file does
            return f"refused by the weights-only unpickler: it holds an object other than tensors and plain values ({reason})"
    else:
        reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    return f"the file is damaged or was not written by torch.save ({reason[:200]})"


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


def _chain(path: str) -> list[tuple[int, str]]:
    """(i, file) of ``path`` (i = 0, e.g. last.pt) and its older copies last.1.pt, last.2.pt ... that exist, in
    order."""
    folder, name = os.path.split(path)
    root, ext = os.path.splitext(name)
    pattern = re.compile(rf"^{re.escape(root)}\.(\d+){re.escape(ext)}$")
    found = sorted((int(m.group(1)), f) for f in (os.listdir(folder or ".") if os.path.isdir(folder or ".") else [])
                   if (m := pattern.match(f)))
    return ([(0, path)] if os.path.isfile(path) else []) + [(i, os.path.join(folder, f)) for i, f in found if i > 0]


def newest_first(path: str) -> list[str]:
    """``path`` (e.g. last.pt) and its older copies last.1.pt, last.2.pt ... that exist, newest first."""
    return [p for _, p in _chain(path)]
