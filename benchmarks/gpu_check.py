"""One call on a CUDA machine: native Triton correctness vs float64, then the timing table.

    python benchmarks/gpu_check.py                 # CUDA: checks + objective_table (fp32, then bf16)
    python benchmarks/gpu_check.py --no-table      # checks only
    python benchmarks/gpu_check.py --interpret     # no GPU: a few small checks through the Triton interpreter

Checks: ``okd_loss(..., backend="triton")`` (and ``compiled`` for a few cases) against the eager
objective evaluated in float64 on the same device: loss, CE, KD and the gradient of every branch logit
and score tensor, for AHBF M = 2..8 (teacher detached or not), ONE, DML, K = 10 .. 21843, fp32 / bf16 /
fp16, a 41 x 1003 non-power-of-two shape, grad_output != 1, extreme logits, and a torch.compile'd step.
Error = max |fused - ref| / max |ref| per tensor; limits as in tests/test_kernel_okd.py.
Exit status 1 if any check fails.

Without CUDA it fails (exit status 2, one line saying so): it exists to check the native kernel.
``--interpret`` runs a few small checks through the Triton interpreter on CPU instead (CI smoke) and
skips the table.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

CUDA = torch.cuda.is_available()
if "--interpret" in sys.argv[1:] and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (lazily, by the op)


from ahbf.kernels import okd_loss, okd_objective_reference  # noqa: E402
from ahbf.methods.ahbf import ahbf_graph  # noqa: E402
from ahbf.methods.dml import dml_graph  # noqa: E402
from ahbf.methods.one import one_graph  # noqa: E402

LIMITS = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # gradients; loss terms: 1e-5


def inputs(graph, B, K, dtype, device, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = [(scale * torch.randn(B, K, generator=gen)).to(device, dtype) for _ in range(graph.num_branches)]
    s = [torch.randn(B, w, generator=gen).to(device, dtype) for w in graph.score_widths]
    y = torch.randint(0, K, (B,), generator=gen).to(device)
    return z, s, y


def errors(graph, z, s, y, backend, go=1.7, kd_scale=0.75, T=3.0, compiled_step=False):
    """Max relative errors of (loss, ce, kd, grads...) vs the float64 eager objective."""
    z64 = [t.double().requires_grad_() for t in z]
    s64 = [t.double().requires_grad_() for t in s]
    ref, ref_terms = okd_objective_reference(z64, s64, y, graph, T, kd_scale)
    ref_grads = torch.autograd.grad(ref * go, z64 + s64)
    zl = [t.clone().requires_grad_() for t in z]
    sl = [t.clone().requires_grad_() for t in s]
    if compiled_step:
        fn = torch.compile(lambda a, b, c, k: okd_loss(a, b, c, graph, T, k, backend=backend), fullgraph=True)
        loss, terms = fn(zl, sl, y, torch.tensor(kd_scale, device=y.device))
    else:
        loss, terms = okd_loss(zl, sl, y, graph, T, kd_scale, backend=backend)
    grads = torch.autograd.grad(loss * go, zl + sl)

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
    scalars = max(rel(loss, ref), rel(terms["ce"], ref_terms["ce"]), rel(terms["kd"], ref_terms["kd"]))
    return finite, scalars, max(rel(a, b) for a, b in zip(grads, ref_grads))


def check_cases(mode: str) -> list[tuple]:
    """``(name, graph, B, K, dtype, kwargs)``. ``mode``: ``gpu`` (this script), ``full`` (every graph x dtype,
    K sweep in every dtype: ``gpu_suite.py``), ``interpret`` (a handful of small ones, CPU)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    graphs = [(f"ahbf M={M} detach={d}", ahbf_graph(M, detach_teacher=d)) for M in range(2, 9) for d in (False, True)]
    graphs += [("one M=4", one_graph(4)), ("one M=8 no-detach", one_graph(8, detach_teacher=False)),
               ("dml M=4", dml_graph(4)), ("dml M=4 no-detach", dml_graph(4, detach_teacher=False))]
    dtypes = (f32, bf16, f16) if mode == "full" else (f32,)
    cases = []
    for dt in dtypes:
        B, K = (64, 1000) if mode == "full" else (16, 100)
        cases += [(f"{name} {B}x{K} {dt}", g, B, K, dt, {}) for name, g in graphs]
        for B, K in [(64, 10), (64, 100), (256, 1000), (32, 1003), (8, 21843), (4, 100000)]:
            cases.append((f"ahbf M=4 B={B} K={K} {dt}", ahbf_graph(4), B, K, dt, {}))
    for dt in (f32, bf16, f16):
        cases.append((f"ahbf M=4 41x1003 {dt} go=-2.5", ahbf_graph(4), 41, 1003, dt, {"go": -2.5}))
        if mode != "full":
            cases.append((f"ahbf M=8 128x1000 {dt}", ahbf_graph(8), 128, 1000, dt, {}))
    # GradScaler's first loss scale: grad_output 65536 with fp16 logits must give finite fp16 gradients
    B, K = (8, 100) if mode == "interpret" else (64, 1000)
    scaled = (f"ahbf M=4 {B}x{K} fp16 go=65536 (loss scale)", ahbf_graph(4), B, K, f16, {"go": 65536.0})
    if mode == "interpret":
        return [c for c in cases if c[2] * c[3] <= 16 * 100][:6] + [scaled]
    return cases + [scaled, ("ahbf M=4 extreme logits", ahbf_graph(4), 16, 1000, f32, {"scale": 3e3})]


