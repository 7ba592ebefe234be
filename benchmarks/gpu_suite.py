"""Everything only a GPU can show, in one command on one GPU, within a time budget; every number kept.

    python benchmarks/gpu_suite.py --budget 420     # one H100, cold: ~7 minutes (docs/benchmarks.md)
    python benchmarks/gpu_suite.py --smoke          # CPU, Triton interpreter, tiny sizes: the same code paths (CI)

Sections, in order of value (``gpu_sections.py``; each runs in its own process with its own time limit):

1. ``engine_r18``: AHBF ResNet-18, 224 px synthetic, batch 256, bf16 + channels-last + fused objective, vs
   the paper-style loop (``bench_engine.py``; target >= 3x);
2. ``engine_r32``: AHBF ResNet-32 CIFAR, batch 128: eager vs the step as one CUDA graph (``train.cuda_graph``),
   vs the paper-style loop (target >= 5x with the graph);
3. ``objective``: AHBF / ONE M = 4, B = 256: eager vs the fused kernel vs the fused step captured in a CUDA
   graph, with the HBM floor (``objective_table.py``; target >= 30x eager in the graph);
4. ``correctness``: the native kernel against float64 for every graph, dtype and K (``gpu_check.py``);
5. ``engine_compile_regions``, ``engine_compile_regions_graphed``: the regional torch.compile settings,
   each in its own process (their cold compile seconds are measured);
6. ``kernel_variants`` (tile options, do_bench, sm_90 registers) and ``pipeline`` (JPEG decode img/s).

Every row is appended to ``<out>/<gpu>-<date>.rows.jsonl`` the moment it is measured, so a section cut by
its time limit keeps what it measured; ``.json`` and ``.md`` (with the targets table) are rewritten after
each section. ``--budget SECONDS`` runs the sections in order and skips, saying so, any whose estimate
(:data:`SECTIONS`, cold H100 seconds) no longer fits; a section's limit is also capped by what is left.
The suite measures the checkout it lives in (its root goes first on ``sys.path`` and into the workers'
``PYTHONPATH``): it runs from a clean checkout, installed or not.

Exit status: 1 if a check failed or a section raised; 0 otherwise (timeouts and skips are reported); 2
without a GPU (unless ``--smoke``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the checkout this file belongs to, whatever else is installed

import torch  # noqa: E402

R18 = [(("ahbf-r18",), ("bf16-cl-fused",), ("synthetic",))]
R32 = [(("ahbf-r32-b128",), ("bf16-cl-fused", "bf16-cl-fused-graphed"), ("synthetic",))]
REGIONS = [(("ahbf-r32-b128",), ("bf16-cl-fused-regions",), ("synthetic",))]
REGIONS_GRAPHED = [(("ahbf-r32-b128",), ("bf16-cl-fused-regions-graphed",), ("synthetic",))]


@dataclass(frozen=True)
class Section:
    name: str
    estimate_s: float  # wall seconds on one H100 started cold, process start included: what --budget plans with
    limit_s: float     # the section's process is killed after this
    smoke: bool = True  # runs under --smoke (torch.compile takes minutes on a 2-core CPU: compile sections do not)


SECTIONS = [Section("engine_r18", 100, 240), Section("engine_r32", 70, 180), Section("objective", 60, 150),
            Section("correctness", 110, 240), Section("engine_compile_regions", 150, 300, smoke=False),
            Section("engine_compile_regions_graphed", 150, 300, smoke=False), Section("kernel_variants", 70, 200),
            Section("pipeline", 50, 150)]


def run_section(name: str, ctx: dict) -> dict:
    import gpu_sections as gs

    groups = {"engine_r18": R18, "engine_r32": R32, "engine_compile_regions": REGIONS,
              "engine_compile_regions_graphed": REGIONS_GRAPHED}
    if name in groups:
        return gs.engine(ctx, groups[name])
    return getattr(gs, name)(ctx)


# ---- a section's process

def worker(name: str, rows_path: str, smoke: bool) -> int:
    """Run one section, appending ``{"section", "row"}`` per row and ``{"section", "summary" | "error"}`` last."""
    def emit(record: dict) -> None:
        with open(rows_path, "a") as f:
            f.write(json.dumps({"section": name, **record}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    with tempfile.TemporaryDirectory(prefix="ahbf_gpu_suite_") as scratch:
        ctx = {"device": "cpu" if smoke else "cuda", "smoke": smoke, "scratch": scratch,
               "log": lambda m: print(m, flush=True), "emit": lambda row: emit({"row": row})}
        try:
            summary = run_section(name, ctx)
        except Exception:
            emit({"error": traceback.format_exc()})
            raise
    emit({"summary": summary})
    return 0 if summary.get("ok", True) else 1


def launch(name: str, rows_path: str, smoke: bool, limit: float) -> tuple[str, float]:
    """The section in its own process (and process group), killed at ``limit`` seconds: (status, seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # before triton loads: the kernel runs on CPU tensors
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--rows", rows_path] + (["--smoke"] if smoke else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    try:
        code = proc.wait(timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the compile workers too
        proc.wait()
        return f"timeout after {limit:.0f} s", time.perf_counter() - t0
    return ("ok" if code == 0 else "FAILED" if code == 1 else f"error (exit {code})"), time.perf_counter() - t0


# ---- the report

def read_rows(rows_path: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if os.path.exists(rows_path):
        with open(rows_path) as f:
            for line in f:
                rec = json.loads(line)
                sec = out.setdefault(rec["section"], {"rows": []})
                if "row" in rec:
                    sec["rows"].append(rec["row"])
                else:
                    sec.update({k: v for k, v in rec.items() if k != "section"})
    return out


def targets(measured: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(what, measured, target) of the issue's GPU targets, from whatever rows exist."""
    def engine_ratio(section: str, setting: str) -> str:
        rows = [r for r in measured.get(section, {}).get("rows", []) if r.get("setting") == setting]
        return f"{rows[0]['vs_paper']:.2f}x" if rows else "not measured"

    obj = sorted((r for r in measured.get("objective", {}).get("rows", [])
                  if r.get("method") == "ahbf" and r.get("dtype") == "float32"), key=lambda r: r["K"])
    graph = obj[-1]["paths"].get("triton-graph", {}).get("speedup_vs_eager") if obj else None
    shape = f"B={obj[-1]['B']} K={obj[-1]['K']}" if obj else "B=256 K=1000"
    return [("AHBF ResNet-32 b128, CUDA-graphed step vs paper loop", engine_ratio("engine_r32", "bf16-cl-fused-graphed"), ">= 5x"),
            ("AHBF ResNet-18 224 px b256, bf16-cl-fused vs paper loop", engine_ratio("engine_r18", "bf16-cl-fused"), ">= 3x"),
            (f"objective step in a CUDA graph vs eager (AHBF M=4 {shape} fp32)",
             f"{graph:.1f}x" if graph else "not measured", ">= 30x")]


def markdown(result: dict, measured: dict[str, dict]) -> str:
    env = result["env"]
    lines = [f"# GPU suite: {env['device']}, {env['date']}", "",
             f"Command: `{env['command']}`; torch {env['torch']}, triton {env['triton']}, CPU {env['cpu']}. "
             f"Total {result['seconds']:.0f} s" + (f" of a {result['budget']:.0f} s budget" if result["budget"] else "") + ".",
             "", "| target | measured | asked |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(measured)]
    lines += ["", "| section | status | seconds | estimate s |", "|---|---|---|---|"]
    lines += [f"| {n} | {s['status']} | {s['seconds']:.1f} | {s['estimate_s']:.0f} |" for n, s in result["sections"].items()]
    for name, sec in measured.items():
        lines += ["", f"## {name}", ""]
        if sec.get("summary", {}).get("markdown"):
            lines.append(sec["summary"]["markdown"])
        else:  # cut off or failed: the rows it measured, as they are
            lines += ["rows measured before it stopped:", "```"] + [json.dumps(r, default=str)[:400] for r in sec["rows"]] + ["```"]
        if sec.get("error"):
            lines += ["```", sec["error"][-3000:], "```"]
    return "\n".join(lines) + "\n"


def write(stem: str, result: dict) -> None:
    measured = read_rows(stem + ".rows.jsonl")
    with open(stem + ".json", "w") as f:
        json.dump({**result, "measured": measured}, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result, measured))


def environment(device: str) -> dict:
    import objective_table
    from machine import cpu_name

    env = objective_table.environment(device, torch.get_num_threads())
    env["cpu"] = cpu_name()
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes (CI)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole run; 0 = no limit")
    ap.add_argument("--out", default=None, help="folder for the results (default: benchmarks/results; --smoke: a "
                                                "temporary folder)")
    ap.add_argument("--sections", default=",".join(s.name for s in SECTIONS), help="comma-separated subset, run in "
                                                                                   "the order of SECTIONS")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.rows, args.smoke)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: FAILED: no CUDA device here (use --smoke for the CPU run of the same code paths)",
              file=sys.stderr)
        return 2
    chosen = args.sections.split(",")
    unknown = set(chosen) - {s.name for s in SECTIONS}
    if unknown:
        print(f"gpu_suite: --sections: unknown {sorted(unknown)}; choose from {', '.join(s.name for s in SECTIONS)}",
              file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    out_dir = args.out or (tempfile.mkdtemp(prefix="ahbf_gpu_suite_") if args.smoke else os.path.join(HERE, "results"))
    os.makedirs(out_dir, exist_ok=True)
    env = environment(device)
    tag = "cpu-smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    stem = os.path.join(out_dir, f"{tag}-{datetime.date.today().isoformat()}")
    rows_path = stem + ".rows.jsonl"
    if os.path.exists(rows_path):
        os.remove(rows_path)
    start = time.perf_counter()
    result = {"env": env, "smoke": args.smoke, "budget": args.budget, "seconds": 0.0, "sections": {}}
    for sec in (s for s in SECTIONS if s.name in chosen):
        left = args.budget - (time.perf_counter() - start) if args.budget else float("inf")
        if args.smoke and not sec.smoke:
            status, seconds = "skipped: --smoke (torch.compile takes minutes on a CPU)", 0.0
        elif sec.estimate_s > left:
            status, seconds = f"skipped: needs ~{sec.estimate_s:.0f} s, {max(left, 0):.0f} s of the budget left", 0.0
        else:
            print(f"== {sec.name} (limit {min(sec.limit_s, left):.0f} s)", flush=True)
            status, seconds = launch(sec.name, rows_path, args.smoke, min(sec.limit_s, left))
        print(f"   {sec.name}: {status} ({seconds:.0f} s)", flush=True)
        result["sections"][sec.name] = {"status": status, "seconds": seconds, "estimate_s": sec.estimate_s}
        result["seconds"] = time.perf_counter() - start
        write(stem, result)  # after every section: what was measured so far, whatever comes next
    failed = [n for n, s in result["sections"].items() if s["status"] == "FAILED" or s["status"].startswith("error")]
    print(f"wrote {stem}.md, .json and .rows.jsonl in {result['seconds']:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "no check failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
