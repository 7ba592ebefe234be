"""pytest-benchmark suite: fused vs unfused OKD objective, forward + backward.

    python -m pytest benchmarks/bench_objective.py --benchmark-group-by=param:shape
    python -m pytest benchmarks/bench_objective.py -k "ahbf and 256 and 1000"      # the acceptance case

Cases: AHBF, ONE and DML with M = 4 branches, B in {128, 256}, K in {100, 1000}. Paths: ``eager``
(``okd_objective_reference``, the same function the tests check against) and ``compiled`` on CPU;
plus ``triton`` on CUDA. The setup factory is ``objective_table.make_case`` / ``make_step``, shared with
the side-by-side table script. Not collected by the default test run (file name does not match test_*).
"""
from __future__ import annotations


import pytest
import torch


from objective_table import make_case, make_step  # noqa: E402

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
