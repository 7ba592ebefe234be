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
import os
import platform
import shlex
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
from ahbf.pipelines import DataBundle, DeviceTensorLoader
from ahbf.pipelines.sources import STATS, digits_arrays
from machine import cpu_name
from reproduce_report import METHODS, markdown, plot_all, summarise

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

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
    last = trainer.state.history[-1]
    keys = [k for k in last if k.startswith(("test_", "div_"))] + ["train_loss"]
    probed = [r for r in trainer.state.history if "test_branch0_top1" in r]
    curves = {k: [r[k] for r in probed] for k in ["epoch"] + keys}
    n_params = sum(t.numel() for t in trainer.model.parameters())
    return {"method": method, "seed": seed, "test": test, "target_top1": test["branch0"]["top1"],
            "ensemble_top1": last.get("test_branch_ensemble_top1"), "disagreement": last.get("div_disagreement"),
            "sym_kl": last.get("div_sym_kl"), "curves": curves, "train_s": summary["train_s"], "wall_s": wall,
            "params": n_params, "train_samples": trainer.data.train.num_samples,
            "test_samples": summary["test"]["_samples"]["n"], "config": run.cfg.to_dict()}


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
