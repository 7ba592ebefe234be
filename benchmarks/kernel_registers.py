"""Registers and spills of the fused OKD kernel's tile variants, compiled ahead of time for sm_90 (no GPU needed).

    python benchmarks/kernel_registers.py                  # AHBF M = 4 and 8, fp32 and bf16, K = 1000
    python benchmarks/kernel_registers.py --branches 4 --dtypes fp32 --out /tmp/regs.json

Each variant (:data:`VARIANTS`: node-tile elements, warps, rows per program) is compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (H100) and its PTX assembled with Triton's bundled
``ptxas -v``, which reports registers per thread and spill bytes. From the registers follows how many
programs fit on one SM (65536 registers, at most 2048 threads), which is what the issue's "255 registers
with 8 warps: one block per SM" was about. These are compile-time facts only; which variant is fastest
is measured on a GPU by ``benchmarks/gpu_suite.py``. The PTX's vector (64/128-bit) global loads and
stores are counted too: the launcher passes K as ``K_units * KA`` (KA = the power of two <= 16 dividing K)
so that rows are provably aligned and K = 1000 gets 128-bit accesses.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time


import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ahbf.kernels import triton_okd  # noqa: E402
from ahbf.kernels.encoding import encode  # noqa: E402
from ahbf.methods import build_graph  # noqa: E402

# (label, tile elements NP x BK, num_warps, rows per program); the first is the default launch_config
VARIANTS = [("default", None, None, 1), ("tile 4096, 8 warps", 4096, 8, 1), ("tile 4096, 4 warps", 4096, 4, 1),
            ("tile 2048, 4 warps", 2048, 4, 1), ("tile 2048, 2 warps", 2048, 2, 1), ("tile 1024, 2 warps", 1024, 2, 1),
            ("tile 8192, 16 warps", 8192, 16, 1), ("default, 4 rows/program", None, None, 4)]
TRITON_DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
REGS_PER_SM, THREADS_PER_SM = 65536, 2048


def _signature(dtype: str) -> dict[str, str]:
    sig = {}
    for name, p in zip(triton_okd._okd_fused_kernel.arg_names, triton_okd._okd_fused_kernel.params):
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif re.fullmatch(r"[zs]\d", name):
            sig[name] = f"*{dtype}"
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name == "gi_ptr":
            sig[name] = "*i32"
        elif name.endswith(("_ptr", "_out")):
            sig[name] = "*fp32"
        elif name in ("B", "K_units"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def sm90_resources(method: str, M: int, dtype: str, K: int, tile: int | None, num_warps: int | None,
                   rows: int) -> dict:
    """Compile one variant for sm_90; registers per thread, spills and programs per SM."""
    enc = encode(build_graph(method, M))
    names = triton_okd._okd_fused_kernel.arg_names
    cfg = triton_okd.launch_config(enc.num_nodes, K, 256, tile=tile, num_warps=num_warps, rows=rows)
    S = enc.score_cols  # the score columns (every score tensor once)
    const = dict(M=M, N=enc.num_nodes, NP=cfg.np, WMAX=enc.max_width, WP=triton_okd._next_pow2(enc.max_width),
                 SP=triton_okd._next_pow2(max(S, 1)), BK=cfg.block_k, TEACHER=enc.teacher_mode,
                 ONE_CHUNK=K <= cfg.block_k, NEED_GRAD=True, ROWS=cfg.rows, RB=triton_okd.REDUCE_BLOCK,
                 ACC=triton.language.float32, F64=False, KA=min(16, K & -K))
    t0 = time.perf_counter()
    sig = _signature(TRITON_DTYPES[dtype])
    ints = {"B": 256, "K_units": K // const["KA"]}
    # what the JIT specialises at launch: 16-byte aligned pointers, integer arguments divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or (n in ints and ints[n] % 16 == 0)}
    src = ASTSource(triton_okd._okd_fused_kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    ptx = kernel.asm["ptx"]
    arch = re.search(r"\.target\s+(\S+)", ptx).group(1)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    threads = 32 * cfg.num_warps
    per_sm = min(REGS_PER_SM // (regs * threads), THREADS_PER_SM // threads)  # ignores register granularity
    return {"method": method, "M": M, "dtype": dtype, "K": K, "np": cfg.np, "block_k": cfg.block_k,
            "chunks": -(-K // cfg.block_k), "num_warps": cfg.num_warps, "rows": cfg.rows, "registers": regs,
            "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2)), "programs_per_sm": per_sm,
            "warps_per_sm": per_sm * cfg.num_warps,
            "vector_loads": len(re.findall(r"ld\.global[.\w]*\.v[24]\.", ptx)),
            "vector_stores": len(re.findall(r"st\.global[.\w]*\.v[24]\.", ptx)),
            "compile_s": round(time.perf_counter() - t0, 1), "arch": arch}


def run(methods=("ahbf",), branches=(4, 8), dtypes=("fp32", "bf16"), K: int = 1000, variants=VARIANTS,
        log=print) -> list[dict]:
    rows = []
    for method in methods:
        for M in branches:
            for dtype in dtypes:
                for label, tile, warps, per_program in variants:
                    r = {"variant": label, **sm90_resources(method, M, dtype, K, tile, warps, per_program)}
                    rows.append(r)
                    log(f"{method} M={M} {dtype} K={K} {label:26s} BK={r['block_k']:5d} warps={r['num_warps']:2d} "
                        f"regs={r['registers']:3d} spills={r['spill_stores']}/{r['spill_loads']} B "
                        f"programs/SM={r['programs_per_sm']} warps/SM={r['warps_per_sm']}")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| graph | dtype | variant | BK (chunks at K) | warps | rows/program | registers | spill st/ld (B) | "
             "programs (warps) per SM | vector ld/st |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} M={r['M']} | {r['dtype']} | {r['variant']} | {r['block_k']} ({r['chunks']} at "
                     f"K={r['K']}) | {r['num_warps']} | {r['rows']} | {r['registers']} | {r['spill_stores']}/"
                     f"{r['spill_loads']} | {r['programs_per_sm']} ({r['warps_per_sm']}) | {r['vector_loads']}/{r['vector_stores']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--branches", default="4,8")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--variants", type=int, default=len(VARIANTS), help="the first N of VARIANTS")
    ap.add_argument("--out", default=None, help="JSON file (a .md table is written next to it)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: under the interpreter triton.jit functions cannot be compiled")
    rows = run(branches=[int(b) for b in args.branches.split(",")], dtypes=args.dtypes.split(","), K=args.classes,
               variants=VARIANTS[:args.variants], log=lambda m: print(m, flush=True))
    md = markdown(rows)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90 (GPUTarget cuda 90), ptxas -v", "rows": rows},
                      f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(md)
    return rows


if __name__ == "__main__":
    main()
