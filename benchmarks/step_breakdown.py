"""Where one engine step's time goes (benchmarks/bench_engine.py's breakdown table): ``torch.profiler`` ranges
around the data fetch, trunk, branches, fusion modules, objective, backward and optimizer step."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from ahbf.engine.compile import synchronize

if TYPE_CHECKING:
    from bench_engine import EngineRun

LABELS = ("data", "trunk", "branches", "fusion", "objective", "backward", "optimizer")


@contextlib.contextmanager
def labelled(model: torch.nn.Module):
    """record_function ranges around the trunk, each branch and each fusion module (forward), via hooks."""
    handles, open_ = [], []
    parts = [("trunk", getattr(model, "trunk", None))]
    parts += [("branches", b) for b in getattr(model, "branches", None) or []]
    parts += [("fusion", f) for f in (getattr(model, "fusions", None) or [])]
    parts += [("fusion", getattr(model, "gate", None))]
    for p in getattr(model, "peers", None) or []:  # DML: each peer is trunk + one branch
        parts += [("trunk", p.trunk), ("branches", p.branches[0])]
    for label, module in parts:
        if module is None:
            continue

        def pre(_m, _x, label=label):
            rf = torch.profiler.record_function(label)
            rf.__enter__()
            open_.append(rf)

        def post(_m, _x, _y):
            open_.pop().__exit__(None, None, None)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def breakdown(run: "EngineRun", steps: int = 5) -> dict[str, float | str]:
    """Milliseconds per step in each labelled part of ``run``'s step (torch.profiler): device time of the ranges
    on CUDA where the profiler attributes it to them (``clock: device``), else host time (``clock: host``:
    on CUDA that is launch time, not kernel time; the step is synced at its end). The step is
    ``Run.train_step`` split into its parts: forward + objective (``OKDTask``), then ``AmpStepper``'s
    backward and optimizer step (no clipping); the objective's own backward is inside ``backward``."""
    tr, device = run.run, run.run.env.device
    amp, task = tr.amp, tr.task
    objective = task.objective

    def timed_objective(*args, **kw):
        with torch.profiler.record_function("objective"):
            return objective(*args, **kw)

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    task.objective = timed_objective
    try:
        with labelled(tr.model), torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                with torch.profiler.record_function("step"):
                    with torch.profiler.record_function("data"):
                        x, y = next(run.batches)
                    terms = task(x, y)
                    with torch.profiler.record_function("backward"):
                        amp.scaler.scale(terms["loss"]).backward()
                    with torch.profiler.record_function("optimizer"):
                        amp.scaler.step(amp.optimizer)
                        amp.scaler.update()
                        amp.optimizer.zero_grad(set_to_none=True)
                    run.meter.update(terms, run.steps)
                synchronize(device)
    finally:
        task.objective = objective
    events = [ev for ev in prof.key_averages() if ev.key in (*LABELS, "step")]
    on_device = device.type == "cuda" and all(getattr(ev, "device_time_total", 0.0) > 0 for ev in events)
    totals = {ev.key: (ev.device_time_total if on_device else ev.cpu_time_total) / 1000 / steps for ev in events}
    step_ms = totals.pop("step", sum(totals.values()))
    parts = {k: totals.get(k, 0.0) for k in LABELS}
    parts["other"] = max(0.0, step_ms - sum(parts.values()))
    return {"step_ms": step_ms, **parts, "clock": "device" if on_device else "host"}
