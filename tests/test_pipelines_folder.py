"""ImageNet-style folder pipelines (DALI on the CPU, torchvision fallback) on small JPEGs written with Pillow.

DALI is a test dependency (setup.py's ``test`` extra). In CI (``CI=true``, as ``.ci/run`` runs) the DALI cases never
skip: without DALI they fail. Elsewhere, in an install without the extra, they skip and the rest runs on the torch backend.
"""
from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ahbf.pipelines import DataConfig, build_data
from ahbf.pipelines.dali import DALI_IMPORT_ERROR, DaliFolderLoader, dali_available, decoder_placement
from ahbf.pipelines.folder import IMAGENET_MEAN, IMAGENET_STD, resolve_backend
from ahbf.pipelines.scan import BadImageError, ImageSet, epoch_indices, holdout_split, read_file_list, scan_folder
from ahbf.pipelines.torch_folder import TorchFolderLoader

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
needs_dali = pytest.mark.skipif(not dali_available() and not IN_CI,
                                reason="NVIDIA DALI is not installed (pip install -e .[test]); CI never skips these")
KINDS = [pytest.param("dali", marks=needs_dali), "torch"]
BACKEND = "dali" if dali_available() or IN_CI else "torch"  # the bad-input cases: DALI wherever it is expected
CLASSES = ("ant", "bee", "cat")
SIZE = 32
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def smooth_image(rng, height, width, mode="RGB"):
    """A photo-like image (smooth colour field plus mild grain) that survives JPEG and resizing well."""
    field = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.int16) + rng.integers(-8, 9, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode)


def write_tree(root, per_class=(7, 2), rng=None):
    """root/{train,val}/<class>/*: JPEGs of varied sizes, one grayscale JPEG and one PNG."""
    rng = rng or np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in CLASSES:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                img = smooth_image(rng, 40 + 9 * i, 56 + 5 * i, mode="L" if (c, i) == ("bee", 1) else "RGB")
                ext = ".png" if (c, i) == ("cat", 0) else ".JPEG"
                img.save(os.path.join(root, split, c, f"{c}_{i}{ext}"), **({} if ext == ".png" else {"quality": 90}))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet"))
    write_tree(root)
    return root


@pytest.fixture(scope="module")
def indexed(tree, tmp_path_factory):
    """The 21 train images under a file list whose label is the image's index: labels identify samples."""
    images = scan_folder(os.path.join(tree, "train"))
    lst = tmp_path_factory.mktemp("lists") / "train.txt"
    lst.write_text("".join(f"{os.path.relpath(p, tree)} {i}\n" for i, (p, _) in enumerate(images.samples)))
    return read_file_list(str(lst), tree)


def loader(kind, images, **kw):
    """DALI with 2 threads; torch in-process by default (worker start-up costs seconds on a busy CI machine)."""
    args = dict(train=True, batch_size=4, size=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                workers=2 if kind == "dali" else 0)
    args.update(kw)
    return (DaliFolderLoader if kind == "dali" else TorchFolderLoader)(images, **args)


def epoch(batches, e=0):
    batches.set_epoch(e)
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


@needs_dali
def test_dali_is_installed():
    assert dali_available(), f"NVIDIA DALI must be importable in CI (pip install -e .[test]): {DALI_IMPORT_ERROR}"
    assert resolve_backend("auto") == "dali"
    assert decoder_placement("cpu") == ("cpu", None)


def test_scan_matches_imagefolder(tree):
    from torchvision.datasets import ImageFolder

    for split in ("train", "val"):
        ref = ImageFolder(os.path.join(tree, split))
        images = scan_folder(os.path.join(tree, split))
        assert images.samples == ref.samples and images.classes == ref.classes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_format(tree, kind, dtype):
    images = scan_folder(os.path.join(tree, "train"))
    batches = loader(kind, images, dtype=dtype, batch_size=8)
    assert len(batches) == 3 and batches.num_samples == 21
    got = list(batches)
    assert [len(y) for _, y in got] == [8, 8, 5]
    for x, y in got:
        assert x.shape == (len(y), 3, SIZE, SIZE) and x.dtype == dtype and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == 1
    x = torch.cat([x for x, _ in got]).float()
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    tol = 0.02 if dtype == torch.float32 else 0.05
    assert ((x >= lo - tol) & (x <= hi + tol)).all(), "values outside the normalised [0, 255] range"
    assert x.std() > 0.2 and x.mean().abs() < 1.5


