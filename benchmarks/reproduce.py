"""The paper's comparison (SPEC 8) at small scale: Baseline vs DML, ONE, CL-ILR, OKDDip, KDCL, PCL and AHBF
on a low-data digits split.

    python benchmarks/reproduce.py                       # the committed protocol: 40 runs, 7.7 min measured
                                                         # on a shared 2-core CPU (docs/reproduce.md)
    python benchmarks/reproduce.py --seeds 0 1 --epochs 1 --per-class 5 --name smoke --out /tmp/r
    python benchmarks/reproduce.py --replot              # rewrite table + figures from the JSON, no training

Every method trains the same target network (trunk + branch 0 = a plain ResNet) through the real
engine (``ahbf.engine.run.build_run`` on the low-data bundle, then ``ahbf.engine.trainer.Trainer``) with
the same epochs, schedule, optimiser, batches and augmentation; only the method (model + distillation
graph) changes. Regime: a stratified low-data subset (``--per-class`` images per class, drawn per seed) of
the fixed digits training split, because on the full split every method sits at the ceiling (see
docs/reproduce.md). No validation split and no checkpoint selection: the reported numbers are the last
epoch's, on the fixed digits test split.

Per epoch, on the test split, a probe records every node's top-1 and the branch diversity
(``ahbf.analysis.branch_diversity``): mean pairwise disagreement and symmetric KL between the branches.
The probe only observes: it never chooses anything.

Outputs (``--out``, default benchmarks/results): ``reproduce_<name>.json`` (protocol, every run's
per-epoch curves and final numbers), ``reproduce_<name>.md`` (tables, paired comparison, the command),
``reproduce_<name>.png`` (target top-1, mean +- std over seeds), ``reproduce_<name>_curves.png``
(test top-1 vs epoch) and ``reproduce_<name>_diversity.png`` (diversity vs epoch).
``--resume`` reuses the finished runs of an interrupted invocation with the same protocol.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ahbf.analysis import branch_diversity
from ahbf.engine.config import build_config
from ahbf.engine.distributed import DistEnv
from ahbf.engine.run import Run, build_run
from ahbf.engine.trainer import Trainer
from ahbf.methods import METHODS as TABLE
from ahbf.pipelines import DataBundle, DeviceTensorLoader
from ahbf.pipelines.sources import STATS, digits_arrays
from machine import cpu_name

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = tuple(TABLE)  # the comparison's order: ahbf.methods lists the baseline first, AHBF last
LABELS = {name: m.label for name, m in TABLE.items()}
COLORS = {"baseline": "tab:gray", "dml": "tab:blue", "one": "tab:orange", "cl_ilr": "tab:purple", "okddip": "tab:brown",
          "kdcl": "tab:pink", "pcl": "tab:olive", "ahbf": "tab:green"}


@dataclass
class Protocol:
    """Everything that defines the comparison; identical for every method."""

    seeds: list[int] = field(default_factory=lambda: list(range(10)))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    arch: str = "resnet8"
    num_branches: int = 4
    image_size: int = 16
    per_class: int = 10
    epochs: int = 100
    batch_size: int = 25
    eval_batch_size: int = 256
    lr: float = 0.02  # the paper's 0.1 at batch 128, scaled linearly to batch 25 (0.1 diverged for AHBF's deep branches)
    weight_decay: float = 5e-4
    milestones: tuple[float, float] = (0.5, 0.75)  # fractions of the epochs (paper: 150, 225 of 300)
    warmup_epochs: float = 2.0  # the engine's default
    rampup_fraction: float = 0.8  # AHBF's sigmoid ramp length R as a fraction of the epochs (paper: 240 of 300)
    precision: str = "fp32"
    objective_backend: str = "eager"
    probe_every: int = 4

    def milestone_epochs(self) -> list[int]:
        return sorted({max(1, int(round(f * self.epochs))) for f in self.milestones})

    def overrides(self, method: str, seed: int, output: str) -> list[tuple[str, Any]]:
        """The engine config of one run: ``section.key`` overrides of the built-in defaults."""
        return [
            ("model.arch", self.arch), ("model.method", method), ("model.num_branches", self.num_branches),
            ("data.dataset", "digits"), ("data.image_size", self.image_size), ("data.batch_size", self.batch_size),
            ("data.eval_batch_size", self.eval_batch_size), ("data.val_fraction", 0.0), ("data.seed", seed),
            ("optim.lr", self.lr), ("optim.weight_decay", self.weight_decay),
            ("schedule.name", "multistep"), ("schedule.milestones", self.milestone_epochs()),
            ("schedule.warmup_epochs", self.warmup_epochs),
            ("objective.rampup", round(self.rampup_fraction * self.epochs, 3)),
            ("objective.backend", self.objective_backend),
            ("train.epochs", self.epochs), ("train.seed", seed), ("train.device", "cpu"),
            ("train.precision", self.precision), ("train.output", output), ("train.progress", False),
            ("train.tensorboard", False), ("train.log_interval", 10 ** 6),
        ]

    def key(self) -> dict[str, Any]:
        """The protocol minus the run list (what ``--resume`` must match)."""
        d = dataclasses.asdict(self)
        d.pop("seeds"), d.pop("methods")
        d["milestones"] = list(d["milestones"])
        return d


# ------------------------------------------------------------------------------------------- data

def low_data_split(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` samples of every class, drawn without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    idx = []
    for c in np.unique(y):
        pool = np.flatnonzero(y == c)
        if per_class > len(pool):
            raise ValueError(f"per_class={per_class} but class {c} has only {len(pool)} training images")
        idx.append(rng.choice(pool, per_class, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(idx)))


def low_data_bundle(p: Protocol, seed: int, device: torch.device) -> DataBundle:
    """The digits pipeline of ``ahbf.pipelines`` (same arrays, normalisation, crop padding, no flip) on a
    seeded low-data subset of the fixed training split; the test split is the pipeline's, whole."""
    (x, y), (xt, yt), k = digits_arrays(p.image_size)
    idx = low_data_split(y, p.per_class, seed)
    mean, std = STATS["digits"]
    common = dict(mean=mean, std=std, device=device)
    train = DeviceTensorLoader(x[idx], y[idx], p.batch_size, train=True, pad=max(1, p.image_size // 8), flip=False,
                               seed=seed, **common)
    test = DeviceTensorLoader(xt, yt, p.eval_batch_size, train=False, **common)
    return DataBundle(train, None, test, k, p.image_size)


# ------------------------------------------------------------------------------------------ the probe

class Probe:
    """Per-epoch test top-1 of every node and the diversity of the branches of ``run`` (every ``every``
    epochs and the last; observed, never used to choose): a ``Trainer`` probe."""

    def __init__(self, run: Run, every: int = 1):
        self.run, self.every = run, every

    def __call__(self, epoch: int) -> dict[str, float]:
        return self.probe() if epoch % self.every == 0 or epoch == self.run.cfg.train.epochs else {}

    @torch.no_grad()
    def probe(self) -> dict[str, float]:
        run = self.run
        run.model.eval()
        try:
            cols, labels = None, []
            for x, y in run.data.test:
                out = [z.float() for z in run.task.predict(x)]
                cols = [[z] for z in out] if cols is None else [c + [z] for c, z in zip(cols, out)]
                labels.append(y)
        finally:
            run.model.train()
        nodes, y = [torch.cat(c) for c in cols], torch.cat(labels)
        row = {f"test_{name}_top1": (z.argmax(-1) == y).float().mean().item() * 100.0
               for name, z in zip(run.task.node_names, nodes)}
        m = run.cfg.model.num_branches  # the trainable branches / peers (nodes 0..M-1 of every graph)
        if m > 1:
            div = branch_diversity(nodes[:m], y)
            row.update(div_disagreement=div["disagreement"], div_sym_kl=div["sym_kl"],
                       test_branch_ensemble_top1=div["ensemble_top1"])
        return row


def run_one(p: Protocol, method: str, seed: int, work_dir: str) -> dict[str, Any]:
    """Train one (method, seed) through the engine; return its final test numbers and per-epoch curves."""
    output = os.path.join(work_dir, f"{method}_s{seed}")
    cfg = build_config(overrides=p.overrides(method, seed, output))
    env = DistEnv(0, 0, 1, torch.device("cpu"))
    start = time.perf_counter()
    run = build_run(cfg, env, data=low_data_bundle(p, seed, env.device))  # the schedule: this bundle's steps
    trainer = Trainer(run, checkpoints=False, probes=[Probe(run, p.probe_every)])  # no checkpoints needed
    summary = trainer.fit()
    wall = time.perf_counter() - start
    test = {k: v for k, v in summary["test"].items() if not k.startswith("_")}
    last = trainer.history[-1]
    keys = [k for k in last if k.startswith(("test_", "div_"))] + ["train_loss"]
    probed = [r for r in trainer.history if "test_branch0_top1" in r]
    curves = {k: [r[k] for r in probed] for k in ["epoch"] + keys}
    n_params = sum(t.numel() for t in trainer.model.parameters())
    return {"method": method, "seed": seed, "test": test, "target_top1": test["branch0"]["top1"],
            "ensemble_top1": last.get("test_branch_ensemble_top1"), "disagreement": last.get("div_disagreement"),
            "sym_kl": last.get("div_sym_kl"), "curves": curves, "train_s": summary["train_s"], "wall_s": wall,
            "params": n_params, "train_samples": trainer.data.train.num_samples,
            "test_samples": summary["test"]["_samples"]["n"], "config": cfg.to_dict()}


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


# ------------------------------------------------------------------------------------------ entry points

def output_files(out_dir: str, name: str) -> dict[str, str]:
    base = os.path.join(out_dir, f"reproduce_{name}")
    return {"json": base + ".json", "md": base + ".md", "bar": base + ".png", "curves": base + "_curves.png",
            "diversity": base + "_diversity.png"}


def shell_command(argv: Sequence[str]) -> str:
    return " ".join(["python", "benchmarks/reproduce.py", *map(shlex.quote, argv)])


def replot(out_dir: str = RESULTS, name: str = "digits") -> dict[str, Any]:
    """Rewrite the markdown and the figures from the JSON of a finished run (no training)."""
    files = output_files(out_dir, name)
    with open(files["json"]) as f:
        result = json.load(f)
    d = result["protocol"]
    p = Protocol(**{**d, "milestones": tuple(d["milestones"])})
    runs = result["runs"]
    summary = summarise(runs, [m for m in METHODS if m in p.methods])  # recomputed with this code's statistics
    result["summary"] = summary
    result["meta"]["replotted"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with open(files["md"], "w") as f:
        f.write(markdown(p, summary, runs, result["meta"], files))
    plot_all(p, summary, runs, files)
    with open(files["json"] + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(files["json"] + ".tmp", files["json"])
    return result


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}"


def reproduce(protocol: Protocol | None = None, out_dir: str = RESULTS, name: str = "digits",
              work_dir: str | None = None, resume: bool = False, plots: bool = True,
              command: str | None = None, log=print, threads: int = 1) -> dict[str, Any]:
    """Run every (seed, method) of ``protocol`` (seed-major, so a partial run stays balanced), then write
    the JSON, the markdown table and the figures. Returns ``{"protocol", "meta", "summary", "runs"}``.

    ``threads``: torch CPU threads while it runs (restored after; 0 = leave torch's setting). One thread
    is the default: these tiny models lose to thread contention on a shared CPU (measured ~6x slower
    per step with 2 threads while other jobs ran)."""
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _reproduce(protocol, out_dir, name, work_dir, resume, plots, command, log)
    finally:
        torch.set_num_threads(saved_threads)


def _reproduce(protocol, out_dir, name, work_dir, resume, plots, command, log) -> dict[str, Any]:
    p = protocol or Protocol()
    unknown = [m for m in p.methods if m not in METHODS]
    if unknown or not p.methods or not p.seeds:
        raise ValueError(f"methods must be a non-empty subset of {METHODS} (got {p.methods}); seeds non-empty")
    os.makedirs(out_dir, exist_ok=True)
    files = output_files(out_dir, name)
    work_dir = work_dir or os.path.join("runs", f"reproduce_{name}")
    command = command or shell_command(sys.argv[1:])
    runs: list[dict[str, Any]] = []
    if resume and os.path.isfile(files["json"]):
        with open(files["json"]) as f:
            old = json.load(f)
        if old.get("protocol_key") == p.key():
            runs = [r for r in old["runs"] if r["method"] in p.methods and r["seed"] in p.seeds]
            log(f"resume: {len(runs)} finished runs reused from {files['json']}")
        else:
            log(f"resume: {files['json']} has another protocol; starting afresh")
    done = {(r["method"], r["seed"]) for r in runs}
    prior_s = sum(r["wall_s"] for r in runs)
    meta = {"command": command, "machine": machine(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "total_s": prior_s,
            "loadavg_start": os.getloadavg()[0]}
    start = time.perf_counter()

    def write(final: bool) -> dict[str, Any]:
        meta["total_s"] = prior_s + time.perf_counter() - start
        meta["loadavg_end"] = os.getloadavg()[0]
        summary = summarise(runs, [m for m in METHODS if m in p.methods])
        result = {"protocol": dataclasses.asdict(p), "protocol_key": p.key(), "meta": meta, "summary": summary,
                  "runs": runs, "complete": final}
        with open(files["json"] + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(files["json"] + ".tmp", files["json"])
        return result

    todo = [(m, s) for s in p.seeds for m in p.methods if (m, s) not in done]
    for i, (m, s) in enumerate(todo):
        t0 = time.perf_counter()
        r = run_one(p, m, s, work_dir)
        runs.append(r)
        write(final=False)
        log(f"[{i + 1}/{len(todo)}] {m:8s} seed {s}: target top-1 {r['target_top1']:.2f}%  "
            f"({time.perf_counter() - t0:.0f} s; {(time.perf_counter() - start) / 60:.1f} min so far)")
    result = write(final=True)
    with open(files["md"], "w") as f:
        f.write(markdown(p, result["summary"], runs, meta, files))
    if plots:
        plot_all(p, result["summary"], runs, files)
    log(f"wrote {', '.join(v for k, v in files.items() if plots or k in ('json', 'md'))}")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Protocol()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=d.seeds)
    ap.add_argument("--methods", nargs="+", default=d.methods, choices=METHODS)
    ap.add_argument("--arch", default=d.arch)
    ap.add_argument("--num-branches", type=int, default=d.num_branches)
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--per-class", type=int, default=d.per_class, help="training images per class (low-data subset)")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--wd", type=float, default=d.weight_decay)
    ap.add_argument("--precision", default=d.precision, choices=("fp32", "bf16"))
    ap.add_argument("--objective-backend", default=d.objective_backend, choices=("eager", "compiled", "auto"))
    ap.add_argument("--probe-every", type=int, default=d.probe_every, help="epochs between test/diversity probes")
    ap.add_argument("--out", default=RESULTS, help="folder of the JSON / markdown / PNG outputs")
    ap.add_argument("--name", default="digits", help="outputs are reproduce_<name>.*")
    ap.add_argument("--work-dir", default=None, help="engine run folders [default runs/reproduce_<name>]")
    ap.add_argument("--resume", action="store_true", help="reuse finished runs of the same protocol in the JSON")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--replot", action="store_true",
                    help="only rewrite the markdown and figures from the JSON of a finished run (no training)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads [default 1: these tiny models lose to thread contention on a shared "
                         "CPU (measured ~6x slower per step with 2 threads while other jobs ran); 0 = torch's]")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.replot:
        replot(a.out, a.name)
        return 0
    p = Protocol(seeds=a.seeds, methods=a.methods, arch=a.arch, num_branches=a.num_branches, image_size=a.image_size,
                 per_class=a.per_class, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.wd,
                 precision=a.precision, objective_backend=a.objective_backend, probe_every=a.probe_every)
    argv = sys.argv[1:] if argv is None else argv
    reproduce(p, a.out, a.name, a.work_dir, a.resume, not a.no_plots,
              command=shell_command(argv), threads=a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
