"""End-to-end training-step throughput: the engine in each setting vs a loop written like the paper's, side by side.

    python benchmarks/bench_engine.py                                   # CPU acceptance: AHBF ResNet-32, b64
    python benchmarks/bench_engine.py --models all --data synthetic memory folder --settings all
    python benchmarks/bench_engine.py --device cuda --models all --settings all
    python benchmarks/bench_engine.py --smoke                           # tiny sizes, seconds (CI; gpu_suite --smoke)

Rows. ``paper``: the loop the paper's code runs (fp32, NCHW, eager unfused objective with the reference
script's term pairing and its 1e-7 on the teacher probabilities, plain ``torch.optim.SGD``, ``loss.item()``
every step). Every other row is the engine: a real run built by ``build_run`` from a ``RunConfig`` (so the
timed step is ``Run.train_step``, the step ``Trainer`` runs: ``OKDTask`` + ``AmpStepper`` + ``build_optimizer``
+ ``wrap_model``, plus ``LossMeter`` with its host read every ``log_interval`` steps), one setting each (precision,
channels-last, objective backend, compile mode). Data: ``synthetic`` (one batch on the device, reused),
``memory`` (the on-device CIFAR-shaped loader the trainer uses for CIFAR) or ``folder`` (the image-folder
pipeline, DALI or torchvision, on generated JPEGs); a step includes fetching its batch.

Timing: every row is built and warmed up first (its first step, which compiles where compile is on, is
reported as ``first_step_s``, and minus a median step as ``compile_s``; ``--fresh-cache`` starts from an
empty inductor cache); then ``--rounds`` rounds, each timing a block of ``--reps`` steps of every row
in turn (rotated each round), between device syncs, so that load from other processes hits all rows alike.
Reported: img/s median and 25-75 % spread over blocks, and the ratio of medians to ``paper``. A
``torch.profiler`` breakdown of one engine step (data wait, trunk, branches, fusion modules, objective,
backward, optimizer) shows where a step's time goes. Results: ``benchmarks/results/engine_<device>[_<tag>].json``
and ``.md``, with the machine, threads, versions, date and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterator

import torch

from ahbf.engine.compile import synchronize, timed
from ahbf.engine.config import build_config
from ahbf.engine.distributed import DistEnv, resolve_device
from ahbf.engine.meters import LossMeter
from ahbf.engine.run import build_run
from ahbf.pipelines import build_data
from machine import cpu_name
from paper_loop import PaperLoop
from step_breakdown import LABELS, breakdown

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---- what is measured

@dataclass(frozen=True)
class ModelCase:
    arch: str
    method: str
    branches: int
    aux: int
    classes: int
    batch: int
    size: int  # on a GPU
    cpu_size: int  # on a CPU (said in the table)

    def describe(self, size: int) -> str:
        aux = f" aux{self.aux}" if self.method == "ahbf" else ""
        return f"{self.method.upper()} {self.arch} M{self.branches}{aux} K{self.classes} {size}px b{self.batch}"


MODELS: dict[str, ModelCase] = {
    "ahbf-r32-b64": ModelCase("resnet32", "ahbf", 4, 4, 100, 64, 32, 32),
    "ahbf-r32-b128": ModelCase("resnet32", "ahbf", 4, 4, 100, 128, 32, 32),
    "ahbf-r18": ModelCase("resnet18", "ahbf", 4, 2, 1000, 256, 224, 64),
    "dml-r32": ModelCase("resnet32", "dml", 4, 0, 100, 64, 32, 32),
    "one-r32": ModelCase("resnet32", "one", 4, 0, 100, 64, 32, 32),
}
# the paper's other backbones (docs/models.md), AHBF at the SPEC default aux, CIFAR-100 shapes
MODELS.update({
    "ahbf-vgg16": ModelCase("vgg16", "ahbf", 4, 2, 100, 64, 32, 32),
    "ahbf-densenet40": ModelCase("densenet40_k12", "ahbf", 4, 2, 100, 64, 32, 32),
    "ahbf-mobilenetv2": ModelCase("mobilenetv2_x0_5", "ahbf", 4, 2, 100, 64, 32, 32),
})
# a library model (docs/models.md "Library models"): torchvision's ResNet-18, split at layer3, ImageNet shapes
MODELS["ahbf-tv-r18"] = ModelCase("torchvision:resnet18", "ahbf", 4, 2, 1000, 256, 224, 64)
SMOKE = {"resnet32": "resnet8", "resnet18": "resnet18"}  # --smoke: tiny archs, 16 px (32 px: VGG, ImageNet), batch 4, K 10


@dataclass(frozen=True)
class Setting:
    precision: str = "fp32"
    channels_last: bool = False
    backend: str = "eager"
    compile: str = "off"
    compile_mode: str = "default"
    cuda_graph: bool = False


SETTINGS: dict[str, Setting] = {
    "fp32": Setting(),
    "bf16": Setting("bf16"),
    "bf16-cl": Setting("bf16", True),
    "bf16-cl-fused": Setting("bf16", True, "auto"),
    "bf16-cl-fused-compile": Setting("bf16", True, "auto", "model"),
    "bf16-cl-fused-branches": Setting("bf16", True, "auto", "branches"),
    "bf16-cl-regions": Setting("bf16", True, "eager", "regions"),
    "bf16-cl-fused-regions": Setting("bf16", True, "auto", "regions"),
    "bf16-cl-fused-cudagraphs": Setting("bf16", True, "auto", "model", "reduce-overhead"),
    "bf16-cl-fused-graphed": Setting("bf16", True, "auto", cuda_graph=True),  # train.cuda_graph: the whole step
    "bf16-cl-fused-regions-graphed": Setting("bf16", True, "auto", "regions", cuda_graph=True),
    "fp16-cl-fused": Setting("fp16", True, "auto"),
}
GPU_ONLY = ("bf16-cl-fused-cudagraphs", "fp16-cl-fused")  # the graphed rows run uncaptured on a CPU (same code)
DEFAULT_SETTINGS = ("fp32", "bf16", "bf16-cl", "bf16-cl-fused")
PAPER = PaperLoop.name


# ---- the engine

class EngineRun:
    """A real run for one setting (no run folder: nothing is written); ``step`` is what ``Trainer``'s epoch
    loop does per batch, minus the lr write and the checkpoint poll."""

    def __init__(self, name: str, setting: Setting, case: ModelCase, data: list[tuple[str, object]], env: DistEnv,
                 threads: int, out: str, batches=None):
        overrides = data + [("model.arch", case.arch), ("model.method", case.method),
                            ("model.num_branches", case.branches), ("model.aux", case.aux),
                            ("train.precision", setting.precision), ("train.channels_last", setting.channels_last),
                            ("objective.backend", setting.backend), ("train.compile", setting.compile),
                            ("train.compile_mode", setting.compile_mode), ("train.cuda_graph", setting.cuda_graph),
                            ("train.device", str(env.device)),
                            ("train.threads", threads), ("train.output", os.path.join(out, name)),
                            ("train.progress", False), ("train.tensorboard", False), ("optim.lr", 0.01)]
        self.name, self.setting = name, setting
        self.run = build_run(build_config(overrides=overrides), env)
        self.run.task.set_epoch(10 ** 6)  # the ramp's end (AHBF: kd_scale 0.5 * kd_weight), as PaperLoop
        self.run.model.train()
        self.meter, self.steps = LossMeter(env.device), 0
        self.batches = batches(setting.channels_last) if batches else cycle(self.run.data.train)

    def step(self) -> None:
        x, y = next(self.batches)
        terms = self.run.train_step(x, y)
        self.steps += 1
        self.meter.update(terms, self.steps)
        if self.steps % self.run.cfg.train.log_interval == 0:
            self.meter.read()

    def close(self) -> None:
        self.run.close()


def cycle(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Full batches of a loader, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        batch = None
        for x, y in loader:
            batch = batch or len(y)
            if len(y) == batch:
                yield x, y
        epoch += 1


def fixed_batch(case: ModelCase, size: int, classes: int, device: torch.device):
    """``make(channels_last)``: an iterator of one synthetic batch on the device, reused every step."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, classes, (case.batch,), generator=gen).to(device)

    def make(channels_last: bool):
        xb = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        while True:
            yield xb, y
    return make


