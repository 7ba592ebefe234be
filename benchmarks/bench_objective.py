"""The objective's cost: device time (pytest-benchmark suite) and host time per call (script).

    python benchmarks/bench_objective.py                                  # host us per fwd+bwd, CPU, 1 thread
    python benchmarks/bench_objective.py --device cuda                    # the same rows on a GPU (real launches)
    python -m pytest benchmarks/bench_objective.py --benchmark-group-by=param:shape   # device-time suite
    python -m pytest benchmarks/bench_objective.py -k "ahbf and 256 and 1000"      # the acceptance case

**Host rows** (the script): one forward + backward (``torch.autograd.grad`` of the loss w.r.t. every
branch logit and score tensor) of the objective at a tiny shape (AHBF M = 4, B = 8, K = 10), where
compute is negligible and what is left is the host's work: argument checks, allocations, the autograd
machinery, the launch. On CPU the Triton launch is replaced by a no-op that counts (the rest of the op
runs as on a GPU); on CUDA the kernel runs. Rows: the fused op (``triton``, fresh gradients and
``reuse_grads`` as the training step calls it), the ``compiled`` and ``eager`` backends, and two floors: an
``autograd.Function`` with the same inputs that does nothing, and ``(x * 2).sum().backward()``. Timed in
interleaved blocks (median and 25-75 % of all calls); ``launches`` = device launches of one call (the
stub's count plus every operator that launches work; CUDA kernels on CUDA), ``python calls`` = Python
and C function calls of one call (``sys.setprofile``). Output: benchmarks/results/objective_host_<device>.md/.json.

**Device rows** (pytest-benchmark): AHBF, ONE and DML with M = 4 branches, B in {128, 256}, K in {100,
1000}; paths ``eager`` and ``compiled`` on CPU plus ``triton`` on CUDA; setup factory
``objective_table.make_case`` / ``make_step``, shared with the side-by-side table script. Not collected by
the default test run (file name does not match test_*).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # CPU tensors may enter the Triton path (its launch is stubbed): before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import contextlib
import gc
import statistics
import sys
import time

import pytest
import torch

from objective_table import RESULTS, count_launches, environment, make_case, make_step, write_result

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = ["eager", "compiled"] + (["triton"] if DEVICE == "cuda" else [])
SHAPES = [(B, K) for B in (128, 256) for K in (100, 1000)]


def _synced(step):
    if DEVICE != "cuda":
        return step

    def run():
        out = step()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{B}-K{K}" for B, K in SHAPES])
@pytest.mark.parametrize("method", ["ahbf", "one", "dml"])
def test_objective_forward_backward(benchmark, method, shape, path):
    B, K = shape
    case = make_case(method, 4, B, K, DEVICE)
    if path != "eager":
        torch.compiler.reset()  # static kernels for this shape, compiled during warm-up
    step = _synced(make_step(case, path))
    benchmark.extra_info.update(method=method, M=4, B=B, K=K, path=path, device=DEVICE,
                                threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)


# ---- host rows

class StubLaunch:
    """Stands in for ``triton_okd._okd_fused_kernel``: ``[grid](*args)`` counts and returns."""

    def __init__(self):
        self.count = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.count += 1
        return launch


@contextlib.contextmanager
def stubbed_triton():
    """The Triton launch replaced by a :class:`StubLaunch` (plans built inside bind it); yields the stub."""
    from ahbf.kernels import plan, triton_okd

    stub, kernel, plans = StubLaunch(), triton_okd._okd_fused_kernel, dict(plan._PLANS)
    triton_okd._okd_fused_kernel = stub
    plan._PLANS.clear()
    try:
        yield stub
    finally:
        triton_okd._okd_fused_kernel = kernel
        plan._PLANS.clear()
        plan._PLANS.update(plans)


def host_steps(case, device: str) -> dict:
    """Name -> one forward + backward at the case's shape (module docstring)."""
    from ahbf.kernels import okd_loss

    leaves = [t for t in case.z if t.requires_grad] + case.s
    z, s, y, g = case.z, case.s, case.labels, case.graph

    def fused(backend, **kw):
        def step():
            loss, _ = okd_loss(z, s, y, g, 3.0, 0.75, backend=backend, **kw)
            torch.autograd.grad(loss, leaves)
        return step

    grads = [torch.zeros_like(t) for t in (*z, *s)]

    class Nothing(torch.autograd.Function):  # the floor: one output, backward = one multi-tensor multiply
        @staticmethod
        def forward(ctx, *ts):
            return ts[0].new_empty(())

        @staticmethod
        def backward(ctx, grad):
            return tuple(torch._foreach_mul(grads, grad))

    def nothing():
        torch.autograd.grad(Nothing.apply(*z, *s), leaves)

    x = z[0]

    def bare():
        (x * 2).sum().backward()

    return {"triton": fused("triton"), "triton reuse_grads": fused("triton", reuse_grads=True),
            "compiled": fused("compiled"), "eager": fused("eager"), "floor: autograd.Function + _foreach_mul": nothing,
            "(x * 2).sum().backward()": bare}


