"""CIFAR archives: the one place that touches the network (``--download``), and the offline alternative.

``prepare_cifar`` makes sure ``root/<folder>`` (``cifar-10-batches-py`` / ``cifar-100-python``) exists:
- already unpacked: nothing to do;
- the archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) placed in ``root`` by hand: its MD5
  is checked and it is unpacked (no network);
- neither, with ``--download``: the archive is fetched from its URL, checked and unpacked. Whatever a failed
  download created (the folder ``root`` and its missing parents, a partial archive, a half-unpacked folder)
  is removed, so the next try starts clean;
- neither, without ``--download``: an error naming the URL and where to place the file.
Every failure is one line (``OSError`` / ``ValueError``).
"""
from __future__ import annotations

import os
import shutil


def cifar_class(name: str):
    """torchvision's dataset class of ``name``: its ``url``, ``filename``, ``tgz_md5``, ``base_folder``."""
    import torchvision

    return {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]


def fetch(url: str, path: str) -> None:
    """Downloads ``url`` to ``path`` with torchvision's downloader (tests replace this function)."""
    from torchvision.datasets.utils import download_url

    download_url(url, os.path.dirname(path) or ".", os.path.basename(path))


def offline_hint(name: str, root: str) -> str:
    cls = cifar_class(name)
    return (f"without network, download {cls.url} on another machine and place it as "
            f"{os.path.join(root, cls.filename)} (checked and unpacked on the next run; docs/data.md, 'Offline data')")


def first_missing(path: str) -> str | None:
    """The outermost of ``path`` and its parents that does not exist (what creating ``path`` would create)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def remove(paths: list[str | None]) -> None:
    for p in paths:
        if p is None or not os.path.lexists(p):
            continue
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def unpack(name: str, root: str) -> str | None:
    """Checks the archive in ``root`` against torchvision's MD5 and unpacks it there; returns the problem, or None."""
    from torchvision.datasets.utils import check_integrity, extract_archive

    cls = cifar_class(name)
    archive, folder = os.path.join(root, cls.filename), os.path.join(root, cls.base_folder)
    if not check_integrity(archive, cls.tgz_md5):
        return f"{archive} is incomplete or corrupt ({os.path.getsize(archive):,} bytes, MD5 not {cls.tgz_md5})"
    created = first_missing(folder)
    try:
        extract_archive(archive, root)
    except Exception as err:  # tarfile.ReadError, EOFError, OSError (disk full), ...
        remove([created])
        return f"cannot unpack {archive} ({type(err).__name__}: {err})"
    return None


def prepare_cifar(name: str, root: str, download: bool) -> None:
    """``root/<folder>`` of CIFAR ``name`` exists afterwards, or a one-line error says what to do (module docstring)."""
    cls = cifar_class(name)
    archive, folder = os.path.join(root, cls.filename), os.path.join(root, cls.base_folder)
    if os.path.isdir(folder):
        return
    if os.path.isfile(archive):  # placed by hand (or kept from an earlier download): never deleted here
        problem = unpack(name, root)
        if problem:
            raise ValueError(f"{problem}: delete it and place a complete copy of {cls.url} there")
        return
    if not download:
        raise FileNotFoundError(f"{name} not found: neither {folder}/ nor {archive}; pass --download, or "
                                f"{offline_hint(name, root)}")
    created = [first_missing(root) or first_missing(archive)]  # the data folder (and parents), or the archive
    try:
        fetch(cls.url, archive)
    except Exception as err:  # URLError (no network), HTTPError, an interrupted transfer
        remove(created)
        raise OSError(f"cannot download {name} from {cls.url} ({type(err).__name__}: {err}); "
                      f"{offline_hint(name, root)}") from None
    problem = unpack(name, root)
    if problem:
        remove(created)
        raise ValueError(f"{problem} after downloading it from {cls.url} (removed): try again, or "
                         f"{offline_hint(name, root)}")
