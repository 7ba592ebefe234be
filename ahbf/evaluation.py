"""Top-1 / top-5 accuracy and cross-entropy of every branch and every TA, weighted by samples.

Correct counts, loss sums and sample counts are summed over the whole split (and all-reduced as sums
under DDP), so the numbers are exact, not means of per-batch values.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_correct(logits: Sequence[Tensor], labels: Tensor, k: int = 5) -> Tensor:
    """N x 2 tensor: (top-1 correct, top-k correct) counts of each of the N logit tensors (B x K)."""
    stacked = torch.stack([z.float() for z in logits])  # N x B x K
    top = stacked.topk(min(k, stacked.shape[-1]), dim=-1).indices  # N x B x k
    hit = top == labels[None, :, None]
    return torch.stack([hit[..., 0].sum(-1), hit.any(-1).sum(-1)], dim=1)


def ce_sums(logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    """N float64 sums of the cross-entropy of each of the N logit tensors (B x K) over the batch."""
    return torch.stack([F.cross_entropy(z.float(), labels, reduction="sum") for z in logits]).double()


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Sequence[Tensor]], batches: Iterable[tuple[Tensor, Tensor]],
             names: Sequence[str], reduce: Callable[[Tensor], Tensor] = lambda t: t,
             device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """``{name: {"top1": %, "top5": %, "loss": mean cross-entropy}}`` over all batches, plus
    ``{"_samples": {"n": samples}}``; ``reduce`` all-reduces the sums (one float64 tensor: N top-1 and
    top-5 counts, N loss sums, the sample count).

    A rank whose shard is empty still takes part in ``reduce`` with zero counts (no DDP hang).
    """
    counts = torch.zeros(len(names), 2, dtype=torch.long, device=device)
    losses, samples = torch.zeros(len(names), dtype=torch.float64, device=device), 0
    for x, y in batches:
        logits = predict(x)
        counts = counts + topk_correct(logits, y).to(counts.device)
        losses = losses + ce_sums(logits, y).to(losses.device)
        samples += len(y)
    packed = torch.cat([counts.flatten().double(), losses, torch.tensor([samples], device=device, dtype=torch.float64)])
    total = reduce(packed).tolist()
    n = total[-1]
    if n == 0:
        raise ValueError("evaluation split is empty")
    k = len(names)
    out = {name: {"top1": total[2 * i] * 100.0 / n, "top5": total[2 * i + 1] * 100.0 / n, "loss": total[2 * k + i] / n}
           for i, name in enumerate(names)}
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
