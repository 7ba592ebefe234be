"""Learning-rate schedules (SPEC 4, stepping after each epoch; cosine with warm-up) and the KD ramp."""
from __future__ import annotations

import math

import pytest

from ahbf.engine.config import ObjectiveConfig, ScheduleConfig
from ahbf.engine.schedules import LRSchedule, kd_ramp, sigmoid_rampup
from ahbf.engine.resolve import resolve_objective
from ahbf.engine.task import OKDTask
from ahbf.methods import build_graph


@pytest.mark.parametrize("epoch, expected", [(0, 0.5 * math.exp(-5)), (60, 0.5 * math.exp(-5 * 0.75 ** 2)),
                                             (120, 0.5 * math.exp(-5 * 0.25)), (239, 0.5 * math.exp(-5 / 240 ** 2)),
                                             (240, 0.5), (299, 0.5)])
def test_sigmoid_rampup_is_the_spec_formula(epoch, expected):
    assert sigmoid_rampup(epoch, 240) == pytest.approx(expected, rel=1e-12)


def test_ramp_edge_cases():
    assert sigmoid_rampup(0, 0) == 0.5 and sigmoid_rampup(17, 0) == 0.5
    assert kd_ramp("constant", 0, 240) == kd_ramp("constant", 500, 240) == 1.0


def test_task_kd_scale_is_ramp_times_kd_weight():
    ahbf = resolve_objective(ObjectiveConfig(rampup=240), "ahbf")
    assert (ahbf.kd_weight, ahbf.ramp, ahbf.detach_teacher) == (1.5, "sigmoid", False)
    task = OKDTask(model=None, graph=build_graph("ahbf", 4, ahbf), cfg=ahbf)
    for epoch in (0, 100, 240, 300):
        task.set_epoch(epoch)
        assert task.kd_scale == pytest.approx(1.5 * sigmoid_rampup(epoch, 240))
    dml = resolve_objective(ObjectiveConfig(), "dml")
    assert (dml.kd_weight, dml.ramp, dml.detach_teacher) == (1.0, "constant", True)
    task = OKDTask(model=None, graph=build_graph("dml", 4, dml), cfg=dml)
    task.set_epoch(3)
    assert task.kd_scale == 1.0


def test_multistep_steps_after_each_epoch():
    s = LRSchedule(ScheduleConfig(name="multistep", milestones=(150, 225), gamma=0.1, warmup_epochs=0), 0.1, 300, 391)
    assert all(s(e, i) == pytest.approx(0.1) for e in (0, 149) for i in (0, 200, 390))
    assert all(s(150, i) == pytest.approx(0.01) for i in (0, 390))
    assert s(224, 390) == pytest.approx(0.01)
    assert s(225, 0) == pytest.approx(0.001) and s(299, 390) == pytest.approx(0.001)


def test_multistep_with_warmup():
    s = LRSchedule(ScheduleConfig(name="multistep", milestones=(2,), warmup_epochs=1), 0.4, 4, 4)
    assert [s(0, i) for i in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert s(1, 0) == pytest.approx(0.4) and s(2, 0) == pytest.approx(0.04)


def test_cosine_warmup_then_decay():
    steps, epochs = 10, 20
    s = LRSchedule(ScheduleConfig(name="cosine", warmup_epochs=2, min_lr=0.001), 0.1, epochs, steps)
    warm = [s(t // steps, t % steps) for t in range(20)]
    assert warm == pytest.approx([0.1 * (t + 1) / 20 for t in range(20)])  # linear, per step, ends at lr
    decay = [s(t // steps, t % steps) for t in range(20, epochs * steps)]
    assert decay[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(decay, decay[1:]))
    mid = 20 + (epochs * steps - 20) // 2
    assert s(mid // steps, mid % steps) == pytest.approx(0.001 + 0.099 * 0.5)
    assert decay[-1] == pytest.approx(0.001, abs=1e-5)
