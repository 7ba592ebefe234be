"""The sections of ``gpu_suite.py``: each measures one thing and hands every row to ``ctx["emit"]`` the moment
it is measured. ``ctx``: ``device`` (cuda, or cpu under ``--smoke``), ``smoke`` (tiny sizes, Triton
interpreter), ``scratch`` (a temporary folder), ``log`` and ``emit``. A section returns a summary: ``ok``
(False: a check failed), ``markdown`` (its table), and anything else worth keeping.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

import gpu_check
import objective_table
from ahbf.kernels import triton_okd
from ahbf.methods.ahbf import ahbf_graph

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANT_CASE = (256, 1000)  # B, K of the kernel-variant section (the acceptance case)


# ---- the engine: bench_engine.py groups (the paper-style loop is measured beside every group)

def engine(ctx: dict, groups: list[tuple]) -> dict:
    """``bench_engine.run`` per (models, settings, data) group; rows emitted group by group."""
    import bench_engine

    rows = []
    for models, settings, data in groups:
        got = bench_engine.run(models=models, settings=settings, data=data, device=ctx["device"], smoke=ctx["smoke"],
                               rounds=2 if ctx["smoke"] else 5, reps=2 if ctx["smoke"] else 5,
                               warmup=1 if ctx["smoke"] else 3, profile=False)
        for r in got:
            ctx["emit"](r)
            ctx["log"](f"  {r['desc']} {r['data']} {r['setting']}: {r['img_s']:.0f} img/s, {r['vs_paper']:.2f}x paper, "
                       f"compile {r['compile_s']:.1f} s")
        rows += got
    info = bench_engine.machine(torch.device(ctx["device"]), torch.get_num_threads())
    return {"markdown": bench_engine.markdown(rows, info)}


# ---- the objective: eager vs fused vs fused in a CUDA graph

def objective(ctx: dict) -> dict:
    dev = ctx["device"]
    cases = [("ahbf", 2, 20, torch.float32)] if ctx["smoke"] else [
        ("ahbf", 256, 1000, torch.float32), ("ahbf", 256, 100, torch.float32), ("ahbf", 256, 1000, torch.bfloat16),
        ("one", 256, 1000, torch.float32)]
    paths = ["eager", "triton", "triton-graph"]
    bandwidth = objective_table.copy_bandwidth(dev, 4 if ctx["smoke"] else 512)
    rows = []
    for method, B, K, dtype in cases:
        case = objective_table.make_case(method, 4, B, K, dev, dtype)
        row = objective_table.run_case(case, paths, dev, warmup=1 if ctx["smoke"] else 3, reps=2 if ctx["smoke"] else 10,
                                       rounds=1 if ctx["smoke"] else 3, bandwidth=bandwidth)
        ctx["emit"](row)
        rows.append(row)
        ps = row["paths"]
        ctx["log"](f"  {case.name} {row['dtype']}: " + " ".join(f"{p}={ps[p]['median_ms']:.3f}ms" for p in paths))
    env = objective_table.environment(dev, torch.get_num_threads())
    env["bandwidth_gbs"] = bandwidth / 1e9
    return {"markdown": objective_table.markdown({"env": env, "rows": rows})}


# ---- correctness: the native kernel against float64

def correctness(ctx: dict) -> dict:
    ok, rows = gpu_check.run_checks(ctx["device"], "interpret" if ctx["smoke"] else "full", log=ctx["log"],
                                    on_row=ctx["emit"])
    failed = [f"{r['case']} ({r['backend']})" for r in rows if not r["ok"]]
    lines = [f"{len(rows)} checks against float64, {'all passed' if ok else 'FAILED: ' + ', '.join(failed)}", "",
             "| case | backend | loss/ce/kd err | grad err | limit | ok |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['backend']} | {r['scalar_err']:.1e} | {r['grad_err']:.1e} | {r['limit']:.0e} | "
              f"{'ok' if r['ok'] else '**FAIL**'} |" for r in rows]
    return {"ok": ok, "failed": failed, "markdown": "\n".join(lines) + "\n"}


# ---- the kernel's tile variants

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
            cfg = triton_okd.launch_config(g.num_nodes, K, B, ctx["smoke"], tile=tile, num_warps=warps, rows=per_program)
            err, limit = variant_error(case, cfg), gpu_check.LIMITS[dtype]
            ok &= err < limit
            launch = objective_table.triton_kernel_only(case, cfg)
            row = {"variant": label, "dtype": str(dtype).replace("torch.", ""), "B": B, "K": K, "block_k": cfg.block_k,
                   "num_warps": cfg.num_warps, "rows": cfg.rows, "max_rel_err": err, "limit": limit,
                   "kernel_ms": objective_table.kernel_ms(launch, ctx["device"], reps=1 if ctx["smoke"] else 5)}
            ctx["emit"](row)
            rows.append(row)
    try:  # ~5 s per ahead-of-time compile; a failing ptxas must not discard the timed rows
        regs, regs_error = sm90_registers(ctx, K, 1 if ctx["smoke"] else len(variants)), None
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        regs, regs_error = [], " ".join(str(err).split())[-300:]
    by_variant = {r["variant"]: r for r in regs}
    lines = ["| dtype | variant | B x K | BK | warps | rows/program | registers (sm_90, fp32) | err | kernel ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['variant']} | {r['B']}x{r['K']} | {r['block_k']} | {r['num_warps']} | {r['rows']} | "
              f"{by_variant.get(r['variant'], {}).get('registers', '-')} | {r['max_rel_err']:.1e} | {r['kernel_ms']:.4f} |"
              for r in rows]
    return {"ok": ok, "registers_sm90": regs, "registers_error": regs_error, "markdown": "\n".join(lines) + "\n"}


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
    with open(path) as f:
        return json.load(f)["rows"]


def variant_error(case, cfg) -> float:
    """Max relative error (loss, terms, fp32 gradients) of one launch configuration against float64."""
    from ahbf.kernels import okd_objective_reference
    from ahbf.kernels.encoding import encode

    z64 = [t.detach().double().requires_grad_() for t in case.z]
    s64 = [t.detach().double().requires_grad_() for t in case.s]
    ref, _ = okd_objective_reference(z64, s64, case.labels, case.graph, objective_table.T, objective_table.KD_SCALE)
    ref_grads = torch.autograd.grad(ref, z64 + s64)
    kd = torch.full((1,), objective_table.KD_SCALE, device=case.z[0].device)
    loss, _, dz, ds = triton_okd.okd_fused_triton([t.detach() for t in case.z], [t.detach() for t in case.s],
                                                  case.labels, kd, encode(case.graph), objective_table.T, True,
                                                  block_k=cfg.block_k, rows=cfg.rows, num_warps=cfg.num_warps)

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return max([rel(loss, ref)] + [rel(a, b) for a, b in zip(list(dz) + list(ds), ref_grads)])


# ---- the input pipeline

def pipeline(ctx: dict) -> dict:
    import bench_pipeline
    from ahbf.pipelines.dali import dali_available

    n, batch, size = (16, 8, 32) if ctx["smoke"] else (1536, 256, 224)
    images = os.path.join(ctx["scratch"], "jpegs")
    bench_pipeline.make_jpegs(images, n)
    row = decode_jpeg_rate(images, batch, size, ctx["device"], repeats=2 if ctx["smoke"] else 4)
    ctx["emit"](row)
    lines = [f"- {row['pipeline']}: **{row['median_img_s']:.0f} img/s** (batch {batch}, crop {size})"]
    if dali_available():
        rec = bench_pipeline.main(["--device", ctx["device"], "--images", str(n), "--batch-size", str(batch),
                                   "--size", str(size), "--repeats", "2" if ctx["smoke"] else "4",
                                   "--rows", "dali" if ctx["smoke"] else "dali,torch",
                                   "--out", os.path.join(ctx["scratch"], "pipeline")])
        for r in rec.get("results", {}).values():
            ctx["emit"](r)
            lines.append(f"- {r['pipeline']}: **{r['median_img_s']:.0f} img/s**")
    else:
        lines.append("- DALI is not installed: only torchvision.io.decode_jpeg ran")
    return {"markdown": "\n".join(lines) + "\n"}


def decode_jpeg_rate(folder: str, batch: int, size: int, device: str, repeats: int) -> dict:
    """Images/s of a batched ``torchvision.io.decode_jpeg(device=...)`` train pipeline: file bytes read on
    the host, decoded on ``device``, a random crop (8-100 % area) resized to ``size``, flip, normalise,
    channels-last float batches. The first epoch is a warm-up."""
    import torchvision.io as tio

    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.lower().endswith((".jpg", ".jpeg")))
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    gen = torch.Generator().manual_seed(0)
    rates = []
    for rep in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(files), batch):
            imgs = tio.decode_jpeg([tio.read_file(f) for f in files[i:i + batch]], device=device)
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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
