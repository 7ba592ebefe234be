"""Nothing lost: the checksum covers every value a resume reads, a fallback never rotates a corrupt file over a
good one, and a failed checkpoint write (disk full, ``ulimit -f``, a second Ctrl-C) is one line and a documented
exit status with every previous checkpoint intact and no temporary file left."""
from __future__ import annotations

import errno
import os
import random
import resource
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from ahbf.engine import durable
from ahbf.engine.checkpoint import CheckpointError, _tensor_checksum, load_checkpoint, newest_first, save_checkpoint
from ahbf.engine.durable import WriteError, atomic_save
from ahbf.engine.cli import train_main
from ahbf.engine.fault import WRITE_FAILED_EXIT
from test_engine_checkpoint import training_state
from test_engine_fault import TINY


def same(a, b) -> bool:
    """Equal values of equal types, tensors bitwise (dtype, shape, requires_grad too), dict order included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad) and \
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a) and \
            same(getattr(a, "_metadata", None), getattr(b, "_metadata", None))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # nan


def pickle_span(path) -> tuple[int, int]:
    """(offset, length) of the pickled metadata (``data.pkl``, stored uncompressed) inside a checkpoint file."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name, extra = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name + extra, info.compress_size


def test_100_bit_flips_in_the_metadata_are_refused_or_change_nothing(tmp_path):
    state = {**training_state(), "batch": 0, "meter": {}}
    path = tmp_path / "last.pt"
    save_checkpoint(state, str(path))
    original, raw = load_checkpoint(str(path)), path.read_bytes()
    start, length = pickle_span(path)
    seed = os.getpid()
    rng, outcome = random.Random(seed), {"checksum": 0, "unreadable": 0, "identical": 0}
    for _ in range(100):
        flipped = bytearray(raw)
        flipped[start + rng.randrange(length)] ^= 1 << rng.randrange(8)
        (tmp_path / "flipped.pt").write_bytes(flipped)
        try:
            loaded = load_checkpoint(str(tmp_path / "flipped.pt"))
        except CheckpointError as err:
            assert "\n" not in str(err) and "weights_only=False" not in str(err)
            outcome["checksum" if "match its checksum" in str(err) else "unreadable"] += 1
            continue
        assert same(loaded, original), f"seed {seed}: a flip loaded with other contents"
        outcome["identical"] += 1
    assert sum(outcome.values()) == 100
    assert outcome["checksum"] >= 5, outcome  # flips that unpickle to other values: the checksum catches them


def test_a_changed_integer_of_the_metadata_is_refused(tmp_path):
    """The issue's probe: ``batch`` 0 -> 1 with the stored checksum kept resumed a step late; each value a resume
    reads is checked, not only the tensors."""
    save_checkpoint({**training_state(), "batch": 0}, str(tmp_path / "last.pt"))
    for key, value in [("batch", 1), ("history", [{"epoch": 1, "train_loss": 1.25}]), ("epoch", 1.0)]:
        ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
        ckpt[key] = value  # 1.0 == 1, but a float is not the int that was written
        torch.save(ckpt, tmp_path / "edited.pt")
        with pytest.raises(CheckpointError, match="contents do not match its checksum"):
            load_checkpoint(str(tmp_path / "edited.pt"))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["rng"]["python"] = (3, tuple(ckpt["rng"]["python"][1][:-1]) + (7,), None)
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(str(tmp_path / "edited.pt"))


def test_older_files_keep_loading_and_a_file_without_checksum_is_refused(tmp_path):
    """Files of the previous format (a bare SHA-256 of the tensors) load, their tensors checked; a file with no
    checksum at all is refused: a flip in the key's name must not switch the check off."""
    state = {**training_state(), "version": "0.9"}
    atomic_save({**state, "checksum": _tensor_checksum(state)}, str(tmp_path / "old.pt"))
    assert same(load_checkpoint(str(tmp_path / "old.pt"))["model"], state["model"])
    state["model"]["trunk.conv1.weight"] = state["model"]["trunk.conv1.weight"] + 1
    atomic_save({**state, "checksum": _tensor_checksum(training_state() | {"version": "0.9"})}, str(tmp_path / "old.pt"))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(str(tmp_path / "old.pt"))
    atomic_save({**state, "checksuo": "x"}, str(tmp_path / "none.pt"))
    with pytest.raises(CheckpointError, match="no readable checksum"):
        load_checkpoint(str(tmp_path / "none.pt"))


def fail_writes(monkeypatch, error: BaseException, after: int = 1000) -> None:
    """The checkpoint writer fails after ``after`` bytes, as a full disk (or a second Ctrl-C) would."""
    write = durable._Sink.write

    def failing(self, data):
        written = getattr(self, "written", 0)
        if written + len(data) > after:
            self.written = written
            self.error = self.error or error
            raise error
        self.written = written + len(data)
        return write(self, data)

    monkeypatch.setattr(durable._Sink, "write", failing)