def make_jpeg_root(root: str, images: int, classes: int) -> None:
    from bench_pipeline import make_jpegs
    for split, n in (("train", images), ("val", classes)):
        make_jpegs(os.path.join(root, split), n, classes=classes, width=320, height=240)


# ---- timing

def measure(runners: list, rounds: int, reps: int, warmup: int, device: torch.device) -> dict[str, dict]:
    stats = {r.name: {"first_step_s": timed(r.step, device), "blocks": []} for r in runners}
    for r in runners:
        for _ in range(warmup - 1):
            r.step()
    synchronize(device)
    for k in range(rounds):
        for r in runners[k % len(runners):] + runners[:k % len(runners)]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(reps):
                r.step()
            synchronize(device)
            stats[r.name]["blocks"].append((time.perf_counter() - start) / reps)
    return stats


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


# ---- one run

def run(models=("ahbf-r32-b64",), settings=DEFAULT_SETTINGS, data=("synthetic",), device: str = "auto",
        smoke: bool = False, rounds: int = 10, reps: int = 5, warmup: int = 3, threads: int = 0,
        profile: bool = True) -> list[dict]:
    """Measure every (model, data) with the paper loop and each engine setting; returns one dict per row
    (plus a ``breakdown`` entry in the last engine row of each (model, data) when ``profile``)."""
    dev = resolve_device(device)
    env = DistEnv(0, 0, 1, dev)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    if smoke:
        rounds, reps, warmup = min(rounds, 2), min(reps, 2), min(warmup, 1)
    rows = []
    for model_name in models:
        case = MODELS[model_name]
        if smoke:
            # VGG's five poolings need 32 px, and so does an ImageNet stem in bf16 on a CPU (no 1x1 maps into a
            # strided convolution: precision.check_cpu_bf16_convs)
            px = 32 if case.arch.startswith("vgg") or case.size >= 224 else 16
            case = replace(case, arch=SMOKE.get(case.arch, case.arch), classes=10, batch=4, size=px, cpu_size=px)
        size = case.size if dev.type == "cuda" else case.cpu_size
        for source in data:
            rows += run_one(model_name, case, size, source, settings, env, threads, rounds, reps, warmup, profile)
    return rows


