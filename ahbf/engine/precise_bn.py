"""Precise BatchNorm: re-estimate every BatchNorm's running statistics after training (``train.precise_bn=N``).

A short run is all warm-up: the weights move fast until the end, and BatchNorm's running averages (momentum 0.1)
trail them, so eval-mode accuracy can sit near chance while the same weights with batch statistics are good
(digits, 2 epochs). ``update_bn_stats`` runs N training batches through the model in train mode, without
gradients, and sets each BatchNorm's ``running_mean`` / ``running_var`` to the exact mean and (unbiased)
variance of all the inputs that BatchNorm saw, accumulated in float64 (cumulative, like fvcore's
``update_bn_stats`` with momentum None, but with the between-batch part of the variance included). Under DDP
the sums are all-reduced, so every rank gets the statistics of all ranks' batches.
``batch_stats_top1`` is the check behind the hint to use it: top-1 with batch statistics, running stats untouched.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .checkpoint import checksum, load_checkpoint
from .durable import atomic_save


def batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm modules that track running statistics, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


@contextlib.contextmanager
def train_mode(model: nn.Module) -> Iterator[None]:
    """``model.train()`` inside, every module's own training flag restored after."""
    flags = {m: m.training for m in model.modules()}
    model.train()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_batches: int,
                    forward: Callable[[Tensor], object] | None = None,
                    reduce: Callable[[Tensor], Tensor] = lambda t: t) -> int:
    """Set every BatchNorm's running mean / var to the exact statistics of its inputs over the first
    ``num_batches`` of ``batches`` (batches of fewer than 2 samples are skipped). ``forward``: the model's
    forward (default ``model``); ``reduce``: an in-place sum over ranks (every rank must run the same number of
    batches). BatchNorms that saw no input keep their statistics. Returns the number of batches used."""
    bns = batchnorms(model)
    sums: dict[str, list] = {}

    def hook(name: str):
        def record(module, args):
            x = args[0].detach().double()
            dims = [0, *range(2, x.dim())]
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + x.sum(dims)
            s[1] = s[1] + (x * x).sum(dims)
            s[2] += x.numel() // x.size(1)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in bns.items()]
    used = 0
    try:
        with train_mode(model), _frozen_stats(bns.values()):
            for x, _ in itertools.islice(batches, num_batches):
                if len(x) < 2:
                    continue
                (forward or model)(x)
                used += 1
    finally:
        for h in handles:
            h.remove()
    for name, m in bns.items():
        if name not in sums:
            continue
        s1, s2, n = sums[name]
        total = reduce(torch.cat([s1, s2, torch.tensor([float(n)], dtype=torch.float64, device=s1.device)]))
        c = m.num_features
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] - n * mean * mean) / (n - 1)  # unbiased, like BatchNorm's running_var
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.clamp_min(0).to(m.running_var.dtype))
    return used


@contextlib.contextmanager
def _frozen_stats(bns: Iterable[_BatchNorm]) -> Iterator[None]:
    """The train-mode forwards must not move the running statistics: momentum 0, buffers restored after."""
    bns = list(bns)
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def batch_stats_top1(model: nn.Module, predict: Callable[[Tensor], list[Tensor]],
                     batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 (%) of the target (node 0) with every BatchNorm normalising by its batch's statistics (train mode,
    no grad); running statistics and the training flags are left as they were. Single process only."""
    correct = total = 0
    with train_mode(model), _frozen_stats(batchnorms(model).values()):
        for x, y in batches:
            if len(y) < 2:
                continue
            logits = predict(x)[0]
            correct += int((logits.argmax(1).cpu() == y.cpu()).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1)


def write_bn_stats(model: nn.Module, path: str) -> None:
    """Replace the BatchNorm buffers of checkpoint ``path`` by ``model``'s (checksum recomputed, atomic)."""
    ckpt = load_checkpoint(path)
    state = model.state_dict()
    for name in batchnorms(model):
        for buf in ("running_mean", "running_var"):
            key = f"{name}.{buf}" if name else buf
            ckpt["model"][key] = state[key].detach().to("cpu", copy=True)
    ckpt.pop("checksum", None)
    ckpt["checksum"] = checksum(ckpt)
    atomic_save(ckpt, path)


HINT_GAP = 20.0  # points of top-1 between batch statistics and running statistics that make the run say so


def hint(eval_top1: float, batch_top1: float) -> str:
    """One log line when running statistics are far worse than batch statistics (a short run's stale BN)."""
    if batch_top1 - eval_top1 <= HINT_GAP:
        return ""
    return (f"note: val top-1 is {batch_top1:.1f}% with batch statistics but {eval_top1:.1f}% with BatchNorm's "
            "running statistics, which lag the weights in a short run; re-estimate them with --precise-bn 20")


def at_end(trainer, *checkpoints: str) -> None:
    """The trainer's end of run, on the weights it is about to evaluate: with ``train.precise_bn=N``, re-estimate
    the BatchNorm statistics on N training batches (every rank) and write them into ``checkpoints`` of the run
    folder (rank 0), so ``ahbf-eval`` / ``ahbf-export`` see them too; with it off, the stale-statistics hint
    (single process, a val split and its last row needed)."""
    from .distributed import all_reduce

    t, model, loader = trainer.cfg.train, trainer.model, trainer.data.train
    if t.precise_bn:
        loader.set_epoch(trainer.epoch, 0)
        def forward(x):
            with trainer.task.autocast():  # the precision of training and evaluation
                model(x)

        used = update_bn_stats(model, loader, t.precise_bn, forward, reduce=all_reduce)
        trainer.log.info(f"precise BN: running statistics of {len(batchnorms(model))} BatchNorm layers set from "
                         f"{used} training batches{f' x {trainer.env.world_size} ranks' if trainer.env.distributed else ''}"
                         f" ({', '.join(checkpoints) or 'weights'})")
        for name in checkpoints if trainer.env.is_main else ():
            if os.path.isfile(trainer.state.path(name)):
                write_bn_stats(model, trainer.state.path(name))
        return
    key = "val_branch0_top1"
    if not checkpoints or "last.pt" not in checkpoints or trainer.env.distributed or trainer.data.val is None \
            or not trainer.history or key not in trainer.history[-1]:
        return
    note = hint(trainer.history[-1][key], batch_stats_top1(model, trainer.task.predict, trainer.data.val))
    if note:
        trainer.log.info(note)
