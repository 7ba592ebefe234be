"""Checkpoints: atomic writes, ``weights_only`` loads, architecture checks, RNG state.

A checkpoint is a dict of tensors and primitive containers only (the config as a plain dict), so it
loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Any

import torch

SPEC_KEYS = ("arch", "method", "num_classes", "num_branches", "aux")


class CheckpointError(ValueError):
    """A missing, unreadable or incompatible checkpoint (reported as one line by the CLI)."""


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a reader (or a crash)
    never sees a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load on the CPU with ``weights_only=True``; check that it is an ahbf training checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means "not a readable checkpoint"
        raise CheckpointError(f"cannot read checkpoint {path}: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "spec" not in ckpt:
        raise CheckpointError(f"{path} is not an ahbf-train checkpoint (no 'model' and 'spec' entries)")
    return ckpt


def describe(spec: dict[str, Any]) -> str:
    m = spec.get("method")
    shape = "" if m == "baseline" else f", {spec.get('num_branches')} branches, aux {spec.get('aux')}"
    return f"{spec.get('arch')} ({m}{shape}) with {spec.get('num_classes')} classes"


def check_spec(found: dict[str, Any], expected: dict[str, Any], path: str) -> None:
    """One-line ``CheckpointError`` naming both models when a checkpoint belongs to another model."""
    if any(found.get(k) != expected.get(k) for k in SPEC_KEYS):
        raise CheckpointError(f"checkpoint {path} holds {describe(found)}, but this run builds {describe(expected)}")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: a resume may see fewer GPUs
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)  # older files: all devices