@pytest.mark.parametrize("kind", KINDS)
def test_labels_equal_imagefolder(tree, kind):
    from torchvision.datasets import ImageFolder

    for split in ("train", "val"):
        ref = ImageFolder(os.path.join(tree, split)).targets
        images = scan_folder(os.path.join(tree, split))
        _, y = epoch(loader(kind, images, train=False, batch_size=5))  # evaluation order = ImageFolder's
        assert y.tolist() == ref
    ref, images = ImageFolder(os.path.join(tree, "train")).targets, scan_folder(os.path.join(tree, "train"))
    _, y = epoch(loader(kind, images, seed=3), 2)  # training order = DistributedSampler's for (seed, epoch)
    assert y.tolist() == [ref[i] for i in epoch_indices(len(ref), seed=3, epoch=2, rank=0, world_size=1)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [21, 20])
def test_two_shards_cover_every_image_once(indexed, kind, n):
    images = ImageSet(indexed.samples[:n], indexed.classes)
    for e in (0, 1):
        train = [epoch(loader(kind, images, rank=r, world_size=2, seed=5), e)[1].tolist() for r in (0, 1)]
        assert len(train[0]) == len(train[1]) == -(-n // 2)  # equal step counts on every rank
        union = sorted(train[0] + train[1])
        assert sorted(set(union)) == list(range(n)) and len(union) - n == n % 2  # + one repeat if n is odd
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(n), num_replicas=2, rank=1, shuffle=True, seed=5)
        sampler.set_epoch(e)
        assert train[1] == list(sampler)
        test = [epoch(loader(kind, images, train=False, rank=r, world_size=2, batch_size=3))[1].tolist() for r in (0, 1)]
        assert sorted(test[0] + test[1]) == list(range(n))  # evaluation: an exact partition


@pytest.mark.parametrize("kind", KINDS)
def test_epoch_is_a_function_of_seed_and_epoch(tree, kind):
    images = scan_folder(os.path.join(tree, "train"))
    a = loader(kind, images, seed=1)
    x0, y0 = epoch(a, 0)
    x1, y1 = epoch(a, 1)
    xr, yr = epoch(loader(kind, images, seed=1), 1)  # a resumed run: a fresh loader set to epoch 1
    assert torch.equal(x1, xr) and torch.equal(y1, yr)
    assert not torch.equal(y0, y1) or not torch.equal(x0, x1)
    # the augmentation does not depend on the number of DALI threads / DataLoader workers
    x2, _ = epoch(loader(kind, images, seed=1, workers={"dali": 1, "torch": 2}[kind]), 1)
    assert torch.equal(x1, x2)


@needs_dali
def test_dali_and_torch_agree_on_evaluation_images(tree):
    images = scan_folder(os.path.join(tree, "val"))
    xd, yd = epoch(loader("dali", images, train=False, size=224, batch_size=6))
    xt, yt = epoch(loader("torch", images, train=False, size=224, batch_size=6))
    assert torch.equal(yd, yt)
    diff = (xd - xt).abs().mean().item()  # two resize implementations: close (0.006 measured), not equal
    assert diff < 0.02, f"DALI and torchvision evaluation crops differ by {diff:.3f} on average"


@needs_dali
def test_build_data_imagenet_splits(tree):
    cfg = DataConfig(dataset="imagenet", root=tree, backend="dali", batch_size=4, eval_batch_size=4, workers=2,
                     image_size=SIZE, val_fraction=0.25, dtype="float16")
    data = build_data(cfg)
    assert (data.num_classes, data.image_size) == (3, SIZE)
    assert isinstance(data.train, DaliFolderLoader)
    assert data.train.num_samples + data.val.num_samples == 21 and data.val.num_samples == 5
    assert data.test.num_samples == 6
    held_train, held_val = holdout_split(scan_folder(os.path.join(tree, "train")), 0.25)
    assert set(held_train.paths).isdisjoint(held_val.paths)
    x, y = next(iter(data.val))
    assert x.dtype == torch.float16 and x.is_contiguous(memory_format=torch.channels_last)
    torch_data = build_data(DataConfig(**{**cfg.__dict__, "backend": "torch", "workers": 0}))
    assert isinstance(torch_data.train, TorchFolderLoader)
    assert torch.equal(epoch(torch_data.val)[1], epoch(data.val)[1])
    with pytest.raises(ValueError, match="backend"):
        build_data(DataConfig(**{**cfg.__dict__, "backend": "opencv"}))


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.fixture
def small_tree(tmp_path):
    root = str(tmp_path / "data")
    write_tree(root, per_class=(3, 1))
    return root


