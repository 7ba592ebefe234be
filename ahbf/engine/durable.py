"""Files written so that neither a crash nor a full disk leaves a half-written one: a temporary file in the same
folder, flushed to disk (``fsync``), then renamed over the target (and the folder synced). A failed write
removes the temporary file and raises one ``WriteError`` naming the file and the cause (``No space left on
device (ENOSPC)``, ``File too large (EFBIG)`` under ``ulimit -f``), not torch's ``unexpected pos``; a Ctrl-C
during it is a ``KeyboardInterrupt`` naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
from typing import Any, Callable, Iterator

import torch


class WriteError(OSError):
    """A file that could not be written (disk full, quota, file size limit, I/O error), in one line naming the
    file and the cause; the CLI exits with ``WRITE_FAILED_EXIT``."""


class _Sink:
    """The file ``torch.save`` writes to, remembering the first error of a write: torch's C++ writer turns it
    into ``RuntimeError: [enforce fail ...] unexpected pos`` (a full disk, ``ulimit -f``, a second Ctrl-C)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except BaseException as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def _cause(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno:
        return f"{os.strerror(err.errno)} ({errno.errorcode.get(err.errno, err.errno)})"
    return " ".join(str(err).split()) or type(err).__name__


def fsync_folder(path: str) -> None:
    """Make a rename in ``path``'s folder durable (best effort: not every file system lets a folder be synced)."""
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str, write: Callable[[str], None], keep: bool = False) -> str:
    """``write(tmp)`` to a temporary file in the same folder, then ``os.replace`` (``keep``: leave it at ``tmp``
    and return that name, the caller renames it): a reader (or a crash) never sees a half-written file; the
    temporary file never outlives a failure. A failed write is one ``WriteError`` naming ``path`` and
    the cause; a Ctrl-C during it is a ``KeyboardInterrupt`` naming ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        if not keep:
            os.replace(tmp, path)
            fsync_folder(path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = getattr(err, "recorded", None) or err
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt(f"while writing {path}, which was left as it was") from None
        if isinstance(cause, OSError) and not isinstance(cause, WriteError):
            raise WriteError(f"cannot write {path}: {_cause(cause)}") from None
        raise
    return tmp


def write_text(path: str, text: str) -> None:
    """A small text file (config.yaml, results.json) written atomically and fsynced: never empty or cut short."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def save_synced(obj: Any, tmp: str) -> None:
    with open(tmp, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
            f.flush()
            os.fsync(f.fileno())
        except BaseException as err:
            err.recorded = sink.error  # the first error of a write, not torch's "unexpected pos"
            raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` (flushed to disk) that a reader or a crash never sees half-written."""
    atomic_write(path, lambda tmp: save_synced(obj, tmp))


def _copy_synced(src: str, tmp: str) -> None:
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def atomic_copy(src: str, dst: str) -> None:
    atomic_write(dst, lambda tmp: _copy_synced(src, tmp))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Stop signals (SIGINT, SIGTERM, SIGUSR1) wait until the block ends: a few renames that must all happen."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
