"""ImageNet-style folders through NVIDIA DALI: pure augmentation functions, one ``@pipeline_def`` builder,
and the PyTorch iterator wrapped to the ``Batches`` interface.

The decoder runs on the GPU ("mixed": nvJPEG / hardware decoder) when the target device is CUDA and on
the CPU (libjpeg-turbo, ``device_id=None``) otherwise; ``decoder_placement`` is the one place that decides.

Epochs: the reader does not shuffle by itself. Every epoch the wrapper builds a fresh pipeline whose file
list is the epoch's order (``DistributedSampler``'s permutation for (seed, epoch), padded, laid out so that
shard r = the reader's ``shard_id`` r holds exactly rank r's samples) and whose seed is derived from
(seed, epoch, rank). So ``set_epoch(e)`` fixes the epoch's order and augmentation, a resumed run replays it,
and all shards together read every image once per epoch (plus at most world_size - 1 repeats).
"""
from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import Tensor

from .scan import BadImageError, ImageSet, epoch_indices, find_bad_image, mix_seed

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as _err:  # the torchvision fallback does not need DALI
    DALI_IMPORT_ERROR: ImportError | None = _err
else:
    DALI_IMPORT_ERROR = None

# nvJPEG buffer sizes from NVIDIA's DALI ResNet-50 example: avoid reallocations on ImageNet-sized images
_MIXED_DECODER_ARGS = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512,
                           preallocate_width_hint=5980, preallocate_height_hint=6430)


def dali_available() -> bool:
    return DALI_IMPORT_ERROR is None