def run_checks(device: str, mode: str = "gpu", log=print, on_row=None) -> tuple[bool, list[dict]]:
    """Every case of :func:`check_cases` on ``triton`` (and fp32 ones on ``compiled``, except ``interpret``).

    Returns (all passed, one row per case and backend: errors, limit, finite, ok); ``on_row(row)`` is called
    with each row as soon as it is checked."""
    ok, rows = True, []
    on_row = on_row or (lambda row: None)
    log(f"{'case':45s} {'backend':9s} finite  loss/ce/kd err  grad err  limit")
    backends = ["triton"] + (["compiled"] if mode == "gpu" else [])
    for name, g, B, K, dt, kw in check_cases(mode):
        go = kw.get("go", 1.7)
        z, s, y = inputs(g, B, K, dt, device, scale=kw.get("scale", 3.0))
        for backend in backends:
            if backend == "compiled" and (dt != torch.float32 or B * K > 256 * 1000 or "detach=True" in name):
                continue
            finite, e_scalar, e_grad = errors(g, z, s, y, backend, go=go)
            limit = LIMITS[dt] * (100 if "extreme" in name else 1)  # |z| ~ 1e4: eager fp32 is off by ~3e-4 too
            good = finite and e_scalar < 1e-5 * (10 if "extreme" in name else 1) and e_grad < limit
            ok &= good
            rows.append({"case": name, "backend": backend, "finite": finite, "scalar_err": e_scalar,
                         "grad_err": e_grad, "limit": limit, "ok": good})
            on_row(rows[-1])
            log(f"{name:45s} {backend:9s} {str(finite):6s}  {e_scalar:14.2e}  {e_grad:8.2e}  {limit:.0e}"
                f"  {'ok' if good else 'FAIL'}")
    g = ahbf_graph(4)
    z, s, y = inputs(g, 64 if mode != "interpret" else 8, 1000 if mode != "interpret" else 50, torch.float32, device)
    for backend in backends:
        finite, e_scalar, e_grad = errors(g, z, s, y, backend, compiled_step=True)
        good = finite and e_scalar < 1e-5 and e_grad < 1e-5
        ok &= good
        rows.append({"case": "torch.compile(fullgraph) step, ahbf M=4", "backend": backend, "finite": finite,
                     "scalar_err": e_scalar, "grad_err": e_grad, "limit": 1e-5, "ok": good})
        on_row(rows[-1])
        log(f"{'torch.compile(fullgraph) step, ahbf M=4':45s} {backend:9s} {str(finite):6s}  {e_scalar:14.2e}  "
            f"{e_grad:8.2e}  1e-05  {'ok' if good else 'FAIL'}")
    return ok, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-table", action="store_true", help="correctness checks only")
    ap.add_argument("--interpret", action="store_true",
                    help="no GPU: a few small checks through the Triton interpreter on CPU (no table)")
    args = ap.parse_args(argv)
    if not CUDA and not args.interpret:
        print("gpu_check: FAILED: no CUDA device here; this script checks the native Triton kernel on a GPU "
              "(use --interpret for the CPU interpreter checks)", file=sys.stderr)
        return 2
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check: --interpret needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
        return 2
    device = "cpu" if args.interpret else "cuda"
    print(f"device: {'cpu (Triton interpreter, small checks)' if args.interpret else torch.cuda.get_device_name()}")
    ok, _ = run_checks(device, "interpret" if args.interpret else "gpu", log=lambda m: print(m, flush=True))
    print("correctness:", "ALL OK" if ok else "FAILURES")
    if not args.interpret and not args.no_table:
        import objective_table
        objective_table.main(["--device", "cuda"])
        objective_table.main(["--device", "cuda", "--dtype", "bfloat16", "--methods", "ahbf",
                              "--out", os.path.join(objective_table.RESULTS, "objective_cuda_bf16.json")])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
