"""Fused vs unfused OKD objective, forward + backward, timed side by side in one run.

    python benchmarks/objective_table.py                    # CPU: eager vs compiled
    python benchmarks/objective_table.py --device cuda      # eager vs compiled vs triton, + HBM floor

Paths: ``eager`` is ``okd_objective_reference`` (autograd through unfused PyTorch ops); ``compiled`` and
``triton`` are ``okd_loss(..., backend=...)``. One step = the objective's forward and the gradients of
the loss w.r.t. every branch logit and score tensor (``torch.autograd.grad``). Each path is warmed up
(compiles included) and then timed in ``--rounds`` blocks of ``--reps`` steps, the paths' blocks
alternating so that load from other processes hits every path alike; each step is timed between
device syncs. Reported: median and the 25-75 % spread of all steps, the ratio of medians vs eager,
the kernels (CUDA) or operators (CPU) one step launches (torch.profiler), and on CUDA the HBM floor:
the step's device time (``triton.testing.do_bench``) and the fused kernel's alone against (bytes the step
must read and write / measured device copy bandwidth), plus every byte this implementation moves
(:func:`traffic`: the kernel and the backward rescale). Every result records the device,
CPU, threads, versions, date and command. Output: benchmarks/results/objective_<device>.json and .md.

The setup factory :func:`make_case` and :func:`make_step` are shared with ``bench_objective.py``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch


from ahbf.engine import graphed  # noqa: E402
from ahbf.kernels import DistillGraph, okd_loss  # noqa: E402
from ahbf.methods import build_graph  # noqa: E402
from machine import cpu_name  # noqa: E402
from ahbf.kernels.reference import okd_objective_reference  # noqa: E402  (the timed baseline is the checked one)
from ahbf.methods.kdcl import minlogit_target  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
T, KD_SCALE = 3.0, 0.75


# ---- shared setup factory

@dataclass
class Case:
    method: str
    graph: DistillGraph
    z: list[torch.Tensor]
    s: list[torch.Tensor]
    labels: torch.Tensor

    @property
    def name(self) -> str:
        B, K = self.z[0].shape
        return f"{self.method} M={self.graph.num_branches} B={B} K={K}"


def make_case(method: str, M: int, B: int, K: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> Case:
    """Leaf logits (x3 so that the softmaxes are not flat) and scores that require grad, and labels.

    Constant teacher inputs (KDCL's MinLogit target, built from the logits; PCL's EMA peers) are made
    as the task makes them: without grad."""
    graph = build_graph(method, M)
    gen = torch.Generator().manual_seed(seed)
    trainable = {"kdcl": M, "pcl": M + 1}.get(method, graph.num_branches)
    z = [(3 * torch.randn(B, K, generator=gen)).to(device, dtype).requires_grad_(i < trainable)
         for i in range(graph.num_branches)]
    s = [torch.randn(B, w, generator=gen).to(device, dtype).requires_grad_() for w in graph.score_widths]
    labels = torch.randint(0, K, (B,), generator=gen).to(device)
    if method == "kdcl":
        z[M] = minlogit_target(z[:M], labels)
    return Case(method, graph, z, s, labels)


def make_step(case: Case, path: str):
    """One objective step (forward + gradients of every input) for ``path`` in eager / compiled / triton /
    triton-graph (the triton step captured as one CUDA graph and replayed: :func:`cuda_graphed`)."""
    leaves = [t for t in case.z if t.requires_grad] + case.s
    if path == "triton-graph":
        return cuda_graphed(make_step(case, "triton"), str(case.z[0].device.type))

    if path == "eager":
        def step():
            loss, _ = okd_objective_reference(case.z, case.s, case.labels, case.graph, T, KD_SCALE)
            return torch.autograd.grad(loss, leaves)
    else:
        def step():
            loss, _ = okd_loss(case.z, case.s, case.labels, case.graph, T, KD_SCALE, backend=path)
            return torch.autograd.grad(loss, leaves)
    return step


# ---- measurement

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def time_steps(step, device: str, reps: int, clock: str = "wall") -> list[float]:
    """Milliseconds of ``reps`` steps, each between device syncs.

    ``clock="thread"``: CPU time of the calling thread instead of wall time; with one torch thread on
    a CPU shared with other jobs, it counts the work done and not the time spent descheduled.
    """
    now = CLOCKS[clock]
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = now()
        step()
        _sync(device)
        out.append((now() - t0) * 1e3)
    return out


def count_launches(step, device: str) -> int:
    """CUDA kernels (on CUDA) or outermost dispatched operators (on CPU) of one step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    n = 0
    for e in events:
        if not re.match(r"(aten|ahbf)::", e.name):
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if re.match(r"(aten|ahbf)::", parent.name):
                nested = True
                break
            parent = parent.cpu_parent
        n += not nested
    return n


