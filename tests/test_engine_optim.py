"""The SGD builder under fp16 loss scaling: a step the GradScaler skips leaves the optimiser untouched."""
from __future__ import annotations

import copy

import pytest
import torch

from ahbf.engine.config import ConfigError, OptimConfig
from ahbf.engine.optim import build_optimizer
from ahbf.engine.precision import AmpStepper
from ahbf.engine.resolve import optimizer_impl

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))


def _loss(model, poison=False):
    x = torch.randn(8, 5)
    loss = model(x).square().mean()
    return loss * float("inf") if poison else loss


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb)), "parameters changed"
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys(), "optimizer state entries appeared or vanished"
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            w = sb["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, f"state[{k}][{name}] changed"


@pytest.mark.parametrize("impl", ["auto", "foreach", "loop"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_a_skipped_scaled_step_leaves_every_optimizer_state_untouched(impl, nesterov):
    model = _model()
    opt = build_optimizer(model.parameters(), OptimConfig(impl=impl, nesterov=nesterov), CPU, grad_scaling=True)
    assert optimizer_impl(opt) == ("foreach" if impl == "auto" else impl)  # never fused under loss scaling
    amp = AmpStepper(opt, model.parameters(), CPU, "fp16")
    before = _snapshot(model, opt)
    amp.step(_loss(model, poison=True))                     # the very first step is skipped: no state yet
    _assert_same(_snapshot(model, opt), before)
    assert not opt.state_dict()["state"]
    for _ in range(2):                                       # real steps: momentum buffers exist
        amp.step(_loss(model))
    before = _snapshot(model, opt)
    assert before[1]["state"] and all(s["momentum_buffer"] is not None for s in before[1]["state"].values())
    scale = amp.scaler.get_scale()
    amp.step(_loss(model, poison=True))                     # skipped later on
    assert amp.scaler.get_scale() == scale / 2               # the scaler saw the inf and backed off
    _assert_same(_snapshot(model, opt), before)
    amp.step(_loss(model))                                   # and training goes on, finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_sgd_under_loss_scaling_is_refused_on_every_device(device):
    """The builder decides from the config alone (no CUDA needed to check the CUDA rule)."""
    with pytest.raises(ConfigError, match="optim.impl=fused") as err:
        build_optimizer(_model().parameters(), OptimConfig(impl="fused"), device, grad_scaling=True)
    assert "\n" not in str(err.value)


def test_auto_without_loss_scaling_is_fused():
    opt = build_optimizer(_model().parameters(), OptimConfig(), CPU, grad_scaling=False)
    assert optimizer_impl(opt) == "fused"


def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch):
    """auto: bf16 only on CPUs with native bf16 (emulated bf16 trained the demo 11x slower than fp32)."""
    from ahbf.engine import precision

    assert isinstance(precision.cpu_has_bf16(), bool)  # this machine's answer, whatever it is
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: always given
