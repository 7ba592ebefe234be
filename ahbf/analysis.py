"""Branch diversity: how different the branches of a multi-branch network are on a set of samples.

Homogenisation (SPEC 1) is the failure that AHBF claims to fix: branches that share a trunk and
distil from each other (or from one ensemble) drift towards the same function, so their ensemble
stops adding anything. Two measures, both averaged over all unordered pairs of branches:

- ``disagreement``: the fraction of samples on which the two branches' argmax differ (0 = identical
  predictions). It is bounded by the branches' error rates (two branches with 1% error each can
  disagree on at most 2% of the samples), so compare it between runs of similar accuracy.
- ``sym_kl``: the symmetric KL divergence between the two branches' softmax (at temperature ``T``),
  ``(KL(p || q) + KL(q || p)) / 2`` in nats, averaged over samples. It also sees differences in
  confidence that leave the argmax unchanged.

``ensemble_top1`` (given labels) is the top-1 of the mean of the branches' softmax: diversity is only
worth having if this beats the single branches.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def branch_diversity(logits: Sequence[Tensor], labels: Tensor | None = None, T: float = 1.0) -> dict[str, float]:
    """Mean pairwise disagreement and symmetric KL of ``logits`` (M tensors, N x K, same samples).

    Returns ``{"disagreement", "sym_kl", "pairs"}`` plus ``"ensemble_top1"`` (%) when ``labels`` is
    given. With fewer than two branches the pairwise measures are NaN (there is no pair).
    """
    if len(logits) == 0:
        raise ValueError("branch_diversity: no logits")
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) != 1 or logits[0].dim() != 2:
        raise ValueError(f"branch_diversity: expected M tensors of one shape N x K, got {sorted(shapes)}")
    if T <= 0:
        raise ValueError(f"branch_diversity: T must be > 0, got {T}")
    logp = [torch.log_softmax(z.float() / T, dim=-1) for z in logits]
    pred = [z.argmax(-1) for z in logits]
    pairs = list(combinations(range(len(logits)), 2))
    out: dict[str, float] = {"pairs": float(len(pairs))}
    if pairs:
        dis = [(pred[i] != pred[j]).float().mean().item() for i, j in pairs]
        kl = [0.5 * ((logp[i].exp() * (logp[i] - logp[j])).sum(-1)
                     + (logp[j].exp() * (logp[j] - logp[i])).sum(-1)).mean().item() for i, j in pairs]
        out["disagreement"] = sum(dis) / len(dis)
        out["sym_kl"] = sum(kl) / len(kl)
    else:
        out["disagreement"] = out["sym_kl"] = float("nan")
    if labels is not None:
        mean_p = torch.stack([lp.exp() for lp in logp]).mean(0)
        out["ensemble_top1"] = (mean_p.argmax(-1) == labels).float().mean().item() * 100.0
    return out