def run_one(model_name: str, case: ModelCase, size: int, source: str, settings, env: DistEnv, threads: int,
            rounds: int, reps: int, warmup: int, profile: bool) -> list[dict]:
    dev = env.device
    names = [s for s in settings if s in SETTINGS and (dev.type == "cuda" or s not in GPU_ONLY)]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    imagenet = case.arch in ("resnet18", "resnet34", "resnet50")
    if source == "folder" and not imagenet:
        return []  # the image-folder pipeline is the ImageNet-style one
    with tempfile.TemporaryDirectory() as tmp:
        if source == "folder":
            make_jpeg_root(os.path.join(tmp, "jpegs"), max(8 * case.batch, 64), 8)
            data = [("data.dataset", "imagenet"), ("data.root", os.path.join(tmp, "jpegs")),
                    ("data.check_images", "none"), ("data.workers", max(1, threads))]
        else:  # synthetic tensors and the on-device loader both come from a CIFAR-shaped in-memory set
            data = [("data.dataset", "synthetic"), ("data.synthetic_classes", case.classes),
                    ("data.synthetic_samples", 8 * case.batch)]
        data += [("data.image_size", size), ("data.batch_size", case.batch), ("data.val_fraction", 0)]
        fixed = fixed_batch(case, size, case.classes, dev) if source == "synthetic" else None
        runners: list = []
        paper_data = build_data(build_config(overrides=data).data, device=dev)  # its own loader, same pipeline
        try:
            for name in names:
                runners.append(EngineRun(name, SETTINGS[name], case, data, env, threads, tmp, fixed))
            batches = fixed(False) if fixed else cycle(paper_data.train)
            runners.insert(0, PaperLoop(case, paper_data.num_classes, dev, batches))
            stats = measure(runners, rounds, reps, warmup, dev)
            eager = [r for r in runners[1:] if r.setting.compile == "off"]  # profiler hooks: eager modules only
            best = min(eager, key=lambda r: statistics.median(stats[r.name]["blocks"]), default=None)
            parts = breakdown(best) if profile and best is not None else None
        finally:
            for r in runners:
                r.close()
            paper_data.close()
    base = statistics.median(stats[PAPER]["blocks"])
    rows = []
    for r in runners:
        q1, med, q3 = quartiles(stats[r.name]["blocks"])
        setting = asdict(r.setting) if isinstance(r, EngineRun) else {"precision": "fp32", "channels_last": False,
                                                                      "backend": "paper-eager", "compile": "off"}
        rows.append({"model": model_name, "desc": case.describe(size), "data": source, "setting": r.name, **setting,
                     "batch": case.batch, "image_size": size, "img_s": case.batch / med,
                     "img_s_q25": case.batch / q3, "img_s_q75": case.batch / q1, "ms_step": 1000 * med,
                     "vs_paper": base / med, "first_step_s": stats[r.name]["first_step_s"],
                     "compile_s": max(0.0, stats[r.name]["first_step_s"] - med), "steps": rounds * reps})
    if parts:
        next(row for row in rows if row["setting"] == best.name)["breakdown"] = parts
    return rows


