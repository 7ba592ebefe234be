"""The command-line surface: pinned flags, and one-line errors (exit 2) for known kinds of bad input."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from ahbf.engine.cli import eval_main, export_main, train_main

TRAIN_FLAGS = {
    "-h", "--help", "-c", "--config", "--arch", "--method", "--num-branches", "--aux", "--dataset", "--data-dir",
    "--download", "--no-download", "--image-size", "-b", "--batch-size", "-j", "--workers", "--epochs", "--lr",
    "--momentum", "--wd", "--weight-decay", "--clip-grad", "--sched", "--milestones", "--warmup-epochs",
    "--temperature", "--kd-weight", "--rampup", "--objective-backend", "-o", "--output", "--name", "--resume", "--seed",
    "--device", "--precision", "--amp", "--no-amp", "--channels-last", "--no-channels-last", "--compile",
    "--no-compile", "--compile-mode", "--threads", "--sync-bn", "--no-sync-bn", "--deterministic", "--no-deterministic", "--log-interval", "--progress", "--no-progress",
    "--checkpoint-every", "--keep-last", "--precise-bn", "--overwrite", "--no-overwrite",
}
EVAL_FLAGS = {"-h", "--help", "--split", "--json", "--dataset", "--data-dir", "-b", "--batch-size", "--device", "--precision"}
EXPORT_FLAGS = {"-h", "--help", "-o", "--output"}


def help_flags(main, capsys) -> tuple[set[str], str]:
    """The option strings listed in ``--help`` (the option column of each line that starts with '-')."""
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1]
    columns = [line.strip().split("  ")[0] for line in options.splitlines() if line.strip().startswith("-")]
    return {f for col in columns for f in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", col)}, text


def test_train_help_is_pinned(capsys):
    found, text = help_flags(train_main, capsys)
    assert found == TRAIN_FLAGS, f"added: {sorted(found - TRAIN_FLAGS)}, removed: {sorted(TRAIN_FLAGS - found)}"
    assert "section.key=value" in text and "[optim.lr, default 0.1]" in text
    assert "[schedule.milestones, default 150 225]" in " ".join(text.split())


def test_list_flags_take_several_values():
    from ahbf.engine.cli import parse_train_args
    assert parse_train_args(["--milestones", "10", "20"]).schedule.milestones == (10, 20)
    assert parse_train_args(["optim.lr=0.2", "--milestones", "10,20"]).schedule.milestones == (10, 20)


@pytest.mark.parametrize("main, expected", [(eval_main, EVAL_FLAGS), (export_main, EXPORT_FLAGS)])
def test_eval_and_export_help_are_pinned(main, expected, capsys):
    found, text = help_flags(main, capsys)
    assert found == expected
    assert "checkpoint" in text


def one_line_error(capsys, main, args, prog="ahbf-train") -> str:
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"{prog}: error: "), err
    return err[len(f"{prog}: error: "):]


def test_unknown_key_names_the_nearest(capsys):
    assert one_line_error(capsys, train_main, ["optim.lrr=0.1"]) == "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"


def test_unknown_key_in_a_config_file(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    assert one_line_error(capsys, train_main, ["-c", str(path)]) == \
        "unknown config key 'train.epoch'; did you mean 'train.epochs'?"


def test_bad_choice_suggests(capsys):
    assert "did you mean 'ahbf'" in one_line_error(capsys, train_main, ["--method", "ahfb"])


def test_missing_config_file(capsys, tmp_path):
    assert "config file not found" in one_line_error(capsys, train_main, ["-c", str(tmp_path / "nope.yaml")])


def test_missing_data_folder(capsys, tmp_path):
    msg = one_line_error(capsys, train_main, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"),
                                              "-o", str(tmp_path / "out"), "--no-progress"])
    assert "not found" in msg and "nowhere" in msg


def test_class_folder_without_images(capsys, tmp_path):
    for split in ("train", "val"):
        (tmp_path / "img" / split / "cat").mkdir(parents=True)
        (tmp_path / "img" / split / "dog").mkdir(parents=True)
    msg = one_line_error(capsys, train_main, ["--dataset", "imagenet", "--data-dir", str(tmp_path / "img"),
                                              "-o", str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
    assert "without images" in msg or "no images" in msg, msg


def test_eval_of_a_missing_checkpoint(capsys, tmp_path):
    msg = one_line_error(capsys, eval_main, [str(tmp_path / "last.pt")], prog="ahbf-eval")
    assert msg == f"checkpoint not found: {tmp_path / 'last.pt'}"


def test_export_of_a_non_checkpoint(capsys, tmp_path):
    (tmp_path / "x.pt").write_bytes(b"junk")
    assert "cannot read checkpoint" in one_line_error(capsys, export_main, [str(tmp_path / "x.pt")], prog="ahbf-export")


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "ahbf.engine.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ahbf-train")


def test_default_demo_path_then_resume_auto(tmp_path, capsys, monkeypatch):
    """The no-argument demo's code path (digits, bf16, TensorBoard, plot), shortened to 2 + 1 epochs."""
    out = str(tmp_path / "demo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # respected (torch's convention), and the header says so
    threads = torch.get_num_threads()
    try:
        assert train_main(["--epochs", "2", "-o", out, "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "1 thread (OMP_NUM_THREADS)" in text
    assert "TARGET (branch0) TEST TOP-1:" in text and "branch0 (target)" in text and "ta2" in text
    assert {"last.pt", "best.pt", "config.yaml", "metrics.csv", "curves.png", "tb", "results.json"} <= set(
        p.name for p in (tmp_path / "demo").iterdir())
    resolved = (tmp_path / "demo" / "config.yaml").read_text()
    assert "auto" not in resolved and "detach_teacher: false\n" in resolved  # every value resolved and typed
    assert train_main(["--epochs", "3", "-o", out, "--no-progress", "--resume", "auto"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "epoch   3/3" in text and "epoch   2/3" not in text


def test_a_prefix_of_a_flag_is_not_accepted(capsys):
    """``--epoch 3`` was taken silently as ``--epochs 3`` (argparse's abbreviations)."""
    with pytest.raises(SystemExit) as exc:
        train_main(["--epoch", "3"])
    assert exc.value.code == 2 and "unrecognized arguments: --epoch" in capsys.readouterr().err


@pytest.mark.parametrize("rank, printed", [("0", True), ("3", False)])
def test_a_config_error_under_torchrun_is_printed_once_per_node(capsys, monkeypatch, rank, printed):
    monkeypatch.setenv("LOCAL_RANK", rank)
    assert train_main(["optim.lrr=0.05"]) == 2
    err = capsys.readouterr().err
    assert ("unknown config key 'optim.lrr'" in err) is printed and (err == "") is not printed
