"""Cost of a verified checkpoint write next to the write it replaced, for one training state.

    python benchmarks/bench_checkpoint.py [--arch resnet8 --classes 10 --branches 4] [--reps 5] [--json FILE]

A: what ``save_checkpoint`` did before issue 24: the SHA-256 of the tensors, then ``torch.save`` to a temporary
file, ``fsync``, rename. B: ``save_checkpoint`` now: the SHA-256 of every value, the same write, then the file
read back (``torch.load(weights_only=True)``) and its checksum verified before the rotation moves. Also timed
alone: the new checksum, and ``load_checkpoint`` (what a resume reads). A and B alternate (A B A B ...), in a
temporary folder on the file system of ``--dir``; 1 thread. The state is a real one: the model's weights and
SGD momentum buffers (one backward pass), the RNG states, a history and the config.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from machine import cpu_name


def state_setup(arch: str, classes: int, branches: int) -> dict:
    """A training checkpoint's contents for ``arch`` (momentum buffers filled by one SGD step)."""
    from ahbf.engine.checkpoint import rng_state
    from ahbf.engine.config import RunConfig
    from ahbf.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, "ahbf", classes, branches)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = model(torch.randn(2, 3, 32, 32))
    sum(z.sum() for z in out.logits).backward()
    opt.step()
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_branch0_top1": 50.0 + e} for e in range(1, 31)]
    return {"model": model.state_dict(), "optim": {"optimizer": opt.state_dict()}, "epoch": 30, "batch": 0,
            "step": 30000, "spec": dict(model.spec), "config": RunConfig().to_dict(), "history": history,
            "best": {"epoch": 30, "val_top1": 80.0}, "rng": rng_state(), "meter": {}}


def write_before(state: dict, path: str) -> None:
    """The previous ``save_checkpoint`` (keep_last 1): tensor checksum, then an atomic, fsynced torch.save."""
    from ahbf.engine.checkpoint import _tensor_checksum
    from ahbf.engine.durable import atomic_save

    state = {**state, "version": "before"}
    state["checksum"] = _tensor_checksum(state)
    atomic_save(state, path)


def spread(xs: list[float]) -> dict[str, float]:
    """Median and quartiles (one value: all three the same)."""
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"q25": q[0], "median": statistics.median(xs), "q75": q[2]}


def main(argv: list[str] | None = None) -> dict:
    from ahbf.engine.checkpoint import checksum, load_checkpoint, save_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet8")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--branches", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=None, help="folder to write in (default: the system's temporary folder)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    state = state_setup(args.arch, args.classes, args.branches)
    times: dict[str, list[float]] = {"A: before": [], "B: verified write": [], "checksum of every value": [],
                                     "load_checkpoint": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = os.path.join(folder, "last.pt")
        for _ in range(args.reps):
            for name, fn in [("A: before", lambda: write_before(state, path)),
                             ("B: verified write", lambda: save_checkpoint(state, path)),
                             ("checksum of every value", lambda: checksum(state)),
                             ("load_checkpoint", lambda: load_checkpoint(path))]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        size = os.path.getsize(path)
    result = {"arch": f"{args.arch} ahbf x{args.branches}, {args.classes} classes", "file_mb": size / 2**20,
              "reps": args.reps, "cpu": cpu_name(), "torch": torch.__version__, "threads": 1,
              "date": datetime.date.today().isoformat(), "load_average": os.getloadavg(),
              "seconds": {k: spread(v) for k, v in times.items()}}
    print(f"{result['arch']}: {result['file_mb']:.1f} MB, {args.reps} reps, 1 thread, load {result['load_average'][0]:.1f}")
    for k, v in result["seconds"].items():
        print(f"  {k:26s} median {v['median'] * 1e3:8.1f} ms  (25-75 %: {v['q25'] * 1e3:.1f}-{v['q75'] * 1e3:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
