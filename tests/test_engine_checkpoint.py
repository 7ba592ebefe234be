"""Checkpoints: atomic writes, weights_only loads, one-line errors for another model's checkpoint."""
from __future__ import annotations

import os

import pytest
import torch

from ahbf.engine.checkpoint import CheckpointError, check_spec, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ahbf.engine.durable import atomic_save
from ahbf.engine.config import RunConfig
from ahbf.engine.precision import AmpStepper
from ahbf.engine.optim import build_optimizer
from ahbf.models import create_model


def training_state():
    model = create_model("resnet8", "ahbf", 10, 3)
    amp = AmpStepper(build_optimizer(model.parameters(), RunConfig().optim, "cpu", grad_scaling=True), model.parameters(),
                     torch.device("cpu"), "fp16")
    out = model(torch.randn(4, 3, 8, 8))
    amp.step(sum(z.sum() for z in out.logits))  # fills momentum buffers and the scaler's state
    return {"model": model.state_dict(), "optim": amp.state_dict(), "epoch": 1, "step": 1, "spec": model.spec,
            "config": RunConfig().to_dict(), "history": [{"epoch": 1, "train_loss": 1.5}], "best": None,
            "rng": rng_state()}


def test_training_state_round_trips_with_weights_only(tmp_path):
    state = training_state()
    path = str(tmp_path / "last.pt")
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)  # torch.load(..., weights_only=True)
    assert loaded["config"] == state["config"] and loaded["spec"] == state["spec"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    set_rng_state(loaded["rng"])
    a = torch.rand(3)
    set_rng_state(state["rng"])
    assert torch.equal(a, torch.rand(3))


def test_atomic_save_leaves_old_file_and_no_temporary_on_failure(tmp_path):
    path = str(tmp_path / "last.pt")
    atomic_save({"x": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"x": torch.zeros(2), "bad": Unpicklable()}, path)
    assert os.listdir(tmp_path) == ["last.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))


def test_checkpoint_of_another_model_is_a_one_line_error():
    a = create_model("resnet8", "ahbf", 10, 4).spec
    b = create_model("resnet14", "ahbf", 100, 4).spec
    with pytest.raises(CheckpointError) as err:
        check_spec(a, b, "runs/x/last.pt")
    msg = str(err.value)
    assert "\n" not in msg
    assert "resnet8 (ahbf, 4 branches, aux 4) with 10 classes" in msg and "resnet14 (ahbf, 4 branches, aux 4) with 100 classes" in msg
    check_spec(a, dict(a), "same")  # no error


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(str(junk))
    torch.save({"weights": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an ahbf-train checkpoint"):
        load_checkpoint(str(tmp_path / "plain.pt"))


def test_fp16_loss_scaling_skips_an_overflowing_step_without_corrupting_momentum():
    """A skipped step (inf gradient) leaves weights and momentum alone (fused CPU SGD did not: see optim.py)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([p], RunConfig().optim, "cpu", grad_scaling=True)
    amp = AmpStepper(opt, [p], torch.device("cpu"), "fp16")
    amp.step((p * torch.tensor([1.0, float("inf"), 1.0])).sum())
    assert torch.equal(p.detach(), torch.ones(3))
    amp.step((p * 2).sum())
    assert torch.isfinite(p).all() and (p < 1).all()


def test_rng_state_saves_and_restores_the_run_device_not_the_current_one(monkeypatch):
    """``--device cuda:1`` in one process (no set_device): cuda:1's generator, not cuda:0's (checked on CPU by
    recording which device torch.cuda is asked for)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": asked.append(("get", str(device))) or
                        torch.zeros(4, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": asked.append(("set", str(device))))
    assert "cuda" not in rng_state(torch.device("cpu"))
    state = rng_state(torch.device("cuda:1"))
    set_rng_state(state, torch.device("cuda:1"))
    set_rng_state(state, torch.device("cpu"))  # a CPU resume of a GPU checkpoint leaves torch.cuda alone
    assert asked == [("get", "cuda:1"), ("set", "cuda:1")]


def test_resume_allows_an_auto_rampup_to_grow_with_the_epochs():
    """rampup auto is a fraction of train.epochs; --epochs may grow on --resume auto, so may that rampup."""
    from ahbf.engine.checkpoint import config_changes

    def cfg(rampup, epochs):
        return {"objective": {"rampup": rampup}, "train": {"epochs": epochs, "seed": 0}}

    assert config_changes(cfg(1.6, 2), cfg(2.4, 3)) == []  # 0.8 of the run, both times
    assert config_changes(cfg(1.6, 2), cfg(1.6, 3)) == []  # an explicit value kept
    assert config_changes(cfg(1.6, 2), cfg(2.0, 2)) == ["objective.rampup 1.6 -> 2.0"]
    assert config_changes(cfg(1.6, 2), cfg(3.0, 3)) == ["objective.rampup 1.6 -> 3.0"]
