"""Everything only a GPU can show, in one command on one GPU, in at most 10 minutes.

    python benchmarks/gpu_suite.py                  # CUDA: benchmarks/results/<gpu>-<date>.json and .md
    python benchmarks/gpu_suite.py --smoke          # CPU, Triton interpreter, tiny sizes: the same code paths (CI)

Sections, in order (each timed; a section that raises is recorded as an error and the others still run):

1. ``correctness``: the native Triton kernel against the eager objective in float64 for every graph
   (AHBF M = 2..8 with the teacher detached or not, ONE, DML), fp32 / bf16 / fp16, K = 10 .. 100000,
   grad_output 65536 with fp16 logits (GradScaler's first scale), a torch.compile'd step
   (``gpu_check.run_checks``, mode ``full``).
2. ``kernel_variants``: the tile options of ``triton_okd.launch_config`` (node-tile size, warps, rows per
   program) at AHBF M = 4, B = 256, K = 1000 (fp32 and bf16): each checked against float64, timed with
   ``triton.testing.do_bench`` (the fused forward launch alone), with its sm_90 registers and spills
   (``kernel_registers.py``, compiled ahead of time).
3. ``objective``: the fused vs unfused objective table with device times and the HBM floor
   (``objective_table.py``), fp32 for AHBF / ONE / DML, and bf16 for AHBF.
4. ``pipeline``: ImageNet-style train pipeline images/s on generated JPEGs: DALI with the ``mixed`` (GPU)
   decoder when DALI is installed (``bench_pipeline.py``), and always ``torchvision.io.decode_jpeg`` on
   the GPU (batched), the path without DALI; the record says which ran.
5. ``engine``: ``bench_engine.py`` (end-to-end training steps vs the paper-style loop) for AHBF ResNet-32
   and ResNet-18, eager settings; reported as ``missing`` if that script is absent.
6. ``engine_compile``: the same with the torch.compile and CUDA-graph settings (last: the slowest to start).

Exit status: 0 if every correctness check passed and no section raised; 1 otherwise; 2 without a GPU
(unless ``--smoke``). ``--smoke`` writes to a fresh temporary folder unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

SMOKE = "--smoke" in sys.argv[1:]
if SMOKE and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernel runs on CPU tensors

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

import gpu_check  # noqa: E402
import objective_table  # noqa: E402
from machine import cpu_name  # noqa: E402

from ahbf.kernels import triton_okd  # noqa: E402
from ahbf.methods.ahbf import ahbf_graph  # noqa: E402

VARIANT_CASE = (256, 1000)  # B, K of the kernel-variant section (the acceptance case)


# ---- sections

def correctness(ctx: dict) -> dict:
    ok, rows = gpu_check.run_checks(ctx["device"], "interpret" if ctx["smoke"] else "full", log=ctx["log"])
    failed = [f"{r['case']} ({r['backend']})" for r in rows if not r["ok"]]
    return {"ok": ok, "cases": len(rows), "failed": failed, "rows": rows}


def kernel_variants(ctx: dict) -> dict:
    import kernel_registers  # its VARIANTS only (no compile here)

    B, K = (4, 40) if ctx["smoke"] else VARIANT_CASE
    variants = kernel_registers.VARIANTS[:2] if ctx["smoke"] else kernel_registers.VARIANTS
    rows, ok = [], True
    g = ahbf_graph(4)
    for dtype in ([torch.float32] if ctx["smoke"] else [torch.float32, torch.bfloat16]):
        z, s, y = gpu_check.inputs(g, B, K, dtype, ctx["device"])
        case = objective_table.Case("ahbf", g, z, s, y)
        for label, tile, warps, per_program in variants:
            cfg = triton_okd.launch_config(g.num_nodes, K, B, ctx["smoke"], tile=tile, num_warps=warps,
                                           rows=per_program)
            err = variant_error(case, cfg)
            limit = gpu_check.LIMITS[dtype]
            ok &= err < limit
            launch = objective_table.triton_kernel_only(case, cfg)
            row = {"variant": label, "dtype": str(dtype).replace("torch.", ""), "B": B, "K": K, "block_k": cfg.block_k,
                   "num_warps": cfg.num_warps, "rows": cfg.rows, "max_rel_err": err, "limit": limit,
                   "kernel_ms": objective_table.kernel_ms(launch, ctx["device"], reps=1 if ctx["smoke"] else 5)}
            rows.append(row)
            ctx["log"](f"  {row['dtype']:8s} {label:26s} BK={cfg.block_k:5d} warps={cfg.num_warps:2d} "
                       f"rows={cfg.rows}  err {err:.1e}  kernel {row['kernel_ms']:.4f} ms")
    try:  # ~5 s per ahead-of-time compile; a failing ptxas must not discard the timed rows
        regs, regs_error = sm90_registers(ctx, K, 1 if ctx["smoke"] else len(variants)), None
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        regs, regs_error = [], " ".join(str(err).split())[-300:]
        ctx["log"](f"  sm_90 registers not read: {regs_error}")
    for r in rows:  # fp32 rows only (bf16 registers differ: kernel_registers.py --dtypes bf16)
        match = [x for x in regs if x["variant"] == r["variant"] and r["dtype"] == "float32"]
        if match:
            r.update(registers=match[0]["registers"], spills=match[0]["spill_stores"],
                     warps_per_sm=match[0]["warps_per_sm"])
    return {"ok": ok, "rows": rows, "registers_sm90": regs, "registers_error": regs_error}


def sm90_registers(ctx: dict, K: int, n_variants: int) -> list[dict]:
    """``kernel_registers.py`` for AHBF M = 4, fp32, in a subprocess: the interpreter (``--smoke``) cannot
    compile ``triton.jit`` functions, and an ahead-of-time compile needs no GPU either way."""
    path = os.path.join(ctx["scratch"], "registers.json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(HERE, "kernel_registers.py"), "--branches", "4", "--dtypes", "fp32",
           "--classes", str(K), "--variants", str(n_variants), "--out", path]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"kernel_registers.py exited {done.returncode}: {done.stderr.strip()[-500:]}")
    for line in done.stdout.splitlines():
        if line.startswith("ahbf "):
            ctx["log"]("  " + line)
    with open(path) as f:
        return json.load(f)["rows"]


def variant_error(case, cfg) -> float:
    """Max relative error (loss, terms, fp32 gradients) of one launch configuration against float64."""
    from ahbf.kernels import okd_objective_reference
    from ahbf.kernels.encoding import encode, score_matrix

    z64 = [t.detach().double().requires_grad_() for t in case.z]
    s64 = [t.detach().double().requires_grad_() for t in case.s]
    ref, _ = okd_objective_reference(z64, s64, case.labels, case.graph, objective_table.T, objective_table.KD_SCALE)
    ref_grads = torch.autograd.grad(ref, z64 + s64)
    enc = encode(case.graph)
    scores = score_matrix([t.detach() for t in case.s], case.graph, case.z[0]).contiguous()
    kd = torch.full((1,), objective_table.KD_SCALE, device=case.z[0].device)
    loss, _, dz, ds = triton_okd.okd_fused_triton([t.detach() for t in case.z], scores, case.labels, kd, enc,
                                                  objective_table.T, True, block_k=cfg.block_k, rows=cfg.rows,
                                                  num_warps=cfg.num_warps)
    ds_split = torch.split(ds, case.graph.score_widths, dim=1)

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return max([rel(loss, ref)] + [rel(a, b) for a, b in zip(list(dz) + list(ds_split), ref_grads)])


def objective(ctx: dict) -> dict:
    out = {}
    if ctx["smoke"]:
        runs = {"fp32": ["--methods", "ahbf", "--batches", "2", "--classes", "20", "--paths", "eager,triton",
                         "--warmup", "1", "--reps", "2", "--rounds", "1", "--hbm-floor", "--bandwidth-mib", "4"]}
    else:
        runs = {"fp32": ["--batches", "256"],  # each case recompiles the compiled path: keep to 6 cases
                "bf16": ["--dtype", "bfloat16", "--methods", "ahbf", "--batches", "256", "--classes", "1000"]}
    for name, extra in runs.items():
        path = os.path.join(ctx["scratch"], f"objective_{name}.json")
        out[name] = objective_table.main(["--device", ctx["device"], "--out", path, *extra])
        with open(os.path.splitext(path)[0] + ".md") as f:
            out[name]["markdown"] = f.read()
    return out


def pipeline(ctx: dict) -> dict:
    import bench_pipeline
    from ahbf.pipelines.dali import dali_available

    n, batch, size = (16, 8, 32) if ctx["smoke"] else (1536, 256, 224)
    images = os.path.join(ctx["scratch"], "jpegs")
    bench_pipeline.make_jpegs(images, n)
    out = {"decode_jpeg": decode_jpeg_rate(images, batch, size, ctx["device"], repeats=2 if ctx["smoke"] else 4)}
    rate = out["decode_jpeg"]["median_img_s"]
    ctx["log"](f"  torchvision.io.decode_jpeg(device={ctx['device']!r}): {rate:.0f} img/s")
    if dali_available():
        rec = bench_pipeline.main(["--device", ctx["device"], "--images", str(n), "--batch-size", str(batch),
                                   "--size", str(size), "--repeats", "2" if ctx["smoke"] else "4",
                                   "--rows", "dali" if ctx["smoke"] else "dali,torch",
                                   "--out", os.path.join(ctx["scratch"], "pipeline")])
        out["dali"] = rec
        out["note"] = f"DALI decoder {'mixed (GPU)' if ctx['device'] == 'cuda' else 'cpu'}"
    else:
        out["note"] = "DALI is not installed: only torchvision.io.decode_jpeg ran"
    return out


def decode_jpeg_rate(folder: str, batch: int, size: int, device: str, repeats: int) -> dict:
    """Images/s of a batched ``torchvision.io.decode_jpeg(device=...)`` train pipeline: file bytes read on
    the host, decoded on ``device``, a random crop (8-100 % area) resized to ``size``, flip, normalise,
    channels-last float batches. The first epoch is a warm-up."""
    import torchvision.io as tio

    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith((".jpg", ".jpeg")))
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    gen = torch.Generator().manual_seed(0)
    rates = []
    for rep in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(files), batch):
            data = [tio.read_file(f) for f in files[i:i + batch]]
            imgs = tio.decode_jpeg(data, device=device)
            crops = []
            for img in imgs:
                h, w = img.shape[1:]
                area = float(torch.empty(1).uniform_(0.08, 1.0, generator=gen)) * h * w
                ch, cw = min(h, max(8, int(area ** 0.5))), min(w, max(8, int(area ** 0.5)))
                y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                crop = img[None, :, y0:y0 + ch, x0:x0 + cw].float()
                crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
                crops.append(crop.flip(3) if bool(torch.randint(0, 2, (1,), generator=gen)) else crop)
            x = ((torch.cat(crops) - mean) / std).contiguous(memory_format=torch.channels_last)
        sync(device)
        if rep > 0 or repeats == 1:
            rates.append(len(files) / (time.perf_counter() - t0))
        del x
    rates.sort()
    return {"pipeline": f"torchvision.io.decode_jpeg(device={device!r}), crop+resize+flip+normalise per batch",
            "median_img_s": rates[len(rates) // 2], "runs_img_s": [round(r, 1) for r in rates],
            "images": len(files), "batch_size": batch, "crop": size}


# bench_engine rows on a GPU (the paper-style loop is always measured too). ``engine``: both models with the
# engine's eager settings, ResNet-18 also end to end on the JPEG pipeline. ``engine_compile``: the compile and
# CUDA-graph variants, a section of their own and the last one: on the first H200 run (2026-12-04) the
# ResNet-32 compile setting did not finish in 255 s, and a section is written only when it ends.
ENGINE_GPU = [
    (("ahbf-r32-b64",), ("fp32", "bf16-cl-fused"), ("synthetic",)),
    (("ahbf-r18",), ("bf16-cl-fused",), ("synthetic", "folder")),
]
ENGINE_COMPILE_GPU = [
    (("ahbf-r32-b64",), ("bf16-cl-fused-cudagraphs", "bf16-cl-fused-branches", "bf16-cl-fused-compile"),
     ("synthetic",)),
    (("ahbf-r18",), ("bf16-cl-fused-cudagraphs",), ("synthetic",)),
]
# --smoke: the same calls at tiny sizes; settings without torch.compile (minutes on a 2-core CPU)
ENGINE_SMOKE = [(("ahbf-r32-b64",), ("fp32", "bf16-cl"), ("synthetic",))]


def engine(ctx: dict, groups: list | None = None) -> dict:
    """``bench_engine.run`` (the engine benchmark, its own script), imported lazily; ``missing`` if absent."""
    if not os.path.exists(os.path.join(HERE, "bench_engine.py")):
        return {"status": "missing", "note": "benchmarks/bench_engine.py is not there yet; nothing measured"}
    import bench_engine

    rows = []
    for models, settings, data in (ENGINE_SMOKE if ctx["smoke"] else groups or ENGINE_GPU):
        rows += bench_engine.run(models=models, settings=settings, data=data, device=ctx["device"],
                                 smoke=ctx["smoke"], rounds=2 if ctx["smoke"] else 5, reps=2 if ctx["smoke"] else 5,
                                 warmup=1 if ctx["smoke"] else 3, profile=not ctx["smoke"])
    info = bench_engine.machine(torch.device(ctx["device"]), torch.get_num_threads())
    return {"status": "ran", "rows": rows, "markdown": bench_engine.markdown(rows, info)}


def engine_compile(ctx: dict) -> dict:
    if ctx["smoke"]:  # torch.compile takes minutes on a 2-core CPU: the smoke run covers the code path above
        return {"status": "skipped", "note": "--smoke: compile settings are not run on CPU"}
    return engine(ctx, ENGINE_COMPILE_GPU)


SECTIONS = {"correctness": correctness, "kernel_variants": kernel_variants, "objective": objective,
            "pipeline": pipeline, "engine": engine, "engine_compile": engine_compile}


# ---- driver and report

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def environment(device: str) -> dict:
    env = objective_table.environment(device, torch.get_num_threads())
    env["cpu"] = cpu_name()
    try:
        import nvidia.dali
        env["nvidia-dali"] = nvidia.dali.__version__
    except ImportError:
        env["nvidia-dali"] = None
    return env


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# GPU suite: {env['device']}, {env['date']}", "",
             f"Command: `{env['command']}`; torch {env['torch']}, triton {env['triton']}, DALI {env['nvidia-dali']}, "
             f"CPU {env['cpu']}. Total {result['seconds']:.0f} s.", "",
             "| section | status | seconds |", "|---|---|---|"]
    for name, sec in result["sections"].items():
        lines.append(f"| {name} | {sec['status']} | {sec['seconds']:.1f} |")
    corr = result["sections"].get("correctness", {}).get("result")
    if corr:
        lines += ["", f"## Correctness vs float64: {corr['cases']} checks, {'all passed' if corr['ok'] else 'FAILED'}",
                  "", "| case | backend | loss/ce/kd err | grad err | limit | ok |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['backend']} | {r['scalar_err']:.1e} | {r['grad_err']:.1e} | {r['limit']:.0e} | "
                  f"{'ok' if r['ok'] else '**FAIL**'} |" for r in corr["rows"]]
    var = result["sections"].get("kernel_variants", {}).get("result")
    if var:
        lines += ["", "## Kernel tile variants (fused forward launch alone, do_bench median)", "",
                  "| dtype | variant | B x K | BK | warps | rows/program | registers (sm_90) | warps/SM | err | "
                  "kernel ms |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['variant']} | {r['B']}x{r['K']} | {r['block_k']} | {r['num_warps']} | "
                  f"{r['rows']} | {r.get('registers', '-')} | {r.get('warps_per_sm', '-')} | {r['max_rel_err']:.1e} | "
                  f"{r['kernel_ms']:.4f} |" for r in var["rows"]]
    obj = result["sections"].get("objective", {}).get("result")
    if obj:
        for name, rec in obj.items():
            lines += ["", f"## Objective, {name}", "", rec["markdown"]]
    pipe = result["sections"].get("pipeline", {}).get("result")
    if pipe:
        lines += ["", f"## Pipeline ({pipe['note']})", "",
                  f"- {pipe['decode_jpeg']['pipeline']}: **{pipe['decode_jpeg']['median_img_s']:.0f} img/s** "
                  f"(batch {pipe['decode_jpeg']['batch_size']}, crop {pipe['decode_jpeg']['crop']})"]
        for r in (pipe.get("dali") or {}).get("results", {}).values():
            lines.append(f"- {r['pipeline']}: **{r['median_img_s']:.0f} img/s** (pipeline build "
                         f"{r.get('pipeline_build_s') or 0:.2f} s/epoch, not included)")
    for name in ("engine", "engine_compile"):
        eng = result["sections"].get(name, {})
        lines += ["", f"## {name} (bench_engine.py)", "", f"status: {eng.get('status')}"]
        if (eng.get("result") or {}).get("markdown"):
            lines += ["", eng["result"]["markdown"]]
    for name, sec in result["sections"].items():
        if sec.get("error"):
            lines += ["", f"### {name}: error", "```", sec["error"][-3000:], "```"]
    return "\n".join(lines) + "\n"


def write(stem: str, result: dict) -> None:
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes (CI)")
    ap.add_argument("--out", default=None,
                    help="folder for <gpu>-<date>.json/.md (default: benchmarks/results; with --smoke a temporary "
                         "folder)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    args = ap.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_suite: --smoke needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: FAILED: no CUDA device here (use --smoke for the CPU run of the same code paths)",
              file=sys.stderr)
        return 2
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        print(f"gpu_suite: --sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    out_dir = args.out or (tempfile.mkdtemp(prefix="ahbf_gpu_suite_") if args.smoke else objective_table.RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    env = environment(device)
    tag = "cpu-smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    stem = os.path.join(out_dir, f"{tag}-{datetime.date.today().isoformat()}")
    t_all = time.perf_counter()
    result = {"env": env, "smoke": args.smoke, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="ahbf_gpu_suite_scratch_") as scratch:
        ctx = {"device": device, "smoke": args.smoke, "scratch": scratch, "log": lambda m: print(m, flush=True)}
        for name in args.sections.split(","):
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            sec: dict = {}
            try:
                sec["result"] = SECTIONS[name](ctx)
                sec["status"] = sec["result"].get("status", "ok" if sec["result"].get("ok", True) else "FAILED")
            except Exception:  # record and go on: one broken section must not hide the others
                sec["status"], sec["error"] = "error", traceback.format_exc()
                print(sec["error"], file=sys.stderr, flush=True)
            sec["seconds"] = time.perf_counter() - t0
            if name == "engine" and sec["status"] == "missing":
                print("  engine: MISSING (benchmarks/bench_engine.py not found)", flush=True)
            result["sections"][name] = sec
            result["seconds"] = time.perf_counter() - t_all
            write(stem, result)  # after every section: a run cut off by a time limit keeps what it measured
    if not args.smoke and result["seconds"] > 600:
        print(f"gpu_suite: took {result['seconds']:.0f} s, over the 10-minute budget: trim the slowest section "
              f"({max(result['sections'], key=lambda n: result['sections'][n]['seconds'])})", flush=True)
    failed = [n for n, s in result["sections"].items() if s["status"] in ("error", "FAILED")]
    print(f"wrote {stem}.json and {stem}.md in {result['seconds']:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "all sections passed"
             + (" (engine missing)" if result["sections"].get("engine", {}).get("status") == "missing" else "")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
