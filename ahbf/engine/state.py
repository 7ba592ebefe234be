"""A run's checkpoints: ``RunState`` owns what a checkpoint holds, every checkpoint write and every decision
about one (the folder they live in is ``rundir.RunFolder``'s).

- the progress a checkpoint restores: epoch, batches of the epoch done, optimiser step, history, best;
- save: the non-finite check on every rank, then ``last.pt`` (rotated: last.1.pt ...), ``best.pt`` when
  the target's val top-1 improved, ``epoch_N.pt`` every ``train.save_every`` epochs;
- resume: rank 0 chooses the checkpoint (for ``auto`` the newest readable one, falling back along the
  rotation), every other rank loads the same file, and all check they resumed the same step.

The file format is ``ahbf.engine.checkpoint``'s (``state_dict`` lists the keys).
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Callable

import torch

from .checkpoint import (CheckpointError, ModelMismatchError, check_resumable, check_spec, config_changes,
                         load_checkpoint, load_weights, newest_first, non_finite, rng_state, save_checkpoint,
                         set_rng_state)
from .durable import WriteError, atomic_copy
from .distributed import DistEnv, all_gather, any_rank
from .meters import LossMeter, NonFiniteLossError
from .rundir import RunFolder

if TYPE_CHECKING:
    from .run import Run


class RunState:
    """Progress + checkpoints of one run. ``checkpoints=False``: nothing is written but the folder's
    config.yaml and logs (a benchmark that needs no checkpoints)."""

    def __init__(self, run: Run, folder: RunFolder, meter: LossMeter, info: Callable[[str], None] = print,
                 checkpoints: bool = True):
        self.run, self.env, self.folder, self.meter, self.info = run, run.env, folder, meter, info
        self.checkpoints = checkpoints
        self.epoch, self.step, self.history = 0, 0, []
        self.batch = 0  # batches of epoch self.epoch already trained (a mid-epoch checkpoint)
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_good: str | None = None  # the newest checkpoint written or resumed from
        self.corrupt: list[str] = []  # files of the rotation a resume fell back past: never kept over a good one

    cfg = property(lambda self: self.run.cfg)  # the run's one config

    def path(self, name: str) -> str:
        return self.folder.path(name)

    # ------------------------------------------------------------------------------------ progress
    def step_done(self) -> None:
        self.step += 1

    def at(self, epoch: int, batch: int) -> None:
        """Where the run stands: ``batch`` batches of epoch ``epoch`` (0-based) done (0: the epoch's start)."""
        self.epoch, self.batch = epoch, batch

    # ---------------------------------------------------------------------------------------- save
    def state_dict(self) -> dict[str, Any]:
        model = self.run.model
        return {"model": model.state_dict(), "optim": self.run.amp.state_dict(), "epoch": self.epoch,
                "batch": self.batch, "step": self.step, "spec": dict(model.spec), "config": self.cfg.to_dict(),
                "history": self.history, "best": self.best, "rng": rng_state(self.env.device),
                "meter": self.meter.state_dict()}

    def check_finite(self) -> None:
        """Every rank: stop (``NonFiniteLossError``) before a checkpoint would hold NaN / inf weights or state."""
        bad = non_finite({"model": self.run.model.state_dict(), "optim": self.run.amp.state_dict()})
        (any_bad,) = any_rank(bool(bad))
        if any_bad:
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") if bad else "on another rank"
            raise NonFiniteLossError(f"non-finite weights after step {self.step} ({len(bad)} tensors: {shown}); "
                                     "try a lower --lr, --clip-grad or --precision fp32")

    def improve(self, top1: float | None) -> bool:
        """Record the epoch just ended as the best if its val top-1 (None: no val split) is at least the best's."""
        if top1 is None or not (self.best is None or top1 >= self.best["val_top1"]):
            return False
        self.best = {"epoch": self.epoch, "val_top1": top1}
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.run.model.state_dict().items()}
        return True

    def save(self, improved: bool) -> None:
        self.check_finite()
        if not (self.checkpoints and self.env.is_main):
            return
        last = self.path("last.pt")
        try:
            save_checkpoint(self.state_dict(), last, self.cfg.train.keep_last, corrupt=self.corrupt)
        except WriteError as err:
            raise WriteError(f"{err}; no checkpoint was changed (the newest good one: "
                                       f"{self.last_good or 'none yet'})") from None
        self.last_good, self.corrupt = last, []
        if improved:
            atomic_copy(last, self.path("best.pt"))
        every = self.cfg.train.save_every
        if every and self.batch == 0 and self.epoch % every == 0:  # epoch ends only, not mid-epoch saves
            atomic_copy(last, self.path(f"epoch_{self.epoch}.pt"))

    # -------------------------------------------------------------------------------------- resume
    def resume(self) -> None:
        """Rank 0 chooses the checkpoint (and loads it); every other rank loads the same file, and all check that
        they resumed the same step (a rank that ran the fallback chain alone could take another file)."""
        path = self.cfg.train.resume
        if not path:
            return
        chosen, error = None, None
        if self.env.is_main:
            try:
                chosen = self.choose(path)
            except (CheckpointError, OSError) as err:
                error = err
        chosen, message, mismatch = all_gather((chosen, error and str(error), isinstance(error, ModelMismatchError)))[0]
        if error is not None:
            raise error
        if message:
            raise (ModelMismatchError if mismatch else CheckpointError)(f"rank 0: {message}")
        if chosen is None:
            return
        failure = None
        if not self.env.is_main:
            try:
                self.load(chosen, same_run=path == "auto")
            except (CheckpointError, OSError) as err:
                failure = err
        steps = all_gather(None if failure else self.step)
        if failure is not None:
            raise failure
        if len(set(steps)) > 1:
            raise CheckpointError(f"the ranks could not all resume from {chosen} (steps per rank: {steps})")

    def choose(self, path: str) -> str | None:
        """Rank 0: load ``path``, or for ``auto`` the newest readable checkpoint of the run folder (None: none)."""
        if path != "auto":
            self.load(path)
            return path
        chain, skipped = newest_first(self.path("last.pt")), []
        if not chain:
            self.info(f"resume=auto: no checkpoint in {self.cfg.train.output}; starting from scratch")
            return None
        for candidate in chain:
            try:
                self.load(candidate, same_run=True)
            except ModelMismatchError:
                raise  # the run's config builds another model: an older checkpoint would not fit either
            except CheckpointError as err:
                skipped.append(str(err))
                self.corrupt.append(candidate)
                self.info(f"warning: {err}; trying the previous checkpoint")
                continue
            if skipped:
                self.info(f"warning: resumed from the previous good checkpoint {candidate}, not the newest")
            return candidate
        others = self.usable_snapshots()
        hint = (f"usable: {', '.join(others)}; continue from one with --resume PATH" if others else
                "no usable best.pt or epoch_N.pt either")
        raise CheckpointError(f"--resume auto: no usable checkpoint in the rotation of {self.cfg.train.output} "
                              f"({'; '.join(skipped)}); {hint}")

    def usable_snapshots(self) -> list[str]:
        """best.pt and epoch_N.pt (newest first) of the run folder that a resume could use, with their progress."""
        folder = self.cfg.train.output
        epochs = [f for f in os.listdir(folder) if re.fullmatch(r"epoch_\d+\.pt", f)] if os.path.isdir(folder) else []
        found = []
        for name in ["best.pt", *sorted(epochs, key=lambda f: -int(f[6:-3]))]:
            path = self.path(name)
            try:
                ckpt = load_checkpoint(path)
                check_resumable(ckpt, path)
                check_spec(ckpt["spec"], self.run.model.spec, path)
            except (CheckpointError, OSError):
                continue
            found.append(f"{path} (epoch {ckpt['epoch']}, step {ckpt['step']})")
        return found

    def load(self, path: str, same_run: bool = False) -> None:
        """Resume from ``path``: every check (checksum, entries, model, shapes) before any state changes.
        ``same_run`` (``--resume auto``): also refuse a checkpoint whose config is another run's (a sweep sibling)."""
        model, amp = self.run.model, self.run.amp
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, path)
        check_spec(ckpt["spec"], model.spec, path)
        changes = config_changes(ckpt.get("config") or {}, self.cfg.to_dict())
        listed = f"{'; '.join(changes[:4])}{'; ...' if len(changes) > 4 else ''}"
        if changes and same_run:
            raise ModelMismatchError(f"--resume auto: {path} is another run's checkpoint ({listed}); give this run its "
                                     f"own folder with --name / -o, or continue that run anyway with --resume {path}")
        if changes:  # an explicit path: continue, with this run's settings, but say what differs
            self.info(f"note: --resume {path}: this run's settings differ from the checkpoint's ({listed}); "
                      "continuing with this run's")
        load_weights(model, ckpt["model"], path)
        try:
            amp.load_state_dict(ckpt["optim"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {path}: optimiser state does not fit this run "
                                  f"({type(err).__name__}: {' '.join(str(err).split())})") from None
        self.epoch, self.batch, self.step = ckpt["epoch"], ckpt.get("batch", 0), ckpt["step"]
        self.history, self.best = list(ckpt["history"]), ckpt.get("best")
        if ckpt.get("meter") and self.batch:
            self.meter.load_state_dict(ckpt["meter"])
        set_rng_state(ckpt["rng"], self.env.device)
        self.last_good = path
        self.load_best(os.path.join(os.path.dirname(path) or ".", "best.pt"))
        where = f" + {self.batch} batches of epoch {self.epoch + 1}" if self.batch else ""
        self.info(f"resumed from {path}: {self.epoch} epochs{where} ({self.step} steps) done")

    def load_best(self, path: str) -> None:
        """The best weights of a resumed run: its best.pt (copied into this run's output if it is elsewhere)."""
        if self.best is None or not os.path.isfile(path):
            return
        try:
            best = load_checkpoint(path)
        except CheckpointError as err:  # best.pt never blocks a resume
            self.info(f"warning: {err}; the end of the run reports the last weights unless a later epoch is best")
            return
        if best.get("epoch") != self.best["epoch"]:
            return
        self.best_state = best["model"]
        target = self.path("best.pt")
        if self.env.is_main and os.path.abspath(path) != os.path.abspath(target):
            os.makedirs(self.cfg.train.output, exist_ok=True)
            atomic_copy(path, target)
