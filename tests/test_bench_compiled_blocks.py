"""benchmarks/bench_compiled_blocks.py --smoke: both modules of one stage, eager and compiled, land in its table."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_writes_a_row_per_module(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_compiled_blocks.py"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "compiled_blocks_cpu_smoke.md").read_text()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| basic") or line.startswith("| BN")]
    assert [r[0] for r in rows] == ["| basic block, 64 ch 8x8", "| BN + add + ReLU, 64 ch 8x8"]
    for r in rows:
        eager, compiled, ratio = float(r[1]), float(r[2]), float(r[3].rstrip("x"))
        assert eager > 0 and compiled > 0 and abs(ratio - compiled / eager) < 0.01 + 0.03 * ratio
