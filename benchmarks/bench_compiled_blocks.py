"""One repeated block of AHBF ResNet-32, eager vs ``torch.compile``d (what ``--compile regions`` compiles), side by side.

    python benchmarks/bench_compiled_blocks.py                 # CPU, 1 thread, bf16 channels-last, batch 64
    python benchmarks/bench_compiled_blocks.py --device cuda --batch 128
    python benchmarks/bench_compiled_blocks.py --smoke         # tiny, seconds of compile (tests)

Each row is one forward + backward of a CIFAR ResNet basic block (conv-BN-ReLU-conv-BN, + identity, ReLU: the
block ``compile_regions`` picks) at each of ResNet-32's three stage shapes, and of its pointwise part alone
(BatchNorm in training mode + residual add + ReLU, no convolution). Eager and compiled copies of the same
module run in turn, ``--rounds`` rounds of ``--reps`` steps each, rotated, so that load from other processes
hits both alike; reported are the medians of the blocks' milliseconds per step and their ratio. This is what
explains a CPU step that is slower with ``--compile regions`` than eager (docs/benchmarks.md): the
convolutions are ATen's either way, the pointwise part is inductor's generated code. Results:
``benchmarks/results/compiled_blocks_<device>.md`` (with the machine, threads, versions and date).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from machine import cpu_name

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STAGES = ((16, 32), (32, 16), (64, 8))  # ResNet-32 (CIFAR): channels, spatial size of each stage
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Pointwise(nn.Module):
    """A block's non-convolution part: BatchNorm (training mode), the residual add, ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(x) + x)


def make_step(module: nn.Module, x: torch.Tensor, precision: str):
    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = module(x)
        out.float().sum().backward()
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps: dict, device: torch.device, rounds: int, reps: int) -> dict[str, float]:
    """Median milliseconds per step of each named step, blocks of ``reps`` steps, rotated each round."""
    names = list(steps)
    ms: dict[str, list[float]] = {n: [] for n in names}
    for k in range(rounds):
        for n in names[k % len(names):] + names[:k % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                steps[n]()
            sync(device)
            ms[n].append((time.perf_counter() - t0) / reps * 1e3)
    return {n: statistics.median(v) for n, v in ms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of torch")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", choices=list(DTYPES), default="bf16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="one stage, batch 2, 1 round (the test)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stages = STAGES[-1:] if args.smoke else STAGES
    batch, rounds, reps = (2, 1, 1) if args.smoke else (args.batch, args.rounds, args.reps)
    rows = []
    for channels, size in stages:
        x = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        for label, make in (("basic block", lambda c: BasicBlock(c, c)), ("BN + add + ReLU", Pointwise)):
            torch.manual_seed(0)
            eager = make(channels).to(device, memory_format=torch.channels_last)
            compiled = make(channels).to(device, memory_format=torch.channels_last)
            compiled.load_state_dict(eager.state_dict())
            compiled.compile(dynamic=False)
            # the pointwise part gets what a block's BatchNorm gets: the convolution's output, bf16 under autocast
            xin = x.detach().to(DTYPES[args.precision]).requires_grad_() if make is Pointwise else x
            steps = {"eager": make_step(eager, xin, args.precision), "compiled": make_step(compiled, xin, args.precision)}
            t0 = time.perf_counter()
            steps["compiled"]()  # the compile
            compile_s = time.perf_counter() - t0
            for step in steps.values():
                step()
            med = measure(steps, device, rounds, reps)
            rows.append((f"{label}, {channels} ch {size}x{size}", med["eager"], med["compiled"], compile_s))
            print(f"{rows[-1][0]}: eager {med['eager']:.2f} ms, compiled {med['compiled']:.2f} ms "
                  f"({med['compiled'] / med['eager']:.2f}x), compile {compile_s:.1f} s", flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {args.threads} thread(s)"
    lines = [f"# One ResNet-32 block, eager vs torch.compile ({device.type})", "",
             f"{where}; {args.precision}, channels-last, batch {batch}, forward + backward; torch {torch.__version__}, "
             f"Python {platform.python_version()}; {datetime.date.today()}; median of {rounds} rotated rounds of "
             f"{reps} steps.", "", "| module | eager ms | compiled ms | compiled / eager | first call s (the compile; cache may be warm) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {e:.3f} | {c:.3f} | {c / e:.2f}x | {s:.1f} |" for n, e, c, s in rows]
    os.makedirs(args.out, exist_ok=True)
    name = f"compiled_blocks_{device.type}{'_smoke' if args.smoke else ''}.md"
    with open(os.path.join(args.out, name), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
