"""``--dataset folder``: your own images, in every layout it accepts, its one-line errors, and a tiny run end to end
(train 1 epoch, best.pt, ahbf-eval) on JPEGs written with Pillow."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from ahbf.engine.cli import eval_main, train_main
from ahbf.engine.config import build_config
from ahbf.engine.recipes import NAMES
from ahbf.pipelines import DataConfig, build_data, no_test_set_note
from ahbf.pipelines.scan import BadImageError
from tests.test_cli import one_line_error
from tests.test_pipelines_folder import smooth_image


def write_images(root, splits=(("train", 5), ("val", 2)), classes=("ant", "bee", "cat"), size=12):
    """root/<split>/<class>/<i>.jpg, tiny JPEGs of slightly varied shapes."""
    rng = np.random.default_rng(0)
    for split, n in splits:
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                smooth_image(rng, size + i, size + 2).save(os.path.join(root, split, c, f"{i}.jpg"), quality=90)
    return str(root)


def data_cfg(root, **kw):
    return DataConfig(**{**dict(dataset="folder", root=str(root), backend="torch", workers=0, batch_size=4,
                                eval_batch_size=4, image_size=8, val_fraction=0.2), **kw})


def labels(batches):
    batches.set_epoch(0)
    return sorted(y for _, ys in batches for y in ys.tolist())


def test_recipe_states_the_defaults():
    assert "folder" in NAMES
    cfg = build_config(overrides=[("data.dataset", "folder")])
    assert (cfg.data.image_size, cfg.model.arch, cfg.train.epochs, cfg.data.val_fraction) == (64, "resnet20", 60, 0.1)


def test_train_and_val(tmp_path):
    """val/ is the val split (not a holdout), and with no test/ the val split stands in for the test table."""
    root = write_images(tmp_path / "d")
    data = build_data(data_cfg(root))
    assert (data.num_classes, data.image_size) == (3, 8)
    assert data.sizes == {"train": 15, "val": 6, "test": 6}
    assert data.test is data.val and labels(data.val) == [0, 0, 1, 1, 2, 2]
    assert no_test_set_note(data_cfg(root)) == f"the val split (no {root}/test folder)"


def test_train_only_holds_out_val(tmp_path):
    root = write_images(tmp_path / "d", splits=(("train", 5),))
    data = build_data(data_cfg(root, val_fraction=0.2))
    assert data.sizes == {"train": 12, "val": 3, "test": 3} and data.test is data.val
    assert "held-out val split" in no_test_set_note(data_cfg(root))
    with pytest.raises(ValueError, match=f"^nothing to evaluate on: add {root}/val or {root}/test, or set data.val_fraction"):
        build_data(data_cfg(root, val_fraction=0))


def test_train_val_test_and_any_number_of_classes(tmp_path):
    classes = tuple(f"c{i:02d}" for i in range(11))
    root = write_images(tmp_path / "d", splits=(("train", 2), ("val", 1), ("test", 1)), classes=classes)
    data = build_data(data_cfg(root))
    assert data.num_classes == 11 and data.sizes == {"train": 22, "val": 11, "test": 11}
    assert data.test is not data.val and labels(data.test) == list(range(11))
    assert no_test_set_note(data_cfg(root)) == ""
    root2 = write_images(tmp_path / "two", splits=(("train", 3), ("test", 1)), classes=("no", "yes"))
    data = build_data(data_cfg(root2, image_size=0))  # val held out of train; test from test/
    assert (data.num_classes, data.image_size, data.sizes) == (2, 64, {"train": 5, "val": 1, "test": 2})
    x, _ = next(iter(data.test))
    assert x.shape[1:] == (3, 64, 64)


def damage(root, what):
    """Breaks the tree in one way; returns the message the error must match."""
    if what == "missing":
        shutil.rmtree(root)
        return f"image folder not found: {root}/train \\(--dataset folder reads"
    if what == "no classes":
        shutil.rmtree(os.path.join(root, "train"))
        os.makedirs(os.path.join(root, "train"))
        return f"no class folders in {root}/train"
    if what == "empty class":
        os.makedirs(os.path.join(root, "train", "dog"))
        return f"class folder without images: {root}/train/dog$"
    if what == "corrupt image":
        path = os.path.join(root, "train", "bee", "1.jpg")
        open(path, "wb").write(open(path, "rb").read()[:60])
        return f"bad image file {path}: "
    if what == "val classes differ":
        os.rename(os.path.join(root, "val", "cat"), os.path.join(root, "val", "cow"))
        return (f"class folders differ between {root}/train \\(3\\) and {root}/val \\(3\\): \\['cat'\\] only in "
                f"{root}/train; \\['cow'\\] only in {root}/val")
    if what == "test classes differ":
        shutil.copytree(os.path.join(root, "val", "ant"), os.path.join(root, "test", "ant"))
        return f"class folders differ between {root}/train \\(3\\) and {root}/test \\(1\\): \\['bee', 'cat'\\] only in"
    if what == "one class":
        for split in ("train", "val"):
            for c in ("bee", "cat"):
                shutil.rmtree(os.path.join(root, split, c))
        return f"{root}/train: 1 class; classification needs at least 2"
    raise AssertionError(what)


BAD = ["missing", "no classes", "empty class", "corrupt image", "val classes differ", "test classes differ", "one class"]


@pytest.mark.parametrize("what", BAD)
def test_bad_layouts_are_one_line_errors(tmp_path, what):
    root = write_images(tmp_path / "d")
    match = damage(root, what)
    with pytest.raises((ValueError, FileNotFoundError), match=f"^{match}") as err:
        build_data(data_cfg(root))
    assert "\n" not in str(err.value)
    if what == "corrupt image":
        assert isinstance(err.value, BadImageError)


@pytest.mark.parametrize("what", ["missing", "val classes differ"])
def test_bad_layouts_through_the_cli(tmp_path, capsys, what):
    root = write_images(tmp_path / "d")
    damage(root, what)
    msg = one_line_error(capsys, train_main, ["--dataset", "folder", "--data-dir", root, "--device", "cpu",
                                              "-o", str(tmp_path / "out"), "--no-progress", "--threads", "1"])
    assert root in msg


def test_tiny_run_end_to_end(tmp_path, capsys):
    """1 epoch on 8 px JPEGs from the folder recipe, then ahbf-eval of best.pt on both splits."""
    root, out = write_images(tmp_path / "d"), str(tmp_path / "run")
    assert train_main(["--dataset", "folder", "--data-dir", root, "--epochs", "1", "--threads", "1", "--device", "cpu",
                       "--image-size", "8", "-b", "4", "-j", "1", "-o", out, "--no-progress",
                       "objective.backend=eager"]) == 0
    text = capsys.readouterr().out
    assert "recipe: folder" in text and "model: ahbf resnet20" in text
    assert f"data: folder, 15 train / 6 val / test = the val split (no {root}/test folder), 3 classes, 8px" in text
    assert f"test set = the val split (no {root}/test folder), best checkpoint, epoch 1" in text
    assert {"best.pt", "last.pt", "config.yaml", "results.json"} <= set(os.listdir(out))
    assert eval_main([os.path.join(out, "best.pt"), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert f"folder test split = the val split (no {root}/test folder)" in text and "(6 samples)" in text
    assert eval_main([os.path.join(out, "best.pt"), "--device", "cpu", "--split", "val"]) == 0
    assert "(6 samples)" in capsys.readouterr().out