def python_calls(step) -> int:
    count = 0

    def prof(frame, event, arg):
        nonlocal count
        count += event in ("call", "c_call")
    sys.setprofile(prof)
    try:
        step()
    finally:
        sys.setprofile(None)
    return count


NO_WORK = ("aten::empty", "aten::empty_like", "aten::promote_types", "aten::result_type", "aten::view",
           "aten::split_with_sizes", "aten::unbind", "aten::select", "aten::slice", "aten::as_strided",
           "aten::detach", "aten::alias", "aten::lift_fresh")


def device_launches(step, device: str, stub: StubLaunch | None) -> int:
    """Kernels one call launches: CUDA kernels (profiler) on CUDA; on CPU the stub's Triton launches plus
    the outermost operators that would launch work on a GPU (allocations and views do not)."""
    if device == "cuda":
        return count_launches(step, device)
    from torch.profiler import ProfilerActivity, profile

    before = stub.count if stub else 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    outer = [e.name for e in prof.events() if e.name.startswith("aten::") and not _nested(e)]
    return (stub.count - before if stub else 0) + sum(name not in NO_WORK for name in outer)


def _nested(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


GROUPS = (("triton", "triton reuse_grads", "floor: autograd.Function + _foreach_mul", "(x * 2).sum().backward()"),
          ("compiled", "eager"))  # rows interleaved with each other (the slow rows' cache traffic apart)


def host_rows(device: str, dtype: torch.dtype, rounds: int, blocks: int, reps: int) -> list[dict]:
    case = make_case("ahbf", 4, 8, 10, device, dtype)
    with stubbed_triton() if device == "cpu" else contextlib.nullcontext() as stub:
        steps = host_steps(case, device)
        times = {name: {"wall": [], "cpu": []} for name in steps}
        for group in GROUPS:
            time_group({name: steps[name] for name in group}, times, rounds, blocks, reps)
        rows = []
        for name, step in steps.items():
            row = {"row": name, "dtype": str(dtype).replace("torch.", ""), "blocks": len(times[name]["wall"]),
                   "calls_per_block": reps}
            for clock, ts in times[name].items():
                q = statistics.quantiles(ts, n=4)
                row.update({f"{clock}_us": statistics.median(ts), f"{clock}_p25_us": q[0], f"{clock}_p75_us": q[2]})
            row.update(launches=device_launches(step, device, stub), python_calls=python_calls(step))
            rows.append(row)
    return rows


def time_group(steps: dict, times: dict[str, dict[str, list[float]]], rounds: int, blocks: int, reps: int) -> None:
    """Warm up, then per round ``blocks`` blocks of ``reps`` calls per row, the rows' order alternating each
    round; per block the mean microseconds per call by wall clock and by this thread's CPU time."""
    for name, step in steps.items():
        for _ in range(3 if name == "compiled" else 50):  # compiled: compiles on its first call
            step()
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            step = steps[name]
            gc.collect()
            gc.disable()  # as timeit: a collection of the other rows' garbage is no row's cost
            try:
                for _ in range(blocks):
                    w0, c0 = time.perf_counter(), time.thread_time()
                    for _ in range(reps):
                        step()
                    times[name]["wall"].append((time.perf_counter() - w0) * 1e6 / reps)
                    times[name]["cpu"].append((time.thread_time() - c0) * 1e6 / reps)
            finally:
                gc.enable()


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"Command: `{env['command']}`", "",
             f"Device: {env['device']}; CPU: {env['cpu']}, torch threads: {env['threads']}; torch {env['torch']}, "
             f"triton {env['triton']}, Python {env['python']}; {env['date']}.", "",
             "One forward + backward (autograd.grad w.r.t. every branch logit and score) of AHBF M=4 at B=8, K=10, "
             "host microseconds per call: median [25th-75th percentile] over blocks of "
             f"{result['rows'][0]['calls_per_block']} calls, by this thread's CPU time (robust to other jobs on the "
             "machine) and by wall clock" +
             (", the Triton launch replaced by a counting no-op." if env["device"] == "cpu" else "."), "",
             "| row | dtype | host us (thread CPU time) | host us (wall) | launches | python calls |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['dtype']} | {r['cpu_us']:.1f} [{r['cpu_p25_us']:.1f}-{r['cpu_p75_us']:.1f}] | "
                     f"{r['wall_us']:.1f} [{r['wall_p25_us']:.1f}-{r['wall_p75_us']:.1f}] | {r['launches']} | "
                     f"{r['python_calls']} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="host cost of the objective per forward + backward (module docstring)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds per row")
    ap.add_argument("--blocks", type=int, default=10, help="timed blocks per row per round")
    ap.add_argument("--reps", type=int, default=100, help="calls per block")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/objective_host_<device>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for dt in args.dtypes.split(",")
            for r in host_rows(args.device, getattr(torch, dt), args.rounds, args.blocks, args.reps)]
    result = {"env": environment(args.device, torch.get_num_threads()), "rows": rows}
    write_result(result, args.out or os.path.join(RESULTS, f"objective_host_{args.device}.json"), markdown(result))
    return result


if __name__ == "__main__":
    main()
