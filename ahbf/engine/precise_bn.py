"""Precise BatchNorm: re-estimate every BatchNorm's running statistics after each epoch (``train.precise_bn=N``).

A short run is all warm-up: the weights move fast until the end, and BatchNorm's running averages (momentum 0.1)
trail them, so eval-mode accuracy can sit near chance while the same weights with batch statistics are good
(digits, 2 epochs). ``update_bn_stats`` runs N training batches through the model in train mode, without
gradients, and sets each BatchNorm's ``running_mean`` / ``running_var`` to the exact mean and (unbiased)
variance of all the inputs that BatchNorm saw, accumulated in float64 (cumulative, like fvcore's
``update_bn_stats`` with momentum None, but with the between-batch part of the variance included). Under DDP
the sums are all-reduced, so every rank gets the statistics of all ranks' batches. ``reestimate`` does it after
every epoch, before the val evaluation, so the val top-1 that chooses best.pt is measured with the statistics
that the checkpoints hold and the final table uses (the cost: N forward batches per epoch, no backward).
``batch_stats_top1`` is the check behind the hint to use it: top-1 with batch statistics, running stats untouched.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


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


HINT_GAP = 20.0  # points of top-1 between batch statistics and running statistics that make the run say so


def hint(eval_top1: float, batch_top1: float) -> str:
    """One log line when running statistics are far worse than batch statistics (a short run's stale BN)."""
    if batch_top1 - eval_top1 <= HINT_GAP:
        return ""
    return (f"note: val top-1 is {batch_top1:.1f}% with batch statistics but {eval_top1:.1f}% with BatchNorm's "
            "running statistics, which lag the weights in a short run; re-estimate them with --precise-bn 20")


def reestimate(model: nn.Module, loader, epoch: int, num_batches: int, autocast: Callable[[], object],
               device: torch.device) -> int:
    """``train.precise_bn=N`` after every epoch, before its val evaluation: the running statistics of the weights
    just trained, from the first N batches of epoch ``epoch``'s training order (every rank, summed over ranks), so
    that the val top-1 that chooses best.pt, the checkpoints and the final table all use them. Under the
    training autocast; the RNG is forked (a model with dropout trains as it would without this)."""
    from .distributed import all_reduce

    loader.set_epoch(epoch, 0)

    def forward(x):
        with autocast():
            model(x)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return update_bn_stats(model, loader, num_batches, forward, reduce=all_reduce)


def stale_stats_note(model: nn.Module, predict: Callable[[Tensor], list[Tensor]], val, history: list[dict]) -> str:
    """Without precise BN, at the end of a single-process run with a val split: the hint line when the last
    epoch's val top-1 with running statistics is far below the same weights' with batch statistics; else ''."""
    key = "val_branch0_top1"
    if val is None or not history or key not in history[-1]:
        return ""
    return hint(history[-1][key], batch_stats_top1(model, predict, val))
