"""benchmarks/bench_engine.py: its paper-style baseline objective is the objective, and --smoke runs every part."""
from __future__ import annotations

import pytest
import torch

from bench_engine import machine, markdown, run
from paper_loop import paper_objective
from step_breakdown import LABELS
from ahbf.methods import build_graph
from ahbf.kernels.reference import okd_objective_reference


@pytest.mark.parametrize("method, kd_scale", [("ahbf", 0.75), ("one", 1.0), ("dml", 1.0)])
def test_paper_objective_is_the_reference_objective(method, kd_scale):
    """The timed baseline computes the same loss as the engine's reference, up to the paper's 1e-7 on the
    teacher probabilities (SPEC 4: about K * 1e-7 * T^2 per KL edge)."""
    graph = build_graph(method, 4)
    gen = torch.Generator().manual_seed(0)
    z = [(3 * torch.randn(16, 100, generator=gen, dtype=torch.float64)) for _ in range(4)]
    s = [torch.randn(16, w, generator=gen, dtype=torch.float64) for w in graph.score_widths]
    y = torch.randint(0, 100, (16,), generator=gen)
    ref, _ = okd_objective_reference(z, s, y, graph, 3.0, kd_scale)
    paper = paper_objective(method, z, s, y, kd_scale)
    assert abs(paper.item() - ref.item()) < len(graph.kl_edges) * 100 * 1e-7 * 9 * kd_scale * 2
    assert abs(paper.item() - ref.item()) > 0  # the 1e-7 is there: this is the paper's formula, not a copy


def test_smoke_rows_and_breakdown():
    rows = run(models=("ahbf-r32-b64",), settings=("fp32", "bf16-cl"), smoke=True, threads=1)
    assert [r["setting"] for r in rows] == ["paper", "fp32", "bf16-cl"]
    assert all(r["img_s"] > 0 and r["img_s_q25"] <= r["img_s"] <= r["img_s_q75"] for r in rows)
    assert rows[0]["vs_paper"] == 1.0
    (b,) = [r["breakdown"] for r in rows if "breakdown" in r]
    assert set(b) == {"step_ms", *LABELS, "other", "clock"} and b["clock"] == "host"
    assert b["branches"] > 0 and b["backward"] > 0 and b["objective"] > 0 and b["trunk"] > 0
    assert sum(b[k] for k in (*LABELS, "other")) == pytest.approx(b["step_ms"], rel=0.05)
    text = markdown(rows, machine(torch.device("cpu"), 1))
    assert "| part | ms | share |" in text and "paper" in text


@pytest.mark.parametrize("model", ["ahbf-densenet40", "ahbf-mobilenetv2", "ahbf-tv-r18"])
def test_smoke_runs_the_other_backbones(model):
    rows = run(models=(model,), settings=("bf16-cl",), smoke=True, threads=1, profile=False)
    assert [r["setting"] for r in rows] == ["paper", "bf16-cl"] and all(r["img_s"] > 0 for r in rows)