def copy_bandwidth(device: str, mib: int = 512) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 10 copies of ``mib`` MiB."""
    x = torch.empty(mib * 2 ** 18, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = device_ms_samples(lambda: y.copy_(x), device, 10)
    return 2 * x.numel() * 4 / (statistics.median(times) / 1e3)


def device_ms_samples(fn, device: str, reps: int) -> list[float]:
    """Device milliseconds of ``reps`` calls: CUDA events around each call on CUDA (launch overhead
    included only where it is not hidden behind the previous call), wall-clock between syncs on CPU."""
    if device != "cuda":
        return time_steps(fn, device, reps)
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def kernel_ms(fn, device: str, reps: int = 5) -> float:
    """Median device time of ``fn``: ``triton.testing.do_bench`` (CUDA events over many back-to-back
    calls, L2 flushed between them) on CUDA; wall-clock median of ``reps`` calls between syncs elsewhere."""
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return statistics.median(time_steps(fn, device, reps))


def traffic(case: Case, path: str) -> dict:
    """Bytes of one objective step (forward + backward).

    ``floor``: what any implementation must move: read the logits, scores and labels once, write their
    gradients once (in the input dtypes). ``moved`` (triton path): what this implementation moves: the
    kernel reads the logits (twice when a row spans several chunks), scores and labels, writes fp32
    gradients and 2 floats per row; backward reads those fp32 gradients and writes the scaled ones
    (``_foreach_mul``), and for bf16 / fp16 inputs reads them once more and writes the input dtype."""
    from ahbf.kernels import triton_okd

    z_el = sum(t.numel() for t in case.z)
    s_el = sum(t.numel() for t in case.s)
    es = case.z[0].element_size()
    labels = case.labels.numel() * case.labels.element_size()
    floor = 2 * (z_el + s_el) * es + labels
    if path not in ("triton", "triton-graph"):
        return {"floor_bytes": floor, "moved_bytes": None}
    B, K = case.z[0].shape
    cfg = triton_okd.launch_config(case.graph.num_nodes, K, B)
    reads = (1 if K <= cfg.block_k else 2) * z_el * es + s_el * es + labels
    kernel = reads + (z_el + s_el) * 4 + B * 8 + 16
    rescale = 2 * (z_el + s_el) * 4
    cast = (z_el + s_el) * (4 + es) if es != 4 else 0
    return {"floor_bytes": floor, "moved_bytes": kernel + rescale + cast, "kernel_bytes": kernel,
            "rescale_bytes": rescale + cast}


def triton_kernel_only(case: Case, cfg=None):
    """The fused kernel's forward launch alone (loss + fp32 gradients), for ``kernel_ms``; ``cfg``: a
    ``triton_okd.LaunchConfig`` (default: the default tile)."""
    from ahbf.kernels import triton_okd
    from ahbf.kernels.encoding import encode

    enc = encode(case.graph)
    z, s = [t.detach() for t in case.z], [t.detach() for t in case.s]
    kd = torch.full((1,), KD_SCALE, device=z[0].device)
    kw = {} if cfg is None else dict(block_k=cfg.block_k, rows=cfg.rows, num_warps=cfg.num_warps)
    return lambda: triton_okd.okd_fused_triton(z, s, case.labels, kd, enc, T, True, **kw)


def cuda_graphed(step, device: str, warmup: int = 3):
    """``step`` captured once as a CUDA graph after ``warmup`` calls on a side stream (``engine/graphed.py``, as
    ``train.cuda_graph`` does); returns the replay (the step's outputs are static, overwritten by the next
    replay). Off CUDA: ``step`` itself."""
    if device != "cuda":
        return step
    side, dev = torch.cuda.Stream(), torch.device("cuda", torch.cuda.current_device())
    with graphed.side_stream(side, dev):
        for _ in range(warmup):
            step()
    graph, _, pinned = graphed.record(step, side)

    def replay():
        graph.replay()
    replay.pinned = pinned  # the plans whose buffers the graph writes: held as long as the replay
    return replay


def summarize(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=4)
    return {"median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2], "min_ms": min(ms), "n": len(ms)}


def run_case(case: Case, paths: list[str], device: str, warmup: int, reps: int, rounds: int,
             bandwidth: float | None, clock: str = "wall") -> dict:
    steps = {p: make_step(case, p) for p in paths}
    if any(p != "eager" for p in paths):
        torch.compiler.reset()  # fresh static kernels for this shape, as in a training run
    for p in paths:
        time_steps(steps[p], device, warmup)
    times: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(rounds):
        order = paths if r % 2 == 0 else paths[::-1]
        for p in order:
            times[p] += time_steps(steps[p], device, reps, clock)
    row = {"method": case.method, "M": case.graph.num_branches, "B": case.z[0].shape[0], "K": case.z[0].shape[1],
           "dtype": str(case.z[0].dtype).replace("torch.", ""), "paths": {}}
    eager_median = statistics.median(times["eager"]) if "eager" in times else None
    for p in paths:
        stats = summarize(times[p])
        stats["speedup_vs_eager"] = eager_median / stats["median_ms"] if eager_median else None
        stats["launches"] = count_launches(steps[p], device)
        if bandwidth:  # device time of the step and of the kernel alone vs the bytes at copy bandwidth
            stats.update(traffic(case, p))
            stats["hbm_floor_ms"] = stats["floor_bytes"] / bandwidth * 1e3
            stats["step_device_ms"] = kernel_ms(steps[p], device, reps)
            stats["x_floor"] = stats["step_device_ms"] / stats["hbm_floor_ms"]
            if p == "triton":
                stats["kernel_ms"] = kernel_ms(triton_kernel_only(case), device, reps)
                stats["moved_at_bandwidth_ms"] = stats["moved_bytes"] / bandwidth * 1e3
        row["paths"][p] = stats
    return row


# ---- report

def environment(device: str, threads: int) -> dict:
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "cpu": cpu_name(),
           "cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__,
           "python": platform.python_version(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": "python " + " ".join(sys.argv)}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def markdown(result: dict) -> str:
    env, rows = result["env"], result["rows"]
    paths = list(rows[0]["paths"])
    fused = [p for p in paths if p != "eager"]
    head = ["case", "eager ms"] + [f"{p} ms" for p in fused] + [f"{p} speedup" for p in fused]
    floor = "x_floor" in rows[0]["paths"][paths[0]]
    if floor:
        head += [f"{p} device ms (x HBM floor)" for p in paths] + ["HBM floor ms"]
        if "triton" in paths:
            head += ["triton kernel ms", "triton bytes moved at copy bw, ms"]
    head += [f"{'kernels' if env['device'] != 'cpu' else 'ops'} {p}" for p in paths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ps = r["paths"]
        cell = [f"{r['method']} M={r['M']} B={r['B']} K={r['K']} {r['dtype']}"]
        cell += [f"{ps[p]['median_ms']:.3f} [{ps[p]['p25_ms']:.3f}-{ps[p]['p75_ms']:.3f}]" for p in paths]
        cell += [f"**{ps[p]['speedup_vs_eager']:.2f}x**" for p in fused]
        if floor:
            cell += [f"{ps[p]['step_device_ms']:.4f} ({ps[p]['x_floor']:.1f}x)" for p in paths]
            cell += [f"{ps[paths[0]]['hbm_floor_ms']:.4f}"]
            if "triton" in paths:
                cell += [f"{ps['triton']['kernel_ms']:.4f}", f"{ps['triton']['moved_at_bandwidth_ms']:.4f}"]
        cell += [str(ps[p]["launches"]) for p in paths]
        lines.append("| " + " | ".join(cell) + " |")
    info = (f"Device: {env['device']}; CPU: {env['cpu']} ({env['cpu_count']} cores), torch threads: {env['threads']}; "
            f"torch {env['torch']}, triton {env['triton']}, Python {env['python']}; {env['date']}.")
    if env.get("bandwidth_gbs"):
        info += f" Measured copy bandwidth {env['bandwidth_gbs']:.0f} GB/s."
    clock = "wall-clock" if env.get("clock", "wall") == "wall" else "thread CPU-time"
    note = (f"Forward + backward of the objective, {clock} milliseconds: median [25th-75th percentile] of "
            f"{rows[0]['paths'][paths[0]]['n']} steps per path; speedup = eager median / fused median; "
            "ops/kernels = outermost operators (CPU) or CUDA kernels launched by one step."
            + (" Device ms: triton.testing.do_bench of the whole step (CUDA events, L2 flushed; wall-clock on "
               "CPU); HBM floor = (logits, scores, labels read once + their gradients written once) / measured "
               "copy bandwidth; kernel ms: the fused forward launch alone; bytes moved: everything this "
               "implementation reads and writes (kernel + backward rescale and cast), at copy bandwidth."
               if floor else ""))
    return "\n".join([f"Command: `{env['command']}`", "", info, "", note, "", *lines, ""])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--methods", default="ahbf,one,dml", help="comma-separated: ahbf, one, dml, cl_ilr, okddip, kdcl, pcl")
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--batches", default="128,256")
    ap.add_argument("--classes", default="100,1000")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10, help="timed steps per block")
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks per path")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                    help="wall time, or the thread's CPU time (CPU, --threads 1 only: robust to other jobs)")
    ap.add_argument("--paths", default=None, help="default: eager,compiled on CPU; eager,compiled,triton on CUDA")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/objective_<device>.json)")
    ap.add_argument("--hbm-floor", action=argparse.BooleanOptionalAction, default=None,
                    help="measure copy bandwidth and compare device times with the byte floor (default: on CUDA)")
    ap.add_argument("--bandwidth-mib", type=int, default=512, help="buffer size of the copy-bandwidth measurement")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if args.clock == "thread" and (device != "cpu" or torch.get_num_threads() != 1):
        ap.error("--clock thread needs --device cpu --threads 1")
    paths = args.paths.split(",") if args.paths else (["eager", "compiled"] + (["triton"] if device == "cuda" else []))
    dtype = getattr(torch, args.dtype)
    env = environment(device, torch.get_num_threads())
    env["clock"] = args.clock
    bandwidth = None
    if args.hbm_floor if args.hbm_floor is not None else device == "cuda":
        bandwidth = copy_bandwidth(device, args.bandwidth_mib)
        env["bandwidth_gbs"] = bandwidth / 1e9
    rows = []
    for method in args.methods.split(","):
        for B in map(int, args.batches.split(",")):
            for K in map(int, args.classes.split(",")):
                case = make_case(method, args.branches, B, K, device, dtype)
                row = run_case(case, paths, device, args.warmup, args.reps, args.rounds, bandwidth, args.clock)
                rows.append(row)
                ps = row["paths"]
                print(case.name, " ".join(f"{p}={ps[p]['median_ms']:.3f}ms" for p in paths),
                      " ".join(f"{p}:{ps[p]['speedup_vs_eager']:.2f}x" for p in paths if p != "eager"), flush=True)
    result = {"env": env, "rows": rows}
    tag = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_")
    write_result(result, args.out or os.path.join(RESULTS, f"objective_{tag}.json"), markdown(result))
    return result


def write_result(result: dict, out: str, md: str) -> None:
    """``result`` as JSON at ``out`` and ``md`` next to it (same name, .md); the table is printed too."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
