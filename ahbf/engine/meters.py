"""Device-side running sums of the loss terms: no host sync per step."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .distributed import all_reduce

NEVER = 2 ** 62


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite (reported as one line by the CLI)."""


class LossMeter:
    """Sums the named loss terms on the device and remembers the first step whose loss is not finite.

    ``update`` launches a few tiny ops and never syncs; ``read`` (at the log interval) syncs once,
    all-reduces across ranks and raises ``NonFiniteLossError`` naming the step.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] | None = None
        self.first_bad = torch.full((), NEVER, dtype=torch.int64, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums: Tensor | None = None
        self.count = 0
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0

    def update(self, terms: dict[str, Tensor], step: int) -> None:
        if self.names is None:
            self.names = list(terms)
        values = torch.stack([terms[n].detach() for n in self.names])
        values = values.to(torch.promote_types(values.dtype, torch.float32))  # fp16 / bf16 -> fp32; fp64 stays
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1
        bad = ~torch.isfinite(values[0]) & (self.first_bad == NEVER)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def read(self) -> dict[str, float]:
        """Mean of each term since the last reset (over steps and ranks); raises on a non-finite loss."""
        first_bad = all_reduce(self.first_bad.clone(), op="min").item()
        if first_bad != NEVER:
            sums = self.sums.tolist() if self.sums is not None else []
            terms = [n for n, v in zip(self.names or [], sums) if not math.isfinite(v)]
            raise NonFiniteLossError(f"non-finite loss at step {first_bad} (non-finite terms: "
                                     f"{', '.join(terms) or 'loss'}); try a lower --lr, --clip-grad or --precision fp32")
        if self.sums is None:
            return {}
        packed = all_reduce(torch.cat([self.sums, torch.tensor([self.count], device=self.device, dtype=self.sums.dtype)]))
        *sums, count = packed.tolist()
        for n, v in zip(self.names, sums):
            self.epoch_sums[n] = self.epoch_sums.get(n, 0.0) + v
        self.epoch_count += count
        self.sums, self.count = None, 0
        return {n: v / count for n, v in zip(self.names, sums)}

    def state_dict(self) -> dict:
        """The epoch's sums so far (call ``read`` first): a mid-epoch checkpoint keeps the epoch's means exact."""
        return {"names": self.names, "epoch_sums": dict(self.epoch_sums), "epoch_count": self.epoch_count}

    def load_state_dict(self, state: dict) -> None:
        self.names = state["names"]
        self.epoch_sums, self.epoch_count = dict(state["epoch_sums"]), state["epoch_count"]

    def read_epoch(self) -> dict[str, float]:
        """Mean of each term over the whole epoch (all ranks); resets the meter."""
        self.read()
        means = {n: v / max(1, self.epoch_count) for n, v in self.epoch_sums.items()}
        self.reset()
        return means
