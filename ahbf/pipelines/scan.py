"""Image-folder bookkeeping shared by the DALI and torchvision pipelines.

Listing (the same samples, order and class indices as torchvision's ``ImageFolder``), file lists, where the
val and test splits come from (``split_sources``), the held-out split, the per-epoch sample order
(``DistributedSampler``'s), and the checks for bad input.
Every error names the file or folder at fault in one line.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .base import DataConfig

# torchvision.datasets.folder.IMG_EXTENSIONS, matched on the lower-cased name as ImageFolder does
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CHECK_MODES = ("auto", "full", "header", "none")
FULL_CHECK_LIMIT = 100_000  # check_images="auto": decode-check sets up to this size, header-check larger ones

Sample = tuple[str, int]  # (absolute path, class index)


class BadImageError(ValueError):
    """An image file that cannot be decoded; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"bad image file {path}: {reason}")
        self.path, self.reason = path, reason


@dataclass
class ImageSet:
    samples: list[Sample]
    classes: list[str]

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.samples]


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


def scan_folder(folder: str, *, skip_bad: bool = False) -> ImageSet:
    """``folder/<class>/**/<image>`` -> samples in ImageFolder's order with ImageFolder's class indices.

    A missing folder, a folder without class folders, or (unless ``skip_bad``) a class folder without
    images raises ``FileNotFoundError`` naming it. With ``skip_bad`` an empty class keeps its index (as
    ``ImageFolder(allow_empty=True)``) and a warning counts them. Files with other extensions are not
    samples (ImageFolder's rule); a warning counts them and names the first.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {folder} (expected {folder}/<class>/<image>)")
    samples, empty, ignored = [], [], []
    for idx, name in enumerate(classes):
        n0 = len(samples)
        for root, _, fnames in sorted(os.walk(os.path.join(folder, name), followlinks=True)):
            for fname in sorted(fnames):
                path = os.path.join(root, fname)
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((path, idx))
                else:
                    ignored.append(path)
        if len(samples) == n0:
            empty.append(os.path.join(folder, name))
    if empty and not skip_bad:
        raise FileNotFoundError(f"class folder without images: {empty[0]}"
                                + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""))
    if empty:
        _warn(f"skipped {len(empty)} empty class folder(s) under {folder}, e.g. {empty[0]}")
    if ignored:
        _warn(f"ignored {len(ignored)} file(s) without an image extension under {folder}, e.g. {ignored[0]}")
    return ImageSet(samples, classes)


def read_file_list(list_path: str, root: str) -> ImageSet:
    """A text file of ``relative/path label`` lines (DALI's file_list format; paths relative to ``root``).

    The label is the last whitespace-separated field, so paths may contain spaces. Classes are named by
    their index. A missing list or a missing image raises ``FileNotFoundError`` naming it; a malformed line
    raises ``ValueError`` naming the list and the line number.
    """
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"file list not found: {list_path}")
    samples = []
    with open(list_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rel, label = line.rstrip("\n").rsplit(None, 1)
                label = int(label)
                if label < 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{list_path}:{lineno}: expected 'relative/path label', got {line.strip()!r}") from None
            samples.append((os.path.join(root, rel.strip()), label))
    if not samples:
        raise ValueError(f"file list is empty: {list_path}")
    missing = next((p for p, _ in samples if not os.path.isfile(p)), None)
    if missing is not None:
        raise FileNotFoundError(f"image listed in {list_path} not found: {missing}")
    return ImageSet(samples, [str(i) for i in range(max(y for _, y in samples) + 1)])


_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"P5", b"P6")


def header_problem(path: str) -> str | None:
    """Cheap check (two small reads): a known image signature, and a JPEG's end-of-image marker near its end
    (a truncated JPEG lacks it). Returns the problem, or None. Misses damage inside the data."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if not head:
                return "empty file"
            is_webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
            if not (is_webp or head.startswith(_MAGIC)):
                return "not an image (unknown file signature)"
            if head.startswith(b"\xff\xd8"):
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                if b"\xff\xd9" not in f.read():
                    return "truncated JPEG (no end-of-image marker)"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return None


def decode_problem(path: str) -> str | None:
    """Decodes the image with Pillow (JPEG at 1/8 scale: the entropy-coded data is still read whole, so
    truncation is found at a fraction of the cost). Returns the problem, or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as err:  # Pillow raises OSError, UnidentifiedImageError, SyntaxError, ...
        return f"{type(err).__name__}: {err}".replace(f"'{path}'", "the file").replace(path, "the file")
    return None


def check_images(images: ImageSet, mode: str, *, workers: int = 4, skip_bad: bool = False,
                 what: str = "images") -> ImageSet:
    """Verifies every file (``mode``: full = decode, header = signature + JPEG end marker, none, auto = full up
    to FULL_CHECK_LIMIT images and header above). Raises ``BadImageError`` on the first bad file, or with
    ``skip_bad`` drops the bad files with a warning that counts them and names the first."""
    if mode not in CHECK_MODES:
        raise ValueError(f"check_images must be one of {CHECK_MODES}, got {mode!r}")
    if mode == "auto":
        mode = "full" if len(images.samples) <= FULL_CHECK_LIMIT else "header"
    if mode == "none":
        return images
    check = decode_problem if mode == "full" else header_problem
    with ThreadPoolExecutor(max(1, workers)) as pool:  # Pillow and file reads release the GIL
        problems = list(pool.map(check, images.paths, chunksize=64))
    bad = [(p, why) for p, why in zip(images.paths, problems) if why is not None]
    if bad and not skip_bad:
        raise BadImageError(*bad[0])
    if bad:
        _warn(f"skipped {len(bad)} bad {what} (check_images={mode}), e.g. {bad[0][0]}: {bad[0][1]}")
        bad_paths = {p for p, _ in bad}
        images = ImageSet([s for s in images.samples if s[0] not in bad_paths], images.classes)
        if not images.samples:
            raise ValueError(f"no readable {what} left after skipping {len(bad)} bad files")
    return images


def find_bad_image(paths: list[str]) -> tuple[str, str] | None:
    """The first of ``paths`` that Pillow cannot decode, with the reason (used to name the file behind a
    decoding error raised mid-epoch)."""
    for p in paths:
        why = decode_problem(p)
        if why is not None:
            return p, why
    return None


def holdout_size(n: int, fraction: float) -> int:
    """How many of ``n`` training samples ``fraction`` holds out (at least 1); a split leaving none is an error."""
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise ValueError(f"val_fraction={fraction} leaves no training images (of {n})")
    return n_val


def holdout_split(images: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet | None]:
    """Holds out ``fraction`` of the training images (a fixed random subset: ``seed`` 0, independent of the
    run's seed) to choose the best checkpoint. Both parts keep the original order."""
    if fraction <= 0:
        return images, None
    n = len(images.samples)
    n_val = holdout_size(n, fraction)
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    train = [s for i, s in enumerate(images.samples) if i not in held]
    val = [s for i, s in enumerate(images.samples) if i in held]
    return ImageSet(train, images.classes), ImageSet(val, images.classes)


@dataclass(frozen=True)
class SplitSources:
    """Where an image-folder data set's val and test splits come from."""

    val: str
    """a folder, ``holdout`` (``val_fraction`` of the training images), or "" (no val split)"""
    test: str
    """a folder or file list, or ``val`` (no test set: the val split stands in, and the test table says so)"""


def split_sources(cfg: DataConfig) -> SplitSources:
    """``imagenet``: val = held out of ``root/train``, test = ``root/val`` (ILSVRC's val). ``folder`` (your own
    images): val = ``root/val`` if it exists, else held out of ``root/train``; test = ``root/test`` if it
    exists, else the val split. ``cfg.test_list`` replaces the test folder."""
    holdout = "holdout" if cfg.val_fraction > 0 else ""
    if cfg.dataset != "folder":
        return SplitSources(holdout, cfg.test_list or os.path.join(cfg.root, "val"))
    val, test = os.path.join(cfg.root, "val"), os.path.join(cfg.root, "test")
    return SplitSources(val if os.path.isdir(val) else holdout,
                        cfg.test_list or (test if os.path.isdir(test) else "val"))


def no_test_set_note(cfg: DataConfig) -> str:
    """"" when the test table reports a test set; otherwise what it reports instead (run log, ahbf-eval)."""
    src = split_sources(cfg) if cfg.dataset == "folder" else None
    if src is None or src.test != "val":
        return ""
    held = "held-out " if src.val == "holdout" else ""
    return f"the {held}val split (no {os.path.join(cfg.root, 'test')} folder)"


def epoch_permutation(n: int, *, seed: int, epoch: int, world_size: int) -> torch.Tensor:
    """``DistributedSampler``'s padded order for (seed, epoch): ``randperm(n)`` seeded with seed + epoch,
    extended by wrapping to a multiple of world_size. Rank r's samples are ``[r::world_size]``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    total = -(-n // world_size) * world_size
    return order.repeat(-(-total // n))[:total] if total > n else order


def epoch_indices(n: int, *, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s sample indices for ``epoch``: exactly ``torch.utils.data.DistributedSampler``'s (shuffle
    on, drop_last off). Together the ranks cover every sample once, plus at most world_size - 1 repeats."""
    return epoch_permutation(n, seed=seed, epoch=epoch, world_size=world_size)[rank::world_size].tolist()


def mix_seed(*parts: int) -> int:
    """A 31-bit seed from integers (seed, epoch, rank, ...), different for every combination in practice."""
    h = 0x9E3779B9
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFF
