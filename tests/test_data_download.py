"""``--download`` without network, partial and corrupt archives, and the offline placement of CIFAR archives
(``ahbf.pipelines.download``). No test touches the network: ``download.fetch`` is replaced."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.error

import pytest
import torchvision

from ahbf.engine.cli import train_main
from ahbf.pipelines import download
from ahbf.pipelines.sources import cifar_arrays
from tests.test_cli import one_line_error

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def no_network(url, path):
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def partial_transfer(url, path):
    """Writes part of the archive, then the connection drops (torchvision writes straight to the target file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").write(b"\x1f\x8b" + b"\0" * 5000)
    raise ConnectionResetError(104, "Connection reset by peer")


def test_no_network_names_the_url_and_the_file_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "fetch", no_network)
    root = tmp_path / "data" / "cifar100"
    msg = one_line_error(capsys, train_main, ["--dataset", "cifar100", "--download", "--data-dir", str(root),
                                              "-o", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert msg.startswith(f"cannot download cifar100 from {URL} (URLError: ") and "Name or service not known" in msg
    assert f"place it as {root}/cifar-100-python.tar.gz" in msg and "docs/data.md" in msg
    assert not (tmp_path / "data").exists()  # the folders the download created are gone, parents included
    msg = one_line_error(capsys, train_main, ["--dataset", "cifar100", "--data-dir", str(root), "-o",
                                              str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert msg.startswith(f"cifar100 not found: neither {root}/cifar-100-python/ nor {root}/cifar-100-python.tar.gz; "
                          "pass --download, or without network, download " + URL)


def test_partial_download_is_removed_and_an_existing_folder_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch", partial_transfer)
    root = tmp_path / "cifar100"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match=f"^cannot download cifar100 from {URL} \\(ConnectionResetError: "):
        cifar_arrays("cifar100", str(root), download=True)
    assert sorted(os.listdir(root)) == ["notes.txt"]  # the partial archive is gone, the user's file is not


def fake_archive(folder: str) -> bytes:
    """A .tar.gz holding ``folder/meta`` (not CIFAR's content: its MD5 is patched in where needed)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"{folder}/meta")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"meta"))
    return buf.getvalue()


def test_corrupt_download_is_removed(tmp_path, monkeypatch):
    """A transfer that completes but fails the MD5 (a proxy's error page, a truncated body) is not kept."""
    monkeypatch.setattr(download, "fetch", lambda url, path: (os.makedirs(os.path.dirname(path), exist_ok=True),
                                                              open(path, "wb").write(b"<html>proxy</html>")))
    root = tmp_path / "d" / "cifar10"
    with pytest.raises(ValueError, match=f"^{root}/cifar-10-python.tar.gz is incomplete or corrupt \\(18 bytes, MD5 "
                                         f"not c58f30108f718f92721af3b95e74349a\\) after downloading it from https://"):
        cifar_arrays("cifar10", str(root), download=True)
    assert not (tmp_path / "d").exists()


def test_archive_placed_by_hand_offline(tmp_path, monkeypatch):
    """Offline: an archive in root is checked and unpacked without --download and without the network; a
    corrupt one is a clear line and stays where the user put it."""
    monkeypatch.setattr(download, "fetch", no_network)
    root = tmp_path / "cifar100"
    root.mkdir()
    archive = root / "cifar-100-python.tar.gz"
    data = fake_archive("cifar-100-python")
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"^{archive} is incomplete or corrupt \\({len(data) // 2} bytes, MD5 not "
                                         f"eb9058c3a382ffc7106e4002c42a8d85\\): delete it and place a complete copy of {URL}"):
        cifar_arrays("cifar100", str(root), download=False)
    assert archive.exists()
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "tgz_md5", hashlib.md5(data[: len(data) // 2]).hexdigest())
    with pytest.raises(ValueError, match=f"^cannot unpack {archive} \\(\\w+Error: .*\\): delete it and place"):
        cifar_arrays("cifar100", str(root), download=False)  # right checksum, broken archive: nothing half-unpacked
    assert sorted(os.listdir(root)) == ["cifar-100-python.tar.gz"]
    archive.write_bytes(data)  # complete; its MD5 stands in for the real archive's
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "tgz_md5", hashlib.md5(data).hexdigest())
    download.prepare_cifar("cifar100", str(root), download=True)  # placed by hand: no fetch even with --download
    assert (root / "cifar-100-python" / "meta").read_bytes() == b"meta"
    with pytest.raises(ValueError, match=f"^{root}/cifar-100-python is incomplete or corrupt \\(a batch file is "
                                         "missing or fails its MD5\\)"):
        cifar_arrays("cifar100", str(root), download=False)  # unpacked, but its files are not CIFAR's