def cfg_for(root, **kw):
    return DataConfig(**{**dict(dataset="imagenet", root=root, backend=BACKEND, batch_size=4, eval_batch_size=4,
                                workers=1, image_size=SIZE, val_fraction=0.0), **kw})


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def test_missing_folders(tmp_path, small_tree):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nowhere/train"):
        build_data(cfg_for(str(tmp_path / "nowhere")))
    shutil.rmtree(os.path.join(small_tree, "val"))
    with pytest.raises(FileNotFoundError, match=f"image folder not found: {small_tree}/val"):
        build_data(cfg_for(small_tree))


def test_empty_class_folder(small_tree):
    empty = os.path.join(small_tree, "train", "bee")
    for f in os.listdir(empty):
        os.remove(os.path.join(empty, f))
    with pytest.raises(FileNotFoundError, match=f"class folder without images: {empty}$"):
        build_data(cfg_for(small_tree))
    with pytest.warns(UserWarning, match="skipped 1 empty class folder"):
        data = build_data(cfg_for(small_tree, skip_bad_images=True))
    assert data.num_classes == 3 and data.train.num_samples == 6  # "cat" keeps index 2, as ImageFolder's
    assert sorted(set(epoch(data.train)[1].tolist())) == [0, 2]


def test_files_without_an_image_extension_are_not_samples(small_tree):
    open(os.path.join(small_tree, "train", "ant", "notes.txt"), "w").write("not an image\n")
    with pytest.warns(UserWarning, match="ignored 1 file.*notes.txt"):
        data = build_data(cfg_for(small_tree))
    assert data.train.num_samples == 9


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
@pytest.mark.parametrize("check", ["full", "header"])
def test_bad_image_found_by_the_check(small_tree, damage, check):
    bad = os.path.join(small_tree, "train", "bee", "bee_2.JPEG")
    if damage == "truncated":
        truncate(bad)
    else:
        open(bad, "w").write("<html>a web page saved as .JPEG</html>\n")
    with pytest.raises(BadImageError, match=f"^bad image file {bad}: [^\n]+$") as err:
        build_data(cfg_for(small_tree, check_images=check))
    assert isinstance(err.value, ValueError) and err.value.path == bad
    with pytest.warns(UserWarning, match=f"skipped 1 bad train images .*{bad}"):
        data = build_data(cfg_for(small_tree, check_images=check, skip_bad_images=True))
    assert data.train.num_samples == 8 and len(epoch(data.train)[1]) == 8


@pytest.mark.parametrize("backend,workers", [pytest.param("dali", 2, marks=needs_dali), ("torch", 0), ("torch", 1)])
@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_bad_image_found_while_decoding(small_tree, backend, workers, damage):
    """With check_images=none the decoder meets the file; the error still names it in one line."""
    bad = os.path.join(small_tree, "train", "cat", "cat_1.JPEG")
    truncate(bad) if damage == "truncated" else open(bad, "w").write("plain text\n")
    data = build_data(cfg_for(small_tree, check_images="none", backend=backend, workers=workers))
    with pytest.raises(BadImageError, match=f"^bad image file {bad}: [^\n]+$"):
        epoch(data.train)


def test_file_list_errors(small_tree, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("train/ant/ant_0.JPEG 0\ntrain/ant/ant_1.JPEG zero\n")
    with pytest.raises(ValueError, match=f"{lst}:2: expected 'relative/path label'"):
        read_file_list(str(lst), small_tree)
    lst.write_text("train/ant/ant_0.JPEG 0\ntrain/ant/missing.JPEG 1\n")
    with pytest.raises(FileNotFoundError, match=f"not found: {small_tree}/train/ant/missing.JPEG"):
        read_file_list(str(lst), small_tree)
    with pytest.raises(FileNotFoundError, match="file list not found"):
        build_data(cfg_for(small_tree, train_list=str(tmp_path / "nope.txt")))
    lst.write_text("train/ant/ant_0.JPEG 4\ntrain/bee/bee_0.JPEG 1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = build_data(cfg_for(small_tree, train_list=str(lst)))
    assert data.num_classes == 5 and sorted(epoch(data.train)[1].tolist()) == [1, 4]
