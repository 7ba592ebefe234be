"""The end-of-run figure: train loss and val accuracy of the target branch and the TAs over epochs."""
from __future__ import annotations

from typing import Any


def plot_curves(history: list[dict[str, Any]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style, name in (("train_loss", "-", "loss"), ("train_ce", "--", "ce"), ("train_kd", ":", "kd (before kd_scale)")):
        if any(key in row for row in history):
            ax_loss.plot(epochs, [row.get(key, float("nan")) for row in history], style, label=name)
    ax_loss.set(xlabel="epoch", ylabel="train loss (mean over the epoch)", yscale="log")
    ax_loss.legend()
    acc_keys = [k for k in history[-1] if k.startswith("val_") and k.endswith("_top1")]
    for key in acc_keys:
        name = key[4:-5]
        target = name == "branch0"
        ax_acc.plot(epochs, [row.get(key, float("nan")) for row in history], lw=2.2 if target else 1.2,
                    label=f"{name} (target)" if target else name)
    if acc_keys:
        ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)")
        ax_acc.legend(fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, "no held-out val split", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
