"""benchmarks/gpu_suite.py --smoke (every section's code path at tiny sizes, Triton interpreter) and the
GPU scripts' refusal to pass without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}


def test_gpu_suite_smoke_runs_every_section(tmp_path):
    """Every section in its own process, at tiny sizes on CPU, from the checkout without PYTHONPATH; rows land
    in the .rows.jsonl file as measured, the report has the targets table."""
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = tmp_path.glob("cpu-smoke-*[0-9].json")
    rec = json.loads(result.read_text())
    sections = rec["sections"]
    assert list(sections) == ["engine_r18", "engine_r32", "objective", "correctness", "engine_compile_regions",
                              "engine_compile_regions_graphed", "kernel_variants", "pipeline"]
    assert all(s["status"] == "ok" for n, s in sections.items() if "compile" not in n), sections
    assert all(s["status"].startswith("skipped: --smoke") for n, s in sections.items() if "compile" in n)
    measured = rec["measured"]
    rows = [json.loads(line) for line in result.with_suffix(".rows.jsonl").read_text().splitlines()]
    assert {r["section"] for r in rows} == set(measured) == {n for n, s in sections.items() if s["status"] == "ok"}
    r32 = {r["setting"]: r for r in measured["engine_r32"]["rows"]}
    assert set(r32) == {"paper", "bf16-cl-fused", "bf16-cl-fused-graphed"}  # the graphed step, uncaptured on CPU
    assert all(r["compile_s"] >= 0 for r in r32.values())
    obj = measured["objective"]["rows"][0]["paths"]
    assert set(obj) == {"eager", "triton", "triton-graph"} and obj["triton-graph"]["hbm_floor_ms"] > 0
    corr = measured["correctness"]
    assert corr["summary"]["ok"] and any("65536" in r["case"] for r in corr["rows"])
    regs = measured["kernel_variants"]["summary"]["registers_sm90"]
    assert regs[0]["registers"] > 0 and regs[0]["arch"].startswith("sm_90")
    md = result.with_suffix(".md").read_text()
    assert "| AHBF ResNet-32 b128, CUDA-graphed step vs paper loop | " in md and "not measured" not in md.split("## ")[0]
    assert not list((ROOT / "benchmarks" / "results").glob("cpu-smoke-*"))  # CI output stays out of results/


def test_gpu_suite_budget_skips_what_cannot_fit_and_a_limit_kills_a_section(tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--budget", "55", "--out",
           str(tmp_path), "--sections", "engine_r32,pipeline"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = tmp_path.glob("cpu-smoke-*[0-9].json")
    sections = json.loads(result.read_text())["sections"]
    assert sections["engine_r32"]["status"] == "skipped: needs ~70 s, 55 s of the budget left"
    assert sections["pipeline"]["status"] == "ok"  # the next one that fits still runs
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite
        rows = tmp_path / "cut.rows.jsonl"
        status, seconds = gpu_suite.launch("objective", str(rows), smoke=True, limit=2)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert status == "timeout after 2 s" and seconds < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("script", ["gpu_check.py", "gpu_suite.py"])
def test_gpu_scripts_fail_without_a_gpu(script):
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_kernel_compiles_for_sm90_with_vector_loads_at_k1000():
    """Ahead of time, no GPU: K = 1000 rows are provably 32-byte aligned (K = K_units * 8), so the logits
    are read and the gradients written with 128-bit accesses, one per branch; K = 1003 cannot be."""
    code = ("import kernel_registers as kr\n"
            "for K in (1000, 1003):\n"
            "    r = kr.sm90_resources('ahbf', 4, 'fp32', K, None, None, 1)\n"
            "    print(K, r['vector_loads'], r['vector_stores'], r['spill_stores'])\n")
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-2000:]
    out = {int(line.split()[0]): [int(v) for v in line.split()[1:]] for line in done.stdout.strip().splitlines()}
    assert out[1000][0] >= 4 and out[1000][1] >= 4 and out[1000][2] == 0
    assert out[1003][0] == 0
