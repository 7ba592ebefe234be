"""Cost of the per-step stop / checkpoint agreement (``StepControl.poll``: one Gloo all-reduce of two CPU ints
under DDP) next to a training step of a small model, in 2 Gloo processes on this machine.

    python benchmarks/bench_stop_agreement.py [--polls 2000] [--steps 30] [--batch 64] [--image-size 16]

Each process uses 1 thread. The step is the trainer's: DDP forward (AHBF ResNet-8, 4 branches, the digits demo's
16 px and batch 64 per process), eager objective, backward, SGD. Prints median and spread (25-75 %) of both,
and the poll as a share of the step; ``--json FILE`` writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def poll_setup():
    """The object timed: a ``StepControl`` as the trainer builds it (checkpoint every 30 minutes, no signal)."""
    from ahbf.engine.fault import StepControl, StopSignals

    return StepControl("30m", StopSignals())


def step_setup(batch: int, image_size: int):
    """One DDP training step of the demo's model (AHBF ResNet-8 x 4, eager objective), as a closure."""
    from torch.nn.parallel import DistributedDataParallel

    from ahbf.engine.config import ObjectiveConfig
    from ahbf.engine.resolve import resolve_objective
    from ahbf.engine.task import OKDTask
    from ahbf.methods import build_graph
    from ahbf.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet8", "ahbf", 10, 4, 4)
    cfg = resolve_objective(ObjectiveConfig(backend="eager"), "ahbf")
    task = OKDTask(DistributedDataParallel(model), build_graph("ahbf", 4, cfg), cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 10, (batch,))

    def step():
        loss = task(x, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def worker(rank: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    control, step = poll_setup(), step_setup(args.batch, args.image_size)
    for _ in range(50):  # warm-up: connections, allocator
        control.poll(1)
    for _ in range(3):
        step()
    polls, steps = [], []
    for i in range(args.polls):
        dist.barrier()  # both ranks start the call together: what is timed is the all-reduce, not the other's lag
        t = time.perf_counter()
        control.poll(i + 1)
        polls.append(time.perf_counter() - t)
    for _ in range(args.steps):
        dist.barrier()
        t = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"polls": polls, "steps": steps}, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--polls", type=int, default=2000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_stop_{os.getpid()}.json")
    mp.spawn(worker, args=(port, args, out), nprocs=2)
    with open(out) as f:
        raw = json.load(f)
    os.remove(out)
    poll_q = [v * 1e6 for v in _quartiles(raw["polls"])]
    step_q = [v * 1e3 for v in _quartiles(raw["steps"])]
    result = {"poll_us": poll_q, "step_ms": step_q, "share_percent": 100 * poll_q[1] / (step_q[1] * 1e3),
              "polls": args.polls, "steps": args.steps, "batch": args.batch, "image_size": args.image_size,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"poll (all-reduce of 2 ints, 2 Gloo ranks): median {poll_q[1]:.1f} us (25-75 %: {poll_q[0]:.1f}-"
          f"{poll_q[2]:.1f})")
    print(f"DDP step (AHBF ResNet-8 x4, {args.image_size} px, batch {args.batch}/rank): median {step_q[1]:.1f} ms "
          f"(25-75 %: {step_q[0]:.1f}-{step_q[2]:.1f})")
    print(f"poll / step: {result['share_percent']:.2f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
