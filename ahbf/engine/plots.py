"""The end-of-run figure: train loss terms, val accuracy of the target branch and the TAs, and the
learning rate and KD weight over epochs."""
from __future__ import annotations

import math
from typing import Any, Sequence


def zoomed_limits(series: Sequence[Sequence[float]], margin: float = 0.1) -> tuple[float, float] | None:
    """Accuracy-axis limits around the data of the later epochs (from the first quarter on), so the
    95-99% range where branches differ is not squashed by a 0-100 axis or by the first epochs' values."""
    values = [v for s in series for v in s[len(s) // 4:] if not math.isnan(v)]
    if not values:
        return None
    low, high = min(values), max(values)
    pad = max((high - low) * margin, 0.5)
    return max(0.0, low - pad), min(100.0, high + pad)


def plot_curves(history: list[dict[str, Any]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    for key, style, name in (("train_loss", "-", "loss"), ("train_ce", "--", "ce"), ("train_kd", ":", "kd (before kd_scale)")):
        if any(key in row for row in history):
            ax_loss.plot(epochs, [row.get(key, float("nan")) for row in history], style, label=name)
    if any("val_branch0_loss" in row for row in history):
        ax_loss.plot(epochs, [row.get("val_branch0_loss", float("nan")) for row in history], "-.",
                     label="val ce of the target")
    ax_loss.set(xlabel="epoch", ylabel="loss (mean over the epoch)", yscale="log")
    ax_loss.legend(fontsize=8)
    acc_keys = [k for k in history[-1] if k.startswith("val_") and k.endswith("_top1")]
    series = []
    for key in acc_keys:
        name = key[4:-5]
        target = name == "branch0"
        series.append([row.get(key, float("nan")) for row in history])
        ax_acc.plot(epochs, series[-1], lw=2.2 if target else 1.2, label=f"{name} (target)" if target else name)
    if acc_keys:
        limits = zoomed_limits(series)
        ax_acc.set(xlabel="epoch", ylabel="val top-1 (%), zoomed to the data")
        if limits:
            ax_acc.set_ylim(*limits)
        ax_acc.legend(fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, "no held-out val split", ha="center", va="center", transform=ax_acc.transAxes)
    ax_lr.plot(epochs, [row.get("lr", float("nan")) for row in history], color="C0", label="lr (end of epoch)")
    ax_lr.set(xlabel="epoch", ylabel="learning rate")
    ax_kd = ax_lr.twinx()
    ax_kd.plot(epochs, [row.get("kd_scale", float("nan")) for row in history], color="C3", ls="--", label="kd_scale")
    ax_kd.set_ylabel("kd_scale (KD weight of the epoch)")
    handles = ax_lr.get_legend_handles_labels()[0] + ax_kd.get_legend_handles_labels()[0]
    ax_lr.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="center right")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
