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
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = tmp_path.glob("cpu-smoke-*.json")
    assert result.with_suffix(".md").exists()
    rec = json.loads(result.read_text())
    sections = rec["sections"]
    assert list(sections) == ["correctness", "kernel_variants", "objective", "pipeline", "engine", "engine_compile"]
    assert all(s["status"] == "ok" for n, s in sections.items() if not n.startswith("engine")), {
        n: s["status"] for n, s in sections.items()}
    assert sections["engine_compile"]["status"] == "skipped"
    corr = sections["correctness"]["result"]
    assert corr["ok"] and any("65536" in r["case"] for r in corr["rows"])
    variants = sections["kernel_variants"]["result"]
    assert variants["registers_sm90"][0]["registers"] > 0 and variants["registers_sm90"][0]["arch"].startswith("sm_90")
    row = sections["objective"]["result"]["fp32"]["rows"][0]["paths"]["triton"]
    assert row["floor_bytes"] < row["moved_bytes"] and row["hbm_floor_ms"] > 0
    assert sections["engine"]["status"] in ("ran", "missing")
    assert not list((ROOT / "benchmarks" / "results").glob("cpu-smoke-*"))  # CI output stays out of results/


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
