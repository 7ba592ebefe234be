"""The training loop: optimisation, schedules, evaluation, checkpoints and logging.

The trainer does not know which online-KD method runs: ``OKDTask`` owns the forward and the objective
and returns named loss terms. The step is three lines and never syncs with the host; the loss is read
(and checked for NaN / inf) every ``train.log_interval`` steps.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..evaluation import evaluate, format_table
from ..models import create_model
from ..models.summary import count_parameters
from ..pipelines import build_data
from .checkpoint import (CheckpointError, ModelMismatchError, atomic_copy, check_resumable, check_spec, config_changes,
                         load_checkpoint, load_weights, newest_first, non_finite, rng_state, save_checkpoint,
                         set_rng_state)
from .config import ConfigError, RunConfig
from .compile import compile_model, timed
from .distributed import (DistEnv, all_gather, all_reduce, any_rank, barrier, broadcast_buffers, convert_sync_batchnorm,
                          default_threads, set_threads)
from .logging import EpochProgress, RunLogger, use_bars
from .fault import (Preempted, RunFolderError, StepControl, StopSignals, claim_folder, job_id, owned_by_this_job,
                    restart_count)
from .meters import LossMeter, NonFiniteLossError
from .optim import build_optimizer, set_lr
from .plots import plot_curves
from .precision import AmpStepper, resolve_precision
from .resolved import record_resolved
from .recipes import describe as describe_recipe
from .rundir import link_latest, shared_output
from .schedules import LRSchedule, scaled_lr
from .task import OKDTask, make_graph, resolve_model, resolve_objective

TARGET = "branch0"


def configure_determinism(deterministic: bool) -> None:
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS at its first use
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def wrap_model(model: nn.Module, env: DistEnv, compile: str = "off", compile_mode: str = "default",
               note: Callable[[str], None] = print) -> tuple[nn.Module, nn.Module]:
    """(training forward, evaluation forward): DDP, then ``train.compile`` (model: torch.compile of the whole;
    branches: each unit compiled in place, so evaluation runs compiled too); no DDP for evaluation."""
    train = model
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        train = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    train = compile_model(train, compile, compile_mode, note)
    return train, (model if env.distributed else train)


def resolve(cfg: RunConfig, device: torch.device) -> RunConfig:
    """Fill every 'auto' / 'SPEC default' value, so the saved config.yaml reproduces the run exactly."""
    cfg.model = resolve_model(cfg.model)
    cfg.objective = resolve_objective(cfg.objective, cfg.model.method)
    cfg.train.precision = resolve_precision(cfg.train.precision, device)
    if cfg.objective.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"objective.backend=triton needs a CUDA device (this run is on {device}); use compiled or eager")
    cfg.train.threads = cfg.train.threads or default_threads()
    return cfg


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, recipe: str = ""):
        self.cfg, self.env, t = resolve(cfg, env.device), env, cfg.train
        self.recipe, self.auto_output = recipe, bool(t.name) or not t.output  # recipe: in force (cli); runs/latest
        given = t.resume
        if restart_count() > 0 and not given:
            t.resume = "auto"  # tentatively: a torchrun restart finds the first attempt's folder
        t.output, t.name = shared_output(cfg), ""  # config.yaml records the folder as train.output
        if restart_count() > 0:
            t.resume = self._restart_resume(given)
        self.bars = use_bars(t.progress)
        set_threads(t.threads)  # before any work
        configure_determinism(t.deterministic)
        self.data = build_data(cfg.data, rank=env.rank, world_size=env.world_size, device=env.device)
        if self.data.train.num_samples < 2:
            raise ConfigError(f"each of the {env.world_size} processes gets {self.data.train.num_samples} training "
                              "sample(s); BatchNorm needs 2 per step: use more data or fewer processes")
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        m = cfg.model
        self.model = create_model(m.arch, m.method, self.data.num_classes, m.num_branches, m.aux,
                                  split=m.split).to(env.device)
        if t.sync_bn and env.distributed:
            convert_sync_batchnorm(self.model)
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(self.model.parameters(), cfg.optim, env.device, t.precision == "fp16")
        self.amp = AmpStepper(optimizer, self.model.parameters(), env.device, t.precision, cfg.optim.clip_grad)
        notes: list[str] = []
        train_fwd, eval_fwd = wrap_model(self.model, env, t.compile, t.compile_mode, notes.append)
        graph = make_graph(m.method, m.num_branches, cfg.objective)
        self.task = OKDTask(train_fwd, graph, cfg.objective, self.amp.autocast, eval_model=eval_fwd)
        self.peak_lr = scaled_lr(cfg.optim.lr, cfg.optim.lr_base_batch, cfg.data.batch_size * env.world_size)
        self.schedule = LRSchedule(cfg.schedule, self.peak_lr, t.epochs, len(self.data.train))
        self.meter = LossMeter(env.device)
        self.log = RunLogger(t.output, env.is_main, t.tensorboard)
        for note in notes:
            self.log.info(note)
        self.epoch, self.step, self.history = 0, 0, []
        self.batch = 0  # batches of epoch self.epoch already trained (a mid-epoch checkpoint)
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_good: str | None = None  # the newest checkpoint written or resumed from
        self.signals: StopSignals | None = None
        self.lock = self._claim_output()  # refuses a folder holding another run before anything is written
        t.overwrite = False  # done; config.yaml re-run with -c must not delete this run's checkpoints
        try:
            self._maybe_resume()  # before writing anything: a refused checkpoint leaves the folder as it was
        except BaseException:
            self.close()
            raise
        self.first_epoch = self.epoch
        record_resolved(cfg, self.data, self.amp.optimizer, env)  # config.yaml: what actually runs, no 'auto'
        # the first step compiles (torch.compile of the model, the compiled or Triton objective): timed apart
        self.compile_pending = t.compile != "off" or cfg.objective.backend != "eager"
        if env.is_main:
            os.makedirs(t.output, exist_ok=True)
            with open(os.path.join(t.output, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())
            if self.auto_output:
                link_latest(t.output)

    # ----------------------------------------------------------------------------------------- paths
    def path(self, name: str) -> str:
        return os.path.join(self.cfg.train.output, name)

    def _restart_resume(self, given: str) -> str:
        """A torchrun restart continues its own run from the run folder's newest checkpoint, where this job
        claimed the folder (``.owner``) and wrote one; otherwise what the command says, so a folder attempt 0
        refused stays refused, and an explicit ``--resume PATH`` is used only until the run has its own."""
        t = self.cfg.train
        ours = self.env.is_main and owned_by_this_job(t.output) and bool(newest_first(self.path("last.pt")))
        (ours,) = any_rank(ours)
        return "auto" if ours else given

    def _claim_output(self):
        """Rank 0 locks the output folder (refusing one that holds another run); every rank learns the outcome."""
        t, lock, error, notes = self.cfg.train, None, None, []
        owners = all_gather(job_id())  # the torchrun job's agents on every node: a restart of this job may resume
        if self.env.is_main:
            try:
                lock, notes = claim_folder(t.output, resume=bool(t.resume), overwrite=t.overwrite, owners=owners)
            except (RunFolderError, OSError) as err:
                error = err
        (failed,) = any_rank(error is not None)
        if error is not None:
            raise error
        if failed:
            raise RunFolderError(f"rank 0 refused the output folder {t.output} (its error says why)")
        for note in notes:
            self.log.info(note)
        return lock

    def close(self) -> None:
        self.data.close()  # worker processes end with the run, not at interpreter exit
        if self.signals is not None:
            self.signals.restore()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _maybe_resume(self) -> None:
        """Rank 0 chooses the checkpoint (and loads it); every other rank loads the same file, and all check that
        they resumed the same step (a rank that ran the fallback chain alone could take another file)."""
        path = self.cfg.train.resume
        if not path:
            return
        chosen, error = None, None
        if self.env.is_main:
            try:
                chosen = self._choose_checkpoint(path)
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

    def _choose_checkpoint(self, path: str) -> str | None:
        """Rank 0: load ``path``, or for ``auto`` the newest readable checkpoint of the run folder (None: none)."""
        if path != "auto":
            self.load(path)
            return path
        chain, skipped = newest_first(self.path("last.pt")), []
        if not chain:
            self.log.info(f"resume=auto: no checkpoint in {self.cfg.train.output}; starting from scratch")
            return None
        for candidate in chain:
            try:
                self.load(candidate, same_run=True)
            except ModelMismatchError:
                raise  # the run's config builds another model: an older checkpoint would not fit either
            except CheckpointError as err:
                skipped.append(str(err))
                self.log.info(f"warning: {err}; trying the previous checkpoint")
                continue
            if skipped:
                self.log.info(f"warning: resumed from the previous good checkpoint {candidate}, not the newest")
            return candidate
        raise CheckpointError(f"--resume auto: no usable checkpoint in {self.cfg.train.output}: {'; '.join(skipped)}")

    # ------------------------------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        t, d = self.cfg.train, self.data
        self.log.info(self.summary())
        if d.val is None:
            self.log.info("no held-out val split (data.val_fraction = 0): best = last; the test set never chooses")
        start = time.perf_counter()
        self.signals = StopSignals()
        self.control = StepControl(t.checkpoint_every, self.signals)
        epochs = tqdm(range(self.epoch, t.epochs), desc="epochs", unit="ep", initial=self.epoch, total=t.epochs,
                      disable=not (self.bars and self.env.is_main), dynamic_ncols=True)
        try:
            for epoch in epochs:
                row = self.train_epoch(epoch)
                if d.val is not None:
                    row.update(self._prefixed("val", self.evaluate(d.val)))
                self.end_epoch(row)
                epochs.set_postfix_str(self.epoch_line(row, short=True))
            epochs.close()
            return self.finish(time.perf_counter() - start)
        except NonFiniteLossError as err:
            good = self.last_good or "none (nothing was written)"
            raise NonFiniteLossError(f"{err}; no checkpoint holds non-finite values; last good checkpoint: {good}") from None
        finally:
            self.close()
            self.log.close()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        t, loader = self.cfg.train, self.data.train
        self.model.train()
        self.task.set_epoch(epoch)
        first = self.batch if epoch == self.epoch else 0  # > 0: resuming a mid-epoch checkpoint
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
            set_lr(self.amp.optimizer, lr)
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
            if self.step % t.log_interval == 0:
                window = self.meter.read()
                progress.report(self.step, i, window, lr, self.task.kd_scale)
                self.log.scalars("train", {**window, "lr": lr}, self.step)
            self.after_step(epoch, i + 1, len(loader))
        means = self.meter.read_epoch()
        seconds = time.perf_counter() - start
        progress.close()
        self.epoch, self.batch = epoch + 1, 0
        timed_images = progress.images - untimed * self.env.world_size  # none: no img/s to report (nan, not 0)
        return {"epoch": self.epoch, "step": self.step, "lr": lr, "kd_scale": self.task.kd_scale,
                **{f"train_{k}": v for k, v in means.items()},
                "img_per_s": timed_images / max(seconds, 1e-9) if timed_images else float("nan"),
                "epoch_s": seconds, "data_wait": progress.wait / max(seconds, 1e-9),
                **({} if compile_s is None else {"compile_s": compile_s})}

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        terms = self.task(x, y)
        self.amp.step(terms["loss"])
        self.task.after_step()  # PCL: EMA update (its weights live in the model's state dict)
        self.step += 1
        self.meter.update(terms, self.step)

    def after_step(self, epoch: int, done: int, total: int) -> None:
        """Mid-epoch checkpoint when ``train.checkpoint_every`` is due; on a stop signal, checkpoint and raise
        ``Preempted`` (every rank decides at the same step)."""
        stop, save = self.control.poll(self.step)
        if not save or (done == total and not stop):  # the epoch's end writes its own checkpoint
            return
        self.epoch, self.batch = epoch, done
        self.meter.read()  # the window into the epoch sums (and the non-finite check) before they are saved
        self.save(improved=False)
        if stop:
            barrier()  # rank 0 has written before any rank exits (torchrun stops the group when one exits)
            raise Preempted(self.signals.name or "a signal on another rank", self.step, self.path("last.pt"))

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
        self.history.append(row)
        key = f"val_{TARGET}_top1"
        improved = key in row and (self.best is None or row[key] >= self.best["val_top1"])
        if improved:
            self.best = {"epoch": self.epoch, "val_top1": row[key]}
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.save(improved)
        self.log.scalars("epoch", row, self.epoch)
        self.log.write_csv(self.history)
        self.log.info(self.epoch_line(row))

    def epoch_line(self, row: dict[str, Any], short: bool = False) -> str:
        val = [f"{k[4:-5]} {v:.2f}" for k, v in row.items() if k.startswith("val_") and k.endswith("_top1")]
        if short:
            return f"loss {row['train_loss']:.3f}" + (f" val {val[0]}" if val else "")
        terms = " ".join(f"{k[6:]} {v:.3f}" for k, v in row.items() if k.startswith("train_") and k != "train_loss")
        text = (f"epoch {row['epoch']:>3}/{self.cfg.train.epochs}  loss {row['train_loss']:.4f} ({terms})  "
                f"lr {row['lr']:.4g}  kd_scale {row['kd_scale']:.3f}  {row['img_per_s']:.0f} img/s "
                f"(data {100 * row.get('data_wait', 0.0):.0f}%)")
        if "compile_s" in row:
            text += f"  compile {row['compile_s']:.1f} s (not in img/s)"
        if f"val_{TARGET}_loss" in row:
            text += f"  | val loss {row[f'val_{TARGET}_loss']:.4f}"
        return text + (f"  | val top-1: {', '.join(val)}" if val else "")

    # ------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.amp.state_dict(), "epoch": self.epoch,
                "batch": self.batch, "step": self.step, "spec": dict(self.model.spec), "config": self.cfg.to_dict(),
                "history": self.history, "best": self.best, "rng": rng_state(self.env.device),
                "meter": self.meter.state_dict()}

    def check_finite(self) -> None:
        """Every rank: stop (``NonFiniteLossError``) before a checkpoint would hold NaN / inf weights or state."""
        bad = non_finite({"model": self.model.state_dict(), "optim": self.amp.state_dict()})
        (any_bad,) = any_rank(bool(bad))
        if any_bad:
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") if bad else "on another rank"
            raise NonFiniteLossError(f"non-finite weights after step {self.step} ({len(bad)} tensors: {shown}); "
                                     "try a lower --lr, --clip-grad or --precision fp32")

    def save(self, improved: bool) -> None:
        self.check_finite()
        self.control.saved()
        if not self.env.is_main:
            return
        last = self.path("last.pt")
        save_checkpoint(self.state(), last, self.cfg.train.keep_last)
        self.last_good = last
        if improved:
            atomic_copy(last, self.path("best.pt"))
        every = self.cfg.train.save_every
        if every and self.batch == 0 and self.epoch % every == 0:  # epoch ends only, not mid-epoch saves
            atomic_copy(last, self.path(f"epoch_{self.epoch}.pt"))

    def load(self, path: str, same_run: bool = False) -> None:
        """Resume from ``path``: every check (checksum, entries, model, shapes) before any state changes.
        ``same_run`` (``--resume auto``): also refuse a checkpoint whose config is another run's (a sweep sibling)."""
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, path)
        check_spec(ckpt["spec"], self.model.spec, path)
        changes = config_changes(ckpt.get("config") or {}, self.cfg.to_dict()) if same_run else []
        if changes:
            raise ModelMismatchError(f"--resume auto: {path} is another run's checkpoint ({'; '.join(changes[:4])}"
                                     f"{'; ...' if len(changes) > 4 else ''}); give this run its own folder with "
                                     f"--name / -o, or continue that run anyway with --resume {path}")
        load_weights(self.model, ckpt["model"], path)
        try:
            self.amp.load_state_dict(ckpt["optim"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {path}: optimiser state does not fit this run "
                                  f"({type(err).__name__}: {' '.join(str(err).split())})") from None
        self.epoch, self.batch, self.step = ckpt["epoch"], ckpt.get("batch", 0), ckpt["step"]
        self.history, self.best = list(ckpt["history"]), ckpt.get("best")
        if ckpt.get("meter") and self.batch:
            self.meter.load_state_dict(ckpt["meter"])
        set_rng_state(ckpt["rng"], self.env.device)
        self.last_good = path
        self._load_best(os.path.join(os.path.dirname(path) or ".", "best.pt"))
        where = f" + {self.batch} batches of epoch {self.epoch + 1}" if self.batch else ""
        self.log.info(f"resumed from {path}: {self.epoch} epochs{where} ({self.step} steps) done")

    def _load_best(self, path: str) -> None:
        """The best weights of a resumed run: its best.pt (copied into this run's output if it is elsewhere)."""
        if self.best is None or not os.path.isfile(path):
            return
        try:
            best = load_checkpoint(path)
        except CheckpointError as err:  # best.pt never blocks a resume
            self.log.info(f"warning: {err}; the end of the run reports the last weights unless a later epoch is best")
            return
        if best.get("epoch") != self.best["epoch"]:
            return
        self.best_state = best["model"]
        target = self.path("best.pt")
        if self.env.is_main and os.path.abspath(path) != os.path.abspath(target):
            os.makedirs(self.cfg.train.output, exist_ok=True)
            atomic_copy(path, target)

    # ----------------------------------------------------------------------------------- the end
    def finish(self, seconds: float) -> dict[str, Any]:
        """Test-set table of the best (val-chosen) weights, a line for the last weights, curves.png."""
        last = self.evaluate(self.data.test)
        chosen, results = "last", last
        if self.best is not None and self.best["epoch"] == self.epoch:
            chosen = "best"  # the last epoch is the best one
        elif self.best is not None and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            chosen, results = "best", self.evaluate(self.data.test)
        elif self.best is not None:
            self.log.info(f"best.pt of epoch {self.best['epoch']} not found; reporting the last weights")
        summary = {"checkpoint": chosen, "best": self.best, "epochs": self.epoch, "train_s": seconds,
                   "test": results, "test_last": last}
        if self.env.is_main:
            self.report(summary)
        return summary

    def report(self, summary: dict[str, Any]) -> None:
        c, results, best = self.cfg, summary["test"], summary["best"]
        where = (f"best checkpoint, epoch {best['epoch']}, chosen on val top-1 {best['val_top1']:.2f}%"
                 if summary["checkpoint"] == "best" else f"last checkpoint, epoch {self.epoch}")
        self.log.info("\n" + format_table(results, f"test set, {where}:"))
        self.log.info(f"last epoch: target test top-1 {summary['test_last'][TARGET]['top1']:.2f}%")
        self.log.info(f"TARGET ({TARGET}) TEST TOP-1: {results[TARGET]['top1']:.2f}%   "
                      f"({self.cfg.model.arch}, {self.cfg.model.method}, {self.cfg.data.dataset}; "
                      f"training took {summary['train_s']:.0f} s)")
        with open(self.path("results.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if self.history:
            plot_curves(self.history, self.path("curves.png"),
                        f"{c.model.method} {c.model.arch} x{c.model.num_branches} on {c.data.dataset}")
        self.log.info(f"outputs in {c.train.output}/: {', '.join(sorted(f for f in os.listdir(c.train.output) if not f.startswith('.')))}")

    def summary(self) -> str:
        """The start-up header: folder, recipe, model (trained and deployed sizes), data, schedule, machine."""
        c, d, m = self.cfg, self.data, self.cfg.model
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)  # not MobileNetV2's unused blocks
        deployed = count_parameters(m.arch, "baseline", d.num_classes)[1]
        sizes = d.sizes or {"train": d.train.num_samples * self.env.world_size}
        splits = f"{sizes['train']} train / " + (f"{sizes.get('val', 0)} val" if d.val is not None else "no val")
        splits += f" / {sizes['test']} test" if "test" in sizes else ""
        backend = "in-memory tensors" if d.backend == "memory" else f"{d.backend} (image check {d.check_images})"
        compiled = c.train.compile + (f" ({c.train.compile_mode})" if c.train.compile != "off" else "")
        lines = [f"run folder: {c.train.output}"]
        if self.recipe:
            lines.append(describe_recipe(self.recipe))
        lines += [
            f"model: {m.method} {m.arch}, {m.num_branches} branches, aux {m.aux}: {trained / 1e6:.2f} M parameters "
            f"trained, {deployed / 1e6:.3f} M deployed ({TARGET} = trunk + branch 0, what ahbf-export writes)",
            f"data: {c.data.dataset}, {splits}, {d.num_classes} classes, {d.image_size}px, {backend}, "
            f"batch {c.data.batch_size} x {self.env.world_size}",
            f"schedule: {c.train.epochs} epochs of {len(d.train)} steps, {c.schedule.name} lr {self.peak_lr:.4g}"
            f"{' (scaled)' if c.optim.lr_base_batch else ''}, SGD {c.optim.impl}, weight decay {c.optim.weight_decay:g}",
            f"machine: {self.env.device}, world size {self.env.world_size}, {c.train.precision}, compile {compiled}, "
            f"{c.train.threads} threads, objective {c.objective.backend}"]
        return "\n".join(lines)
