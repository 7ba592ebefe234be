"""Up-front range checks of every config value, checkpoint integrity (one full line per problem), rotation,
the empty-batch refusal of okd_loss, and the loaders' mid-epoch start."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from ahbf.engine.checkpoint import (CheckpointError, check_resumable, load_checkpoint, load_weights, newest_first,
                                    non_finite, remove_temporaries, save_checkpoint)
from ahbf.engine.checks import parse_interval
from ahbf.engine.config import ConfigError, build_config
from ahbf.engine.resolve import resolve_model, resolve_objective
from ahbf.kernels.okd import okd_loss
from ahbf.methods import build_graph
from ahbf.models import create_model
from ahbf.pipelines.memory import DeviceTensorLoader
from ahbf.pipelines.torch_folder import EpochSampler


@pytest.mark.parametrize("key,value,message", [
    ("objective.kd_weight", -5, "objective.kd_weight must be >= 0"),
    ("model.aux", -2, "model.aux must be in [0, 64]"),
    ("model.aux", "many", "model.aux must be a number or auto"),
    ("optim.lr", "inf", "optim.lr must be a finite number"),
    ("optim.lr", 1e39, None),  # finite: accepted (the non-finite guard stops the run)
    ("objective.T", "nan", "objective.T must be > 0"),
    ("schedule.min_lr", -0.5, "schedule.min_lr must be >= 0"),  # <= the peak lr: resolve (test_engine_compile)
    ("data.val_fraction", -0.5, "data.val_fraction must be in [0, 0.99]"),
    ("data.image_size", -1, "data.image_size must be 0"),
    ("data.synthetic_classes", 0, "data.synthetic_classes must be >= 2"),
    ("data.batch_size", 1, "data.batch_size must be >= 2"),
    ("optim.momentum", 1.5, "optim.momentum must be in"),
    ("model.num_branches", 1, "model.num_branches must be >= 2 for ahbf"),
    ("train.keep_last", 0, "train.keep_last must be >= 1"),
    ("train.dist_timeout", 0, "train.dist_timeout must be >= 1"),
    ("train.checkpoint_every", "-3", "train.checkpoint_every must be off"),
    ("train.checkpoint_every", "10x", "train.checkpoint_every must be off"),
])
def test_every_value_is_range_checked(key, value, message):
    if message is None:
        build_config(overrides=[(key, value)])
        return
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        build_config(overrides=[(key, value)])


def test_auto_is_spelled_auto_and_the_old_minus_one_is_refused():
    cfg = build_config(overrides=[("model.aux", "auto"), ("objective.kd_weight", "auto")])
    assert cfg.model.aux == "auto" and cfg.objective.kd_weight == "auto"
    assert resolve_model(cfg.model).aux == 4 and resolve_objective(cfg.objective, "ahbf").kd_weight == 1.5
    with pytest.raises(ConfigError, match=r"model.aux must be in \[0, 64\], got -1"):
        build_config(overrides=[("model.aux", -1)])
    cfg = build_config(overrides=[("model.aux", 2), ("objective.kd_weight", "0.5")])
    assert cfg.model.aux == 2 and cfg.objective.kd_weight == 0.5
    assert parse_interval("500") == ("steps", 500) and parse_interval("30m") == ("minutes", 30)
    assert parse_interval("off") == ("off", 0)


def test_okd_loss_refuses_an_empty_batch():
    graph = build_graph("ahbf", 3)
    z = [torch.zeros(0, 10) for _ in range(3)]
    s = [torch.zeros(0, 2) for _ in range(2)]
    with pytest.raises(ValueError, match="empty batch"):
        okd_loss(z, s, torch.zeros(0, dtype=torch.long), graph, backend="eager")


def small_state(**extra):
    model = create_model("resnet8", "baseline", 10)
    return model, {"model": model.state_dict(), "optim": {}, "epoch": 1, "step": 3, "spec": dict(model.spec),
                   "history": [], "rng": {}, **extra}


def test_checkpoint_problems_are_one_full_line(tmp_path):
    model, state = small_state()
    path = str(tmp_path / "last.pt")
    save_checkpoint({k: v for k, v in state.items() if k != "optim"}, path)
    with pytest.raises(CheckpointError, match="no 'optim' entries"):
        check_resumable(load_checkpoint(path), path)
    bad = dict(state["model"])
    bad.pop("branches.0.fc.bias")
    bad["branches.0.fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_weights(model, bad, path)
    assert "1 missing (branches.0.fc.bias)" in str(err.value) and "1 reshaped (branches.0.fc.weight (3, 3) != (10, 64))" in str(err.value)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Evil(), "spec": {}}, protocol=2))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(tmp_path / "evil.pt"))
    assert "posix.system" in str(err.value)  # the reason is not cut
    assert "refused by the weights-only unpickler" in str(err.value) and "\n" not in str(err.value)


def test_rotation_keeps_the_last_n_and_lists_them_newest_first(tmp_path):
    _, state = small_state()
    path = str(tmp_path / "last.pt")
    for step in range(4):
        save_checkpoint({**state, "step": step}, path, keep_last=3)
    chain = newest_first(path)
    assert [os.path.basename(p) for p in chain] == ["last.pt", "last.1.pt", "last.2.pt"]
    assert [load_checkpoint(p)["step"] for p in chain] == [3, 2, 1]
    save_checkpoint({**state, "step": 4}, path, keep_last=1)  # a resumed run that keeps fewer
    assert newest_first(path) == [path]
    (tmp_path / "last.pt.tmp123").write_bytes(b"")
    assert remove_temporaries(str(tmp_path)) == ["last.pt.tmp123"]
    assert non_finite({"a": torch.tensor([1.0, float("inf")]), "b": torch.ones(2), "c": torch.arange(3)}) == ["a"]


def test_loaders_start_mid_epoch_with_the_same_batches():
    images = torch.randint(0, 255, (37, 8, 8, 3), dtype=torch.uint8)
    loader = DeviceTensorLoader(images, torch.arange(37) % 5, 4, (0.5,) * 3, (0.25,) * 3, train=True, pad=2, seed=3)
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, start=6)
    tail = list(loader)
    assert len(tail) == len(full) - 6
    for (x, y), (x2, y2) in zip(full[6:], tail):
        assert torch.equal(x, x2) and torch.equal(y, y2)  # same crops and flips: the skipped draws were made
    sampler = EpochSampler(50, seed=1, rank=0, world_size=2, shuffle=True)
    sampler.epoch = 3
    whole = list(sampler)
    sampler.skip = 8
    assert list(sampler) == whole[8:] and len(sampler) == len(whole)


def test_one_sample_per_process_is_a_one_line_error(tmp_path):
    from ahbf.engine.distributed import DistEnv
    from ahbf.engine.run import build_run

    cfg = build_config(overrides=[("data.dataset", "synthetic"), ("data.synthetic_samples", 2), ("data.val_fraction", 0),
                                  ("data.image_size", 8), ("train.output", str(tmp_path / "run")), ("train.threads", 1)])
    with pytest.raises(ConfigError, match="each of the 2 processes gets 1 training sample"):
        build_run(cfg, DistEnv(0, 0, 2, torch.device("cpu")))  # checked before any collective or file
    assert not (tmp_path / "run").exists()


def test_step_control_saves_every_n_steps_or_minutes_and_on_a_signal():
    import signal
    import time

    from ahbf.engine.fault import StepControl, StopSignals

    signals = StopSignals()
    try:
        steps = StepControl("3", signals)
        assert [steps.poll(s) for s in (1, 2, 3)] == [(False, False), (False, False), (False, True)]
        minutes = StepControl("0.001m", signals)  # 60 ms
        assert minutes.poll(1) == (False, False)
        time.sleep(0.1)
        assert minutes.poll(2) == (False, True)
        minutes.saved()
        assert minutes.poll(3) == (False, False)
        signal.raise_signal(signal.SIGUSR1)  # handled: recorded, not fatal
        assert signals.name == "SIGUSR1" and steps.poll(4) == (True, True)
        signal.raise_signal(signal.SIGTERM)  # SLURM's and torchrun's copies of one preemption: still alive
        signal.raise_signal(signal.SIGUSR1)
        assert signals.name == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C acts at once
            signal.raise_signal(signal.SIGINT)
    finally:
        signals.restore()


def test_export_of_a_checkpoint_with_reshaped_weights_is_one_line(tmp_path):
    from ahbf.engine.eval_export import run_export

    _, state = small_state()
    state["model"]["branches.0.fc.weight"] = torch.zeros(10, 3)
    save_checkpoint(state, str(tmp_path / "last.pt"))
    with pytest.raises(CheckpointError, match=r"weights do not fit the model: 1 reshaped \(branches.0.fc.weight"):
        run_export(str(tmp_path / "last.pt"))


def test_non_finite_names_every_bad_tensor_in_order_with_one_blocking_copy():
    """The same function checks CUDA states (one blocking copy per device; a non_blocking one could be read unfilled)."""
    state = {"model": {"w": torch.ones(3), "v": torch.tensor([float("nan")], dtype=torch.bfloat16)},
             "optim": {"state": [{"m": torch.tensor([-float("inf"), 0.0])}, {"m": torch.zeros(0)}]}, "n": torch.arange(2)}
    assert non_finite(state) == ["model.v", "optim.state.0.m"]
    assert non_finite({"w": torch.ones(2)}) == [] and non_finite({}) == []


def test_a_file_system_without_flock_warns_and_runs_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    from ahbf.engine.rundir import FolderLock, RunFolderError, claim_folder

    held = FolderLock(str(tmp_path))  # a live run: "in use", as before
    try:
        with pytest.raises(RunFolderError, match="in use by a live run"):
            FolderLock(str(tmp_path))
    finally:
        held.release()

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock, notes = claim_folder(str(tmp_path / "lustre"), resume=False, overwrite=False)
    assert lock.fd is None and len(notes) == 1 and "cannot lock" in notes[0] and "No locks available" in notes[0]
    lock.release()