def test_rotation_keeps_good_files_in_order_and_drops_known_corrupt_ones(tmp_path, monkeypatch):
    _, path = training_state(), str(tmp_path / "last.pt")
    state = {**training_state(), "batch": 0}
    for step in range(4):  # last.3 .. last: steps 0 .. 3
        save_checkpoint({**state, "step": step}, path, keep_last=4)
    fail_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    before = {p: open(p, "rb").read() for p in newest_first(path)}
    with pytest.raises(WriteError, match=r"cannot write .*last.pt: No space left on device \(ENOSPC\)"):
        save_checkpoint({**state, "step": 4}, path, keep_last=4, corrupt=[path])
    assert {p: open(p, "rb").read() for p in newest_first(path)} == before  # nothing moved or deleted
    assert sorted(os.listdir(tmp_path)) == ["last.1.pt", "last.2.pt", "last.3.pt", "last.pt"]  # no temporary
    monkeypatch.undo()
    # last.pt and last.2.pt known corrupt (steps 3 and 1): kept are the new one, step 2 and step 0, in that order
    save_checkpoint({**state, "step": 4}, path, keep_last=4, corrupt=[path, str(tmp_path / "last.2.pt")])
    assert [load_checkpoint(p)["step"] for p in newest_first(path)] == [4, 2, 0]
    assert sorted(os.listdir(tmp_path)) == ["last.1.pt", "last.2.pt", "last.pt"]
    save_checkpoint({**state, "step": 5}, path, keep_last=2)
    assert [load_checkpoint(p)["step"] for p in newest_first(path)] == [5, 4]


def corrupt(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(data)


def test_a_fallback_then_a_failed_write_keeps_a_usable_checkpoint(tmp_path, monkeypatch, capsys):
    """Item 1 of issue 24: last.pt corrupt, the resume falls back to last.1.pt, the next write fails (disk full):
    last.1.pt is still there and the next --resume auto uses it; with the rotation gone too, the error lists the
    best.pt and epoch_N.pt that would resume."""
    assert train_main([*TINY, "-o", str(tmp_path), "--epochs", "1", "--checkpoint-every", "4",
                       "train.save_every=1"]) == 0
    corrupt(tmp_path / "last.pt")
    good = (tmp_path / "last.1.pt").read_bytes()
    fail_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    capsys.readouterr()
    assert train_main([*TINY, "-o", str(tmp_path), "--resume", "auto", "--checkpoint-every", "2"]) == WRITE_FAILED_EXIT
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device (ENOSPC)" in err and "last.pt" in err, err
    assert "last.1.pt" in err  # the newest good checkpoint is named
    assert (tmp_path / "last.1.pt").read_bytes() == good
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    monkeypatch.undo()
    assert train_main([*TINY, "-o", str(tmp_path), "--resume", "auto", "--checkpoint-every", "off",
                       "train.save_every=1"]) == 0
    assert "resumed from the previous good checkpoint" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 16
    for name in ("last.pt", "last.1.pt"):
        corrupt(tmp_path / name)
    assert train_main([*TINY, "-o", str(tmp_path), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no usable checkpoint" in err and "--resume PATH" in err, err
    assert f"usable: {tmp_path / 'best.pt'} (epoch " in err, err
    assert f"{tmp_path / 'epoch_2.pt'} (epoch 2, step 16), {tmp_path / 'epoch_1.pt'} (epoch 1, step 8)" in err


def test_a_second_ctrl_c_during_a_write_names_the_file(tmp_path, monkeypatch, capsys):
    assert train_main([*TINY, "-o", str(tmp_path), "--epochs", "1", "--checkpoint-every", "off"]) == 0
    before = (tmp_path / "last.pt").read_bytes()
    fail_writes(monkeypatch, KeyboardInterrupt())
    capsys.readouterr()
    assert train_main([*TINY, "-o", str(tmp_path), "--resume", "auto", "--checkpoint-every", "2"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"ahbf-train: interrupted while writing {tmp_path / 'last.pt'}, which was left as it was", err
    assert (tmp_path / "last.pt").read_bytes() == before and not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_ulimit_f_is_one_line_and_the_write_failed_exit_status(tmp_path):
    """A file size limit (``ulimit -f``, RLIMIT_FSIZE) below the checkpoint's size, in a fresh process."""
    assert train_main([*TINY, "-o", str(tmp_path), "--epochs", "1", "--checkpoint-every", "off"]) == 0
    before, size = (tmp_path / "last.pt").read_bytes(), os.path.getsize(tmp_path / "last.pt")
    limit = size // 2

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ahbf.engine.cli", *TINY, "-o", str(tmp_path), "--resume", "auto"],
                          capture_output=True, text=True, env=env, preexec_fn=limited, timeout=300)
    assert proc.returncode == WRITE_FAILED_EXIT, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"cannot write {tmp_path / 'last.pt'}: File too large (EFBIG)" in err
    assert (tmp_path / "last.pt").read_bytes() == before and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
