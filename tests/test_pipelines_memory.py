"""The on-device tensor loader (CIFAR, digits, synthetic) and build_data for the in-memory sets."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from ahbf.pipelines import DataConfig, DeviceTensorLoader, build_data
from ahbf.pipelines.memory import random_crop_flip
from ahbf.pipelines.sources import cifar_arrays

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def random_images(n, h=8, w=7, seed=0):
    """Random uint8 NHWC images: every window of every image is unique, so a crop identifies its offset."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def make_loader(n=10, **kw):
    x, y = random_images(n), torch.arange(n)  # label = sample index
    args = dict(batch_size=4, mean=MEAN, std=STD, train=True, pad=2, flip=True, seed=7)
    args.update(kw)
    return DeviceTensorLoader(x, y, **args)


def run_epoch(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    assert len(batches) == len(loader)
    if not batches:  # an evaluation shard of a set smaller than the world
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def matching_windows(out, img, pad):
    """Every (dy, dx, flipped) for which ``out`` is the window at (dy, dx) of the zero-padded ``img``."""
    H, W, _ = img.shape
    padded = F.pad(img, (0, 0, pad, pad, pad, pad))
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            win = padded[dy:dy + H, dx:dx + W]
            hits += [(dy, dx, False)] * torch.equal(out, win) + [(dy, dx, True)] * torch.equal(out, win.flip(1))
    return hits


def test_crop_is_a_shifted_window_of_the_padded_image_and_flip_is_a_flip():
    x = random_images(64)
    out = random_crop_flip(x, pad=3, flip=True, gen=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    seen = set()
    for o, img in zip(out, x):
        hits = matching_windows(o, img, 3)
        assert len(hits) == 1, f"crop matches {len(hits)} windows"
        seen.add(hits[0])
    assert len({h[:2] for h in seen}) > 15 and {h[2] for h in seen} == {False, True}  # offsets and flips vary
    flipped = random_crop_flip(x, pad=0, flip=True, gen=torch.Generator().manual_seed(2))
    is_flip = [torch.equal(o, i.flip(1)) for o, i in zip(flipped, x)]
    assert all(is_flip[k] or torch.equal(flipped[k], x[k]) for k in range(64)) and 10 < sum(is_flip) < 54
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator()), x)


def test_batches_are_normalised_channels_last():
    loader = make_loader(train=False, dtype=torch.bfloat16)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 8, 7) and x.dtype == torch.bfloat16 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    ref = (random_images(10)[:4].permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x.float(), ref, rtol=1e-2, atol=1e-2)


def test_epoch_order_and_augmentation_depend_only_on_seed_epoch_rank():
    a, b = make_loader(), make_loader()
    run_epoch(a, 0)
    x1, y1 = run_epoch(a, 1)
    x1b, y1b = run_epoch(b, 1)  # a resumed run: a fresh loader set straight to epoch 1
    assert torch.equal(x1, x1b) and torch.equal(y1, y1b)
    x0, y0 = run_epoch(a, 0)
    assert not torch.equal(y0, y1)
    x2, y2 = run_epoch(make_loader(seed=8), 1)
    assert not torch.equal(y2, y1)


@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (2, 3)])
def test_shards_cover_the_set_like_distributed_sampler(n, world):
    for epoch in (0, 3):
        per_rank = [run_epoch(make_loader(n, rank=r, world_size=world), epoch)[1].tolist() for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # every rank takes the same number of steps
        assert sorted(set(sum(per_rank, []))) == list(range(n))
        for r in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            assert per_rank[r] == list(sampler)
        test = [run_epoch(make_loader(n, rank=r, world_size=world, train=False), 0)[1].tolist() for r in range(world)]
        assert sorted(sum(test, [])) == list(range(n))  # evaluation: an exact partition


def test_ranks_draw_different_augmentations():
    x = random_images(8)
    outs = [next(iter(DeviceTensorLoader(x, torch.zeros(8), 8, MEAN, STD, train=True, pad=2, seed=1, rank=r,
                                         world_size=2)))[0] for r in (0, 1)]
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_build_data_in_memory(dataset):
    data = build_data(DataConfig(dataset=dataset, batch_size=32, eval_batch_size=64, synthetic_samples=96))
    assert data.num_classes == 10 and data.image_size == 32
    x, y = next(iter(data.train))
    assert x.shape == (32, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and int(y.max()) < 10
    n_train, n_val = data.train.num_samples, data.val.num_samples
    assert n_val == round((n_train + n_val) * 0.1) and data.test.num_samples > 0
    assert sum(len(y) for _, y in data.test) == data.test.num_samples
    half = build_data(DataConfig(dataset=dataset, synthetic_samples=96, val_fraction=0, dtype="float16"), rank=1,
                      world_size=2)
    assert half.val is None and next(iter(half.train))[0].dtype == torch.float16


def test_missing_cifar_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"cifar10 not found: neither {tmp_path}/none/cifar-10-batches-py/"):
        cifar_arrays("cifar10", str(tmp_path / "none"), download=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_data(DataConfig(dataset="mnist"))


def test_a_holdout_that_leaves_no_training_images_is_an_error():
    from ahbf.pipelines import DataConfig, build_data

    with pytest.raises(ValueError, match="leaves no training images"):
        build_data(DataConfig(dataset="synthetic", synthetic_samples=20, val_fraction=1.0))
