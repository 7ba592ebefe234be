"""Top-1 / top-5 accuracy of every branch and every TA, weighted by samples.

Correct counts and sample counts are summed over the whole split (and all-reduced as sums under DDP),
so the accuracy is exact, not a mean of per-batch accuracies.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor


def topk_correct(logits: Sequence[Tensor], labels: Tensor, k: int = 5) -> Tensor:
    """N x 2 tensor: (top-1 correct, top-k correct) counts of each of the N logit tensors (B x K)."""
    stacked = torch.stack([z.float() for z in logits])  # N x B x K
    top = stacked.topk(min(k, stacked.shape[-1]), dim=-1).indices  # N x B x k
    hit = top == labels[None, :, None]
    return torch.stack([hit[..., 0].sum(-1), hit.any(-1).sum(-1)], dim=1)


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Sequence[Tensor]], batches: Iterable[tuple[Tensor, Tensor]],
             names: Sequence[str], reduce: Callable[[Tensor], Tensor] = lambda t: t,
             device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """``{name: {"top1": %, "top5": %}}`` over all batches; ``reduce`` all-reduces the counts (a sum).

    A rank whose shard is empty still takes part in ``reduce`` with zero counts (no DDP hang).
    """
    counts, samples = torch.zeros(len(names), 2, dtype=torch.long, device=device), 0
    for x, y in batches:
        counts = counts + topk_correct(predict(x), y).to(counts.device)
        samples += len(y)
    total = reduce(torch.cat([counts.flatten(), torch.tensor([samples], device=counts.device)]).double())
    n = total[-1].item()
    if n == 0:
        raise ValueError("evaluation split is empty")
    acc = (total[:-1].view(-1, 2) * 100.0 / n).tolist()
    out = {name: {"top1": a[0], "top5": a[1]} for name, a in zip(names, acc)}
    out["_samples"] = {"n": int(n)}
    return out


def format_table(metrics: dict[str, dict[str, float]], title: str = "") -> str:
    """A plain-text table: one row per branch / TA, top-1 and top-5 in %."""
    rows = [(name, m["top1"], m["top5"]) for name, m in metrics.items() if not name.startswith("_")]
    width = max(len(label(r[0])) for r in rows)
    lines = [title] if title else []
    lines.append(f"{'node':<{width}}  {'top-1':>7}  {'top-5':>7}")
    lines += [f"{label(name):<{width}}  {t1:7.2f}  {t5:7.2f}" for name, t1, t5 in rows]
    if "_samples" in metrics:
        lines.append(f"({metrics['_samples']['n']} samples)")
    return "\n".join(lines)


def label(name: str) -> str:
    return f"{name} (target)" if name == "branch0" else name