def decoder_placement(device: torch.device | str) -> tuple[str, int | None]:
    """(decoder device, pipeline device_id): ("mixed", gpu index) on CUDA, ("cpu", None) otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return "mixed", device.index if device.index is not None else torch.cuda.current_device()
    return "cpu", None


def _normalize(images, mean, std, mirror, crop=None):
    """uint8 HWC -> normalised float HWC, ``(x - 255 mean) / (255 std)``, mirrored where ``mirror``."""
    kwargs = {} if crop is None else dict(crop=crop)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC", mirror=mirror,
                                    mean=[m * 255 for m in mean], std=[s * 255 for s in std], **kwargs)


def train_augment(jpegs, *, decoder: str, size: int, mean, std, augment: bool = True):
    """Random-resized crop (scale 0.08-1, ratio 3/4-4/3, as torchvision) decoded straight from the crop
    window, resize to ``size`` x ``size`` (linear, antialiased), random horizontal flip, normalise."""
    extra = _MIXED_DECODER_ARGS if decoder == "mixed" else {}
    if not augment:
        return eval_augment(jpegs, decoder=decoder, size=size, resize=size, mean=mean, std=std)
    images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB, random_area=[0.08, 1.0],
                                           random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **extra)
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
    return _normalize(images, mean, std, mirror=fn.random.coin_flip(probability=0.5))


def eval_augment(jpegs, *, decoder: str, size: int, resize: int, mean, std):
    """Resize the shorter side to ``resize`` (linear, antialiased), centre crop ``size`` x ``size``, normalise."""
    extra = _MIXED_DECODER_ARGS if decoder == "mixed" else {}
    images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **extra)
    images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True)
    return _normalize(images, mean, std, mirror=0, crop=(size, size))


if DALI_IMPORT_ERROR is None:
    @pipeline_def(enable_conditionals=False)
    def folder_pipeline(files: list[str], labels: list[int], *, shard_id: int, num_shards: int, train: bool,
                        decoder: str, size: int, resize: int, mean, std, augment: bool = True):
        """Reads ``files`` in the given order (shard ``shard_id`` of ``num_shards``) and augments them."""
        jpegs, y = fn.readers.file(files=files, labels=labels, random_shuffle=False, shard_id=shard_id,
                                   num_shards=num_shards, pad_last_batch=True, stick_to_shard=True, name="Reader")
        if train:
            images = train_augment(jpegs, decoder=decoder, size=size, mean=mean, std=std, augment=augment)
        else:
            images = eval_augment(jpegs, decoder=decoder, size=size, resize=resize, mean=mean, std=std)
        return images, (y.gpu() if decoder == "mixed" else y)


_DALI_FILE = re.compile(r"Failed to decode sample #\d+ : (.+?)\s*$", re.M)


class DaliFolderLoader:
    """``Batches`` over an ``ImageSet`` decoded by DALI.

    Train: one pipeline per epoch (see the module docstring); every rank yields ``len(self)`` batches.
    Eval: the files in order, rank r reading the r-th contiguous part (an exact partition: no repeats;
    ranks may differ by one sample), one pipeline reused across epochs.
    """

    def __init__(self, images: ImageSet, *, train: bool, batch_size: int, size: int, mean, std,
                 workers: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 augment: bool = True, resize: int | None = None, prefetch: int = 2):
        if DALI_IMPORT_ERROR is not None:
            raise ImportError(f"backend 'dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130): {DALI_IMPORT_ERROR}")
        self.images, self.train, self.batch_size, self.size = images, train, batch_size, size
        self.resize = resize or round(size / 0.875)  # 224 -> 256
        self.mean, self.std, self.augment = tuple(mean), tuple(std), augment
        self.workers, self.seed, self.rank, self.world_size = workers, seed, rank, world_size
        self.device, self.dtype, self.prefetch = torch.device(device), dtype, prefetch
        self.decoder, self.device_id = decoder_placement(self.device)
        self.epoch, self.start = 0, 0
        n = len(images.samples)
        if train:
            self.num_samples = -(-n // world_size)
        else:  # DALI's shard r is [floor(r n / W), floor((r + 1) n / W))
            self.num_samples = (rank + 1) * n // world_size - rank * n // world_size
        self._iterator = None  # eval: kept across epochs while it is at an epoch boundary

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start  # start > 0: a mid-epoch resume decodes and drops start batches

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def epoch_files(self) -> tuple[list[str], list[int], list[str]]:
        """(the reader's file list, its labels, this rank's files in reading order) for the current epoch."""
        paths, labels = self.images.paths, self.images.labels
        if not self.train:
            lo, hi = self.rank * len(paths) // self.world_size, (self.rank + 1) * len(paths) // self.world_size
            return paths, labels, paths[lo:hi]
        order = []
        for r in range(self.world_size):  # shard r (contiguous) = rank r's DistributedSampler indices
            order += epoch_indices(len(paths), seed=self.seed, epoch=self.epoch, rank=r, world_size=self.world_size)
        mine = order[self.rank * self.num_samples:(self.rank + 1) * self.num_samples]
        return [paths[i] for i in order], [labels[i] for i in order], [paths[i] for i in mine]

    def _build(self, files: list[str], labels: list[int]):
        pipe = folder_pipeline(files, labels, shard_id=self.rank, num_shards=self.world_size, train=self.train,
                               decoder=self.decoder, size=self.size, resize=self.resize, mean=self.mean,
                               std=self.std, augment=self.augment, batch_size=self.batch_size,
                               num_threads=max(1, self.workers), device_id=self.device_id,
                               seed=mix_seed(self.seed, self.epoch, self.rank), prefetch_queue_depth=self.prefetch)
        pipe.build()
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)

    def _to_batch(self, out: dict) -> tuple[Tensor, Tensor]:
        x, y = out["images"], out["labels"]
        x = x.to(self.device, self.dtype, non_blocking=True)  # no-op when DALI already produced it there
        y = y.reshape(-1).to(self.device, torch.int64, non_blocking=True)
        return x.permute(0, 3, 1, 2), y  # NHWC -> an NCHW view with channels-last strides, no copy

    def _bad_file_error(self, err: RuntimeError, mine: list[str], consumed: int) -> Exception:
        """Turns DALI's multi-line pipeline error into a one-line ``BadImageError`` naming the file."""
        found = _DALI_FILE.search(str(err))
        if found:
            bad = find_bad_image([found.group(1)]) or (found.group(1), "DALI could not decode it")
        else:  # the failing batch is the next one or one of the prefetched ones: decode those with Pillow
            bad = find_bad_image(mine[consumed:consumed + (self.prefetch + 2) * self.batch_size])
        if bad is None:
            return err
        return BadImageError(bad[0], bad[1] + " (use skip_bad_images with check_images=full to skip such files)")

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        files, labels, mine = self.epoch_files()
        consumed, finished = 0, False
        try:
            if self.train or self._iterator is None:
                self._iterator = None  # release the previous pipeline before building the next one
                self._iterator = self._build(files, labels)
            while True:
                try:
                    out = next(self._iterator)[0]
                except StopIteration:
                    finished = True
                    return
                x, y = self._to_batch(out)
                consumed += len(y)
                if self.train and consumed <= self.start * self.batch_size:  # trained before the resume
                    continue
                if len(y):  # an eval shard shorter than its neighbours can end with an empty batch
                    yield x, y
        except RuntimeError as err:
            bad = self._bad_file_error(err, mine, consumed)
            if bad is err:
                raise
            raise bad from None
        finally:
            if not finished or self.train:  # a pipeline stopped mid-epoch (or after an error) is not reusable
                self._iterator = None
