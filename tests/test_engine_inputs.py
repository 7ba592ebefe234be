"""Inputs that used to be accepted silently or answered with an unclear line (issue 24, item 6): each gets one
clear line, an error where the run cannot mean anything, a note where it trains otherwise than one may think."""
from __future__ import annotations

import pytest
import torch

from ahbf.engine.checkpoint import CheckpointError, load_checkpoint
from ahbf.engine.cli import train_main
from test_engine_checkpoint_integrity import pickle_span
from test_engine_fault import TINY

ONE_EPOCH = [*TINY, "--epochs", "1", "--checkpoint-every", "off"]


def test_a_one_class_data_set_is_refused(tmp_path, capsys):
    """An image folder with one class folder trained and reported 100% top-1."""
    import numpy as np
    from test_pipelines_folder import smooth_image

    for split, n in (("train", 6), ("val", 2)):
        (tmp_path / "images" / split / "cat").mkdir(parents=True)
        for i in range(n):
            smooth_image(np.random.default_rng(i), 40, 48).save(tmp_path / "images" / split / "cat" / f"{i}.JPEG")
    assert train_main([*ONE_EPOCH, "--dataset", "imagenet", "--data-dir", str(tmp_path / "images"), "-b", "2",
                       "data.backend=torch", "-j", "0", "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "1 class" in err and "at least 2 (one class folder per class)" in err, err


def test_notes_for_a_batch_larger_than_the_data_and_checkpoint_every_0(tmp_path, capsys):
    assert train_main([*ONE_EPOCH, "-b", "64", "--checkpoint-every", "0", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: the batch (64 per process) is larger than the training split (58 samples per process): each " \
           "epoch is one step of 58" in out, out
    assert "note: train.checkpoint_every 0 means off" in out


def test_compile_on_a_cpu_is_noted_and_off_is_not():
    from types import SimpleNamespace

    from ahbf.engine.config import build_config
    from ahbf.engine.distributed import DistEnv
    from ahbf.engine.run import input_notes

    data = SimpleNamespace(train=SimpleNamespace(num_samples=100), num_classes=10)
    for device, mode, noted in (("cpu", "regions", True), ("cpu", "off", False), ("cuda", "regions", False)):
        cfg = build_config(overrides=[("train.compile", mode)])
        notes = input_notes(cfg, data, DistEnv(0, 0, 1, torch.device(device)))
        assert any("train.compile=regions on a CPU" in n for n in notes) == noted, (device, mode, notes)


def test_resume_path_with_other_settings_lists_them(tmp_path, capsys):
    """--resume auto refuses another run's checkpoint (tests/test_engine_fault.py); an explicit --resume PATH
    continues it with this run's settings, and says which differ."""
    assert train_main([*ONE_EPOCH, "-o", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert train_main([*TINY, "--epochs", "2", "--checkpoint-every", "off", "--seed", "3", "--lr", "0.05",
                       "--resume", str(tmp_path / "a" / "last.pt"), "-o", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"note: --resume {tmp_path / 'a' / 'last.pt'}: this run's settings differ from the checkpoint's " \
           "(optim.lr 0.1 -> 0.05; train.seed 0 -> 3); continuing with this run's" in out, out


def test_an_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    for output in (tmp_path / "taken", tmp_path / "taken" / "run"):
        assert train_main([*ONE_EPOCH, "-o", str(output)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"ahbf-train: error: cannot use {output} as the output folder: {tmp_path / 'taken'} is a "
                       "file, not a folder; choose another -o"), err


def test_unreadable_checkpoints_say_damaged_and_never_advise_weights_only_false(tmp_path):
    assert train_main([*ONE_EPOCH, "-o", str(tmp_path)]) == 0
    raw = bytearray((tmp_path / "last.pt").read_bytes())
    start, _ = pickle_span(tmp_path / "last.pt")
    raw[start + 2] = 149  # the first opcode after PROTO: one the weights-only unpickler does not know
    (tmp_path / "opcode.pt").write_bytes(raw)
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save({"model": torch.nn.Linear(2, 2), "spec": {}}, tmp_path / "module.pt")  # a pickled nn.Module
    for name, words in [("opcode", "damaged"), ("text", "damaged"), ("module", "refused by the weights-only")]:
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(str(tmp_path / f"{name}.pt"))
        text = str(err.value)
        assert words in text and "weights_only" not in text and "\n" not in text, text
    assert "Unsupported operand 149" in str(pytest.raises(CheckpointError, load_checkpoint, str(tmp_path / "opcode.pt")).value)
