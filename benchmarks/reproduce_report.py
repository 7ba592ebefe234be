"""benchmarks/reproduce.py's report: statistics over seeds (mean +- std, paired differences, sign and t tests),
the markdown table and the figures. Reads only the runs' JSON records, so ``--replot`` needs no training."""
from __future__ import annotations

import math
import os
import statistics
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ahbf.methods import METHODS as TABLE

if TYPE_CHECKING:
    from reproduce import Protocol

METHODS = tuple(TABLE)  # the comparison's order: ahbf.methods lists the baseline first, AHBF last
LABELS = {name: m.label for name, m in TABLE.items()}
COLORS = {"baseline": "tab:gray", "dml": "tab:blue", "one": "tab:orange", "cl_ilr": "tab:purple", "okddip": "tab:brown",
          "kdcl": "tab:pink", "pcl": "tab:olive", "ahbf": "tab:green"}


# ------------------------------------------------------------------------------------------ statistics

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """AHBF-minus-other differences over the seeds both have: mean +- standard error, signs, p-values."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    mean = statistics.fmean(d) if d else float("nan")
    sd = statistics.stdev(d) if n > 1 else float("nan")
    se = sd / math.sqrt(n) if n > 1 else float("nan")
    wins, ties, losses = sum(x > 0 for x in d), sum(x == 0 for x in d), sum(x < 0 for x in d)
    t_p = float("nan")
    if n > 1 and sd > 0:
        try:
            from scipy import stats
            t_p = float(stats.t.sf(abs(mean / se), n - 1) * 2)
        except ImportError:  # scipy comes with scikit-learn; keep going without it
            pass
    return {"seeds": seeds, "diffs": d, "mean": mean, "se": se, "wins": wins, "ties": ties, "losses": losses,
            "sign_p": sign_test_p(wins, losses), "t_p": t_p}


def summarise(runs: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"methods": {}, "paired": {}, "paired_disagreement": {}}
    by = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"]) for m in methods}
    for m, rs in by.items():
        if not rs:
            continue
        nodes = list(rs[0]["test"])
        out["methods"][m] = {
            "n": len(rs),
            "target_top1": mean_std([r["target_top1"] for r in rs]),
            "nodes": {n: mean_std([r["test"][n]["top1"] for r in rs]) for n in nodes},
            "ensemble_top1": mean_std([r["ensemble_top1"] for r in rs]),
            "ensemble_gain": mean_std([r["ensemble_top1"] - r["target_top1"] for r in rs
                                       if r["ensemble_top1"] is not None]),
            "disagreement": mean_std([r["disagreement"] for r in rs]),
            "sym_kl": mean_std([r["sym_kl"] for r in rs]),
            "train_s": mean_std([r["train_s"] for r in rs]),
            "params": rs[0]["params"],
            "per_seed": {r["seed"]: r["target_top1"] for r in rs},
            "per_seed_disagreement": {r["seed"]: r["disagreement"] for r in rs if r["disagreement"] is not None},
        }
    if "ahbf" in out["methods"]:
        for m in methods:
            if m != "ahbf" and m in out["methods"]:
                a, b = out["methods"]["ahbf"], out["methods"][m]
                out["paired"][m] = paired(a["per_seed"], b["per_seed"])
                if b["per_seed_disagreement"]:  # in points of % of test images
                    out["paired_disagreement"][m] = paired(
                        {k: 100 * v for k, v in a["per_seed_disagreement"].items()},
                        {k: 100 * v for k, v in b["per_seed_disagreement"].items()})
    return out


# ------------------------------------------------------------------------------------------ outputs

def fmt(ms: tuple[float, float], digits: int = 2) -> str:
    m, s = ms
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def target_params(arch: str, num_classes: int = 10) -> int:
    from ahbf.models import create_plain
    return sum(t.numel() for t in create_plain(arch, num_classes).parameters())


def markdown(p: Protocol, summary: dict[str, Any], runs: list[dict[str, Any]], meta: dict[str, Any],
             files: dict[str, str]) -> str:
    ms = summary["methods"]
    n_train = runs[0]["train_samples"] if runs else 0
    n_test = runs[0]["test_samples"] if runs else 0
    lines = [
        "# Reproduction at small scale: Baseline vs DML, ONE, CL-ILR, OKDDip, KDCL, PCL and AHBF on low-data digits",
        "",
        f"Command: `{meta['command'].strip()}`"
        + (f" (tables and figures rewritten from the JSON by `--replot` on {meta['replotted']}; same numbers)"
           if meta.get("replotted") else ""),
        "",
        f"Protocol: the deployed network is the same plain {p.arch} for every method ({target_params(p.arch):,} "
        f"params; trunk + branch 0 of the multi-branch models); "
        f"{p.num_branches} branches / peers for every multi-branch method (OKDDip: a leader + {p.num_branches - 1} "
        f"peers), AHBF aux = SPEC default; "
        f"digits upscaled to {p.image_size}x{p.image_size} RGB; {p.per_class} training images per class "
        f"({n_train} in all, a stratified subset of the fixed training split drawn per seed, the same for every "
        f"method); test = the fixed digits test split ({n_test} images), evaluated at the last epoch (no validation "
        f"split, no checkpoint selection). {p.epochs} epochs, batch {p.batch_size}, SGD nesterov lr {p.lr}, "
        f"wd {p.weight_decay}, lr x0.1 at epochs {p.milestone_epochs()}, warm-up {p.warmup_epochs} epochs; "
        f"random crop (pad {max(1, p.image_size // 8)}), no flip; {p.precision}; objective backend "
        f"{p.objective_backend}; ramp-up R = {round(p.rampup_fraction * p.epochs, 3)} epochs (AHBF's sigmoid, "
        f"the consistency ramp of CL-ILR / OKDDip / PCL); every other objective value is the engine's method "
        f"default (docs/methods.md: T = 3; kd_weight 1.5 AHBF, else 1; KDCL MinLogit; PCL EMA decay 0.999). "
        f"Seeds {p.seeds}: seed s sets the subset, the model init and the batch order / augmentation.",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; total wall time "
        f"{meta['total_s'] / 60:.1f} min for {len(runs)} runs (1-min load average {meta['loadavg_start']:.1f} at the "
        f"start, {meta.get('loadavg_end', float('nan')):.1f} at the end: the CPU was shared).",
        "",
        "## Target branch (the deployed network), test top-1 %",
        "",
        "| method | target top-1 (mean ± std) | min | max | seeds | params trained | train time / run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, s in ms.items():
        v = list(s["per_seed"].values())
        lines.append(f"| {LABELS[m]} | {fmt(s['target_top1'])} | {min(v):.2f} | {max(v):.2f} | {s['n']} | "
                     f"{s['params']:,} | {s['train_s'][0]:.0f} |")
    lines += ["", "## Every branch and TA / ensemble, test top-1 % (mean ± std over seeds)", "",
              "branch0 is the target; AHBF's ta0..ta2 are its teacher assistants (ta2 the strongest), ONE's ta0 is "
              "its gated ensemble; the other methods' nodes are named in docs/methods.md (PCL's ema_branch* are the "
              "temporal-mean peers). 'mean-softmax ens.' averages the branches' softmax (not a deployed model).", "",
              "| method | every node | mean-softmax ens. |", "|---|---|---|"]
    for m, s in ms.items():
        cells = "; ".join(f"{n} {fmt(v)}" for n, v in s["nodes"].items())
        lines.append(f"| {LABELS[m]} | {cells} | {fmt(s['ensemble_top1'])} |")
    if summary["paired"]:
        lines += ["", "## Paired comparison per seed: AHBF target minus the other method's target (points of top-1)",
                  "", "Same seed = same training subset, batch order and augmentation. Mean ± standard error over "
                  "seeds; wins / ties / losses of AHBF; two-sided exact sign test and paired t-test p-values. "
                  f"With {len(p.seeds)} seeds the sign test cannot go below "
                  f"{sign_test_p(len(p.seeds), 0):.3f}.", "",
                  "| AHBF vs | per-seed differences | mean ± s.e. | W / T / L | sign p | t p |", "|---|---|---|---|---|---|"]
        for m, d in summary["paired"].items():
            diffs = ", ".join(f"{x:+.2f}" for x in d["diffs"])
            lines.append(f"| {LABELS[m]} | {diffs} | {d['mean']:+.2f} ± {d['se']:.2f} | {d['wins']} / {d['ties']} / "
                         f"{d['losses']} | {d['sign_p']:.3f} | {d['t_p']:.3f} |")
    div = [(m, s) for m, s in ms.items() if m != "baseline"]
    if div:
        lines += ["", "## Branch diversity at the last epoch (test split, mean ± std over seeds)", "",
                  "Mean over the 6 branch pairs: disagreement = fraction of test images whose argmax differs; "
                  "sym. KL = (KL(p||q) + KL(q||p)) / 2 of the branches' softmax at T = 1, nats. "
                  "Disagreement is bounded by the branches' error rates.", "",
                  "| method | disagreement (%) | sym. KL (nats) | mean-softmax ensemble minus target (points) |",
                  "|---|---|---|---|"]
        for m, s in div:
            d = s["disagreement"]
            lines.append(f"| {LABELS[m]} | {fmt((d[0] * 100, d[1] * 100))} | {fmt(s['sym_kl'], 3)} | "
                         f"{fmt(s['ensemble_gain'])} |")
        if summary.get("paired_disagreement"):
            lines += ["", "Paired per seed, AHBF disagreement minus the other method's (points of % of test images):", "",
                      "| AHBF vs | mean ± s.e. | W / T / L (AHBF more diverse) | sign p | t p |", "|---|---|---|---|---|"]
            for m, d in summary["paired_disagreement"].items():
                lines.append(f"| {LABELS[m]} | {d['mean']:+.2f} ± {d['se']:.2f} | {d['wins']} / {d['ties']} / "
                             f"{d['losses']} | {d['sign_p']:.3f} | {d['t_p']:.3f} |")
    lines += ["", "## Per-seed target top-1 %", "", "| seed | " + " | ".join(LABELS[m] for m in ms) + " |",
              "|---" * (len(ms) + 1) + "|"]
    for seed in p.seeds:
        cells = [f"{ms[m]['per_seed'][seed]:.2f}" if seed in ms[m]["per_seed"] else "" for m in ms]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""] + [f"- {k}: `{os.path.basename(v)}`" for k, v in files.items()]
    lines += ["", f"Raw per-seed numbers and per-epoch curves: `{os.path.basename(files['json'])}`.", ""]
    return "\n".join(lines)


def plot_all(p: Protocol, summary: dict[str, Any], runs: list[dict[str, Any]], files: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = summary["methods"]
    # bar chart: target top-1, mean +- std, with the per-seed points
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (m, s) in enumerate(ms.items()):
        mean, sd = s["target_top1"]
        ax.bar(i, mean, yerr=sd, capsize=6, color=COLORS[m], alpha=0.8)
        pts = list(s["per_seed"].values())
        ax.scatter([i + 0.0] * len(pts), pts, color="k", s=12, zorder=3)
        ax.text(i + 0.38, mean, f"{mean:.2f}", ha="right", va="bottom", fontsize=9)
    lo = min(min(s["per_seed"].values()) for s in ms.values())
    hi = max(max(s["per_seed"].values()) for s in ms.values())
    ax.set_ylim(max(0, lo - 3), min(100.5, hi + 2))
    ax.set_xticks(range(len(ms)), [LABELS[m] for m in ms])
    ax.set_ylabel("target branch test top-1 (%)")
    ax.set_title(f"{p.arch} on digits, {p.per_class}/class, {len(p.seeds)} seeds (mean ± std, dots = seeds)",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(files["bar"], dpi=120)
    plt.close(fig)

    def band(ax, m, key, scale=1.0, label=None, style="-", minus=None):
        rs = [r for r in runs if r["method"] == m and key in r["curves"]]
        if not rs:
            return
        ep = np.array(rs[0]["curves"]["epoch"])
        a = np.array([r["curves"][key] for r in rs], dtype=float) * scale
        if minus is not None:
            a = a - np.array([r["curves"][minus] for r in rs], dtype=float) * scale
        mu, sd = a.mean(0), (a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1]))
        ax.plot(ep, mu, style, color=COLORS[m], label=label or LABELS[m])
        ax.fill_between(ep, mu - sd, mu + sd, color=COLORS[m], alpha=0.15)

    # accuracy curves: target per method (left); AHBF's every node (right)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for m in ms:
        band(a1, m, "test_branch0_top1")
    a1.set(xlabel="epoch", ylabel="target branch test top-1 (%)", title="target branch, mean ± std over seeds")
    a1.legend()
    if "ahbf" in ms:
        names = list(ms["ahbf"]["nodes"])
        cmap = plt.get_cmap("viridis")
        rs = [r for r in runs if r["method"] == "ahbf"]
        ep = np.array(rs[0]["curves"]["epoch"])
        for j, name in enumerate(names):
            a = np.array([r["curves"][f"test_{name}_top1"] for r in rs], dtype=float)
            mu = a.mean(0)
            a2.plot(ep, mu, "-" if name.startswith("branch") else "--", color=cmap(j / max(1, len(names) - 1)),
                    lw=2.2 if name == "branch0" else 1.2, label=name + (" (target)" if name == "branch0" else ""))
        a2.set(xlabel="epoch", ylabel="test top-1 (%)", title="AHBF: every branch (solid) and TA (dashed), mean")
        a2.legend(fontsize=8)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        lo = min([min(r["curves"]["test_branch0_top1"][len(r["curves"]["test_branch0_top1"]) // 3:] or [0])
                  for r in runs] or [0])
        a.set_ylim(max(0, lo - 5), 100.5)
    fig.tight_layout()
    fig.savefig(files["curves"], dpi=120)
    plt.close(fig)

    # diversity over training
    fig, (d1, d2, d3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in ms:
        if m == "baseline":
            continue
        band(d1, m, "div_disagreement", 100.0)
        band(d2, m, "div_sym_kl")
        band(d3, m, "test_branch_ensemble_top1", minus="test_branch0_top1")
    d1.set(xlabel="epoch", ylabel="mean pairwise disagreement (% of test images)", title="branch disagreement")
    d2.set(xlabel="epoch", ylabel="mean pairwise symmetric KL (nats, T=1)", title="branch symmetric KL",
           yscale="log")
    d3.axhline(0, color="k", lw=0.8)
    d3.set(xlabel="epoch", ylabel="ensemble top-1 minus target top-1 (points)",
           title="what diversity buys: ensemble - target")
    d3.set_ylim(-4, 8)
    for a in (d1, d2, d3):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("homogenisation check: diversity between branches over training (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(files["diversity"], dpi=120)
    plt.close(fig)
