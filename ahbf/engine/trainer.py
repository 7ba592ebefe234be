"""The training loop: epochs, steps, the learning rate of each step, evaluation, logging.

``Trainer(build_run(cfg, env))``: everything is built by ``ahbf.engine.run.build_run``; the run folder
and the checkpoints (save, resume, best.pt) are ``ahbf.engine.state.RunState``'s. The trainer does not
know which online-KD method runs: ``OKDTask`` owns the forward and the objective and returns named loss
terms. The step never syncs with the host; the loss is read (and checked for NaN / inf) every
``train.log_interval`` steps.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from tqdm import tqdm

from ..evaluation import evaluate
from . import precise_bn
from .compile import timed
from .distributed import all_reduce, barrier, broadcast_buffers
from .fault import Preempted, StepControl, StopSignals
from .meters import LossMeter, NonFiniteLossError
from .optim import set_lr
from .run import Run
from .runlog import TARGET, EpochProgress, RunLogger, epoch_line, header, use_bars, write_report
from .rundir import RunFolder
from .state import RunState

Probe = Callable[[int], dict[str, float]]  # epochs done -> extra columns of that epoch's row (observes only)


class Trainer:
    """``checkpoints=False``: no checkpoint files (a benchmark); ``probes``: called after each epoch's
    evaluation, their values join the epoch's row (history, metrics.csv)."""

    def __init__(self, run: Run, recipe: str = "", checkpoints: bool = True, probes: Sequence[Probe] = ()):
        self.run, self.env, t = run, run.env, run.cfg.train
        self.data, self.model, self.amp, self.task, self.schedule = run.data, run.model, run.amp, run.task, run.schedule
        self.recipe, self.probes = recipe, list(probes)  # recipe: in force (cli)
        self.bars = use_bars(t.progress)
        self.meter = LossMeter(self.env.device)
        self.log = RunLogger(t.output, self.env.is_main, t.tensorboard)
        for note in run.notes:
            self.log.info(note)
        self.folder = RunFolder(t.output, self.env, self.log.info)
        self.folder.claim(resume=bool(t.resume), overwrite=t.overwrite)  # before anything is written
        # claimed: what config.yaml and the checkpoints record says no (a re-run with -c must not delete this run)
        run.cfg = run.cfg.replace(train={"overwrite": False})
        if run.graphed is not None:
            run.graphed.note = self.log.info  # its later notes (a batch of another shape) go to the run log
        self.state = RunState(run, self.folder, self.meter, self.log.info, checkpoints)
        self.signals: StopSignals | None = None
        try:
            self.state.resume()  # before writing anything: a refused checkpoint leaves the folder as it was
        except BaseException:
            self.close()
            raise
        self.first_epoch = self.state.epoch
        # the first step compiles (torch.compile of the model, the compiled or Triton objective): timed apart
        self.compile_pending = t.compile != "off" or self.cfg.objective.backend != "eager"
        self.folder.write_config(self.cfg.to_yaml(), link=run.named_folder)

    cfg = property(lambda self: self.run.cfg)  # the run's one config (the folder claim records overwrite off)

    def close(self) -> None:
        self.run.close()
        if self.signals is not None:
            self.signals.restore()
        self.folder.release()

    # ------------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        t, d = self.cfg.train, self.data
        self.log.info(header(self.run, self.recipe))
        if d.val is None:
            self.log.info("no held-out val split (data.val_fraction = 0): best = last; the test set never chooses")
        start = time.perf_counter()
        self.signals = StopSignals()
        self.control = StepControl(t.checkpoint_every, self.signals, t.stop_poll_every)
        epochs = tqdm(range(self.state.epoch, t.epochs), desc="epochs", unit="ep", initial=self.state.epoch, total=t.epochs,
                      disable=not (self.bars and self.env.is_main), dynamic_ncols=True)
        try:
            for epoch in epochs:
                row = self.train_epoch(epoch)
                if t.precise_bn:
                    self.precise_bn(first=epoch == self.first_epoch)
                if d.val is not None:
                    row.update(self._prefixed("val", self.evaluate(d.val)))
                for probe in self.probes:
                    row.update(probe(self.state.epoch))
                self.end_epoch(row)
                epochs.set_postfix_str(epoch_line(row, t.epochs, short=True))
            epochs.close()
            return self.finish(time.perf_counter() - start)
        except BaseException as err:
            if not isinstance(err, Preempted):  # a preempted run continues later; a failed one is not runs/latest
                self.folder.undo_latest()
            if isinstance(err, NonFiniteLossError):
                good = self.state.last_good or "none (nothing was written)"
                raise NonFiniteLossError(f"{err}; no checkpoint holds non-finite values; last good checkpoint: "
                                         f"{good}") from None
            raise
        finally:
            self.close()
            self.log.close()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        t, loader, s = self.cfg.train, self.data.train, self.state
        self.model.train()
        self.task.set_epoch(epoch)
        first = s.batch if epoch == s.epoch else 0  # > 0: resuming a mid-epoch checkpoint
        loader.set_epoch(epoch, first)
        progress = EpochProgress(epoch, t.epochs, len(loader), loader.num_samples * self.env.world_size,
                                 enabled=self.env.is_main, bars=self.bars, device=self.env.device)
        # lr of the epoch's last step so far: a checkpoint taken at its last batch resumes into an empty loop
        start, lr, compile_s, untimed = time.perf_counter(), self.schedule(epoch, max(first - 1, 0)), None, 0
        for i, (x, y) in enumerate(progress.iterate(loader), start=first):
            if len(y) < 2:  # BatchNorm cannot train on one sample; every rank has the same count, so all skip it
                if epoch == self.first_epoch:
                    self.log.info("skipping the last training batch of each epoch: it holds 1 sample (BatchNorm needs 2)")
                continue
            lr = self.schedule(epoch, i)
            set_lr(self.amp.optimizer, lr)  # the schedule is the optimiser's only source of lr
            if self.compile_pending:  # the first step compiles: timed apart, not counted in img/s
                compile_s, untimed = timed(lambda: self.train_step(x, y), self.env.device), len(y)
                self.compile_pending, start = False, time.perf_counter()
                progress.wait = 0.0
                progress.reset_window()
                self.log.info(f"first step (compiles: train.compile={t.compile}, objective.backend="
                              f"{self.cfg.objective.backend}): {compile_s:.1f} s, not counted in img/s")
            else:
                self.train_step(x, y)
            progress.advance(len(y) * self.env.world_size)
            if s.step % t.log_interval == 0:
                window = self.meter.read()
                progress.report(s.step, i, window, lr, self.task.kd_scale)
                self.log.scalars("train", {**window, "lr": lr}, s.step)
            self.after_step(epoch, i + 1, len(loader))
        means = self.meter.read_epoch()
        seconds = time.perf_counter() - start
        progress.close()
        s.at(epoch + 1, 0)
        timed_images = progress.images - untimed * self.env.world_size  # none: no img/s to report (nan, not 0)
        return {"epoch": s.epoch, "step": s.step, "lr": lr, "kd_scale": self.task.kd_scale,
                **{f"train_{k}": v for k, v in means.items()},
                "img_per_s": timed_images / max(seconds, 1e-9) if timed_images else float("nan"),
                "epoch_s": seconds, "data_wait": progress.wait / max(seconds, 1e-9),
                **({} if compile_s is None else {"compile_s": compile_s})}

    def precise_bn(self, first: bool) -> None:
        """``train.precise_bn=N``: the running statistics of the weights just trained, before val chooses best.pt."""
        n = self.cfg.train.precise_bn
        used = precise_bn.reestimate(self.model, self.data.train, self.state.epoch, n, self.task.autocast, self.env.device)
        if first:
            ranks = f" x {self.env.world_size} ranks" if self.env.distributed else ""
            self.log.info(f"precise BN: running statistics of {len(precise_bn.batchnorms(self.model))} BatchNorm "
                          f"layers set from {used} training batches{ranks} after every epoch, before val chooses "
                          "best.pt")

    def train_step(self, x, y) -> None:
        terms = self.run.train_step(x, y)
        self.state.step_done()
        self.meter.update(terms, self.state.step)

    def after_step(self, epoch: int, done: int, total: int) -> None:
        """Mid-epoch checkpoint when ``train.checkpoint_every`` is due; on a stop signal, checkpoint and raise
        ``Preempted`` (every rank decides at the same step)."""
        stop, save = self.control.poll(self.state.step)
        if not save or (done == total and not stop):  # the epoch's end writes its own checkpoint
            return
        self.state.at(epoch, done)
        self.meter.read()  # the window into the epoch sums (and the non-finite check) before they are saved
        self.save(improved=False)
        if stop:
            barrier()  # rank 0 has written before any rank exits (torchrun stops the group when one exits)
            raise Preempted(self.signals.name or "a signal on another rank", self.state.step, self.state.path("last.pt"))

    def save(self, improved: bool) -> None:
        self.state.save(improved)
        self.control.saved()

    def evaluate(self, batches) -> dict[str, dict[str, float]]:
        self.model.eval()
        broadcast_buffers(self.model)
        try:
            return evaluate(self.task.predict, batches, self.task.node_names, reduce=all_reduce,
                            device=self.env.device)
        finally:
            self.model.train()

    @staticmethod
    def _prefixed(prefix: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
        return {f"{prefix}_{name}_{k}": v for name, m in metrics.items() if not name.startswith("_")
                for k, v in m.items()}

    def end_epoch(self, row: dict[str, Any]) -> None:
        self.state.history.append(row)
        self.save(self.state.improve(row.get(f"val_{TARGET}_top1")))
        self.log.scalars("epoch", row, self.state.epoch)
        self.log.write_csv(self.state.history)
        self.log.info(epoch_line(row, self.cfg.train.epochs))

    # ----------------------------------------------------------------------------------- the end
    def finish(self, seconds: float) -> dict[str, Any]:
        """Test-set table of the best (val-chosen) weights, a line for the last weights, curves.png."""
        best = self.state.best
        last_is_best = best is not None and best["epoch"] == self.state.epoch
        if not (self.cfg.train.precise_bn or self.env.distributed):
            note = precise_bn.stale_stats_note(self.model, self.task.predict, self.data.val, self.state.history)
            if note:
                self.log.info(note)
        last = self.evaluate(self.data.test)
        chosen, results = "last", last
        if last_is_best:
            chosen = "best"  # the last epoch is the best one
        elif best is not None and self.state.best_state is not None:
            self.model.load_state_dict(self.state.best_state)
            chosen, results = "best", self.evaluate(self.data.test)
        elif best is not None:
            self.log.info(f"best.pt of epoch {best['epoch']} not found; reporting the last weights")
        summary = {"checkpoint": chosen, "best": best, "epochs": self.state.epoch, "train_s": seconds,
                   "test": results, "test_last": last}
        if self.env.is_main:
            write_report(self.cfg, summary, self.state.history, self.state.epoch, self.log.info)
        return summary

    def summary(self) -> str:
        return header(self.run, self.recipe)
