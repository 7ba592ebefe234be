"""Run outputs on rank 0: console lines (through tqdm), metrics.csv, TensorBoard scalars."""
from __future__ import annotations

import csv
import os
from typing import Any

from tqdm import tqdm


class RunLogger:
    """Writes nothing on ranks other than 0. ``history`` rows (one per epoch) become metrics.csv."""

    def __init__(self, output: str, enabled: bool = True, tensorboard: bool = True):
        self.output, self.enabled, self.tensorboard = output, enabled, enabled and tensorboard
        self.tb = None  # created at the first scalar, so a run refused at start-up writes nothing

    def _writer(self):
        if self.tb is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.output, "tb"))
        return self.tb

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        writer = self._writer()
        if writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"{prefix}/{k}", v, step)

    def write_csv(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.csv from the whole history (so a resumed run has no duplicated rows)."""
        if not self.enabled or not history:
            return
        keys = list(dict.fromkeys(k for row in history for k in row))
        path = os.path.join(self.output, "metrics.csv")
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        os.replace(path + ".tmp", path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