# ---- report

def machine(device: torch.device, threads: int) -> dict:
    info = {"device": str(device), "cpu": cpu_name(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": " ".join(sys.argv)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Engine training step vs the paper's loop ({info.get('gpu', info['cpu'])}, {info['threads']} threads, "
             f"torch {info['torch']}, {info['date'][:10]}). img/s: median of blocks (25-75 % spread); "
             "vs paper: ratio of medians in the same run; compile s: the first step (which compiles where compile "
             "is on) minus a median step" + (f"; inductor cache: {info['inductor_cache']}" if "inductor_cache" in info
                                             else "") + ".", "",
             "| model | data | setting | img/s | spread | ms/step | vs paper | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['desc']} | {r['data']} | {r['setting']} | {r['img_s']:.0f} | {r['img_s_q25']:.0f}-"
                     f"{r['img_s_q75']:.0f} | {r['ms_step']:.1f} | {r['vs_paper']:.2f}x | {r['compile_s']:.1f} |")
    for r in rows:
        if "breakdown" in r:
            b = r["breakdown"]
            lines += ["", f"Step breakdown, {r['desc']}, {r['data']}, {r['setting']} (torch.profiler, {b['clock']} "
                      f"time, {b['step_ms']:.1f} ms per step):", "", "| part | ms | share |", "|---|---|---|"]
            lines += [f"| {k} | {b[k]:.2f} | {100 * b[k] / b['step_ms']:.0f} % |" for k in (*LABELS, "other")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["ahbf-r32-b64"], help=f"{', '.join(MODELS)} or all")
    p.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help=f"{', '.join(SETTINGS)} or all")
    p.add_argument("--data", nargs="+", default=["synthetic"], choices=("synthetic", "memory", "folder"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--reps", type=int, default=5, help="steps per timed block")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row before timing (the first one compiles)")
    p.add_argument("--smoke", action="store_true", help="tiny models and few steps: checks the code paths")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. provisional)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the step breakdown")
    p.add_argument("--fresh-cache", action="store_true",
                   help="an empty inductor cache (a new TORCHINDUCTOR_CACHE_DIR): cold compile seconds; cold for every "
                        "setting only when each runs in its own process (benchmarks/gpu_suite.py does)")
    a = p.parse_args(argv)
    if a.fresh_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    models = list(MODELS) if a.models == ["all"] else a.models
    settings = list(SETTINGS) if a.settings == ["all"] else a.settings
    rows = run(models, settings, a.data, a.device, a.smoke, a.rounds, a.reps, a.warmup, a.threads, a.profile)
    info = machine(resolve_device(a.device), torch.get_num_threads())
    info["inductor_cache"] = "empty at start (--fresh-cache)" if a.fresh_cache else "as found"
    text = markdown(rows, info)
    print(text)
    if not a.smoke:
        os.makedirs(RESULTS, exist_ok=True)
        stem = os.path.join(RESULTS, f"engine_{info['device'].split(':')[0]}" + (f"_{a.tag}" if a.tag else ""))
        with open(stem + ".json", "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(text)
        print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
