"""Train / val loaders over FFCV betons (default) or torchvision ImageFolders, behind one interface.

    train, val = create_loaders(DataConfig("train.beton", "val.beton", batch_size=256, img_size=176,
                                           res_schedule=[160, 192, 85, 95], rand_augment="rand-m9-mstd0.5-inc1",
                                           re_prob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1),
                                num_classes=1000)
    for epoch in range(start_epoch, epochs):
        train.set_epoch(epoch, skip=batches_done if epoch == start_epoch else 0)
        for images, targets in train: ...

FFCV pipeline order matters: [decoder, flip, NormalizeImage, ToTensor, ToTorchImage] (or without NormalizeImage when
RandAugment needs uint8 images) is used; DESIGN.md: some orders hang the Loader at init. The augmentations FFCV lacks
run on the batch afterwards (augment.py).
"""
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from .augment import BatchAugment, Targets
from .config import DataConfig
from .write import META_FORMAT, file_sha256, meta_path

VERIFY_MAX_BYTES = 4 << 30  # betons up to 4 GiB are sha256-checked at load (a few s); bigger ones by size + structure


def resolution(epoch: int, start_res: int, end_res: int, start_ramp: int, end_ramp: int) -> int:
    """ffcv-imagenet's progressive resizing: start_res until start_ramp, linear to end_res at end_ramp, rounded to a
    multiple of 32 (of 4 when either end is not a multiple of 32, e.g. 28 px images)."""
    if start_ramp > end_ramp:
        raise ValueError(f"res_schedule ramp starts at epoch {start_ramp}, after it ends ({end_ramp})")
    if epoch <= start_ramp:
        return start_res
    if epoch >= end_ramp:
        return end_res
    step = 32 if start_res % 32 == 0 and end_res % 32 == 0 else 4
    return int(round(np.interp(epoch, [start_ramp, end_ramp], [start_res, end_res]) / step)) * step


def _rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not dist.is_initialized():
        raise RuntimeError("distributed=True needs torch.distributed initialised first (deepspeed.init_distributed)")
    return dist.get_rank(), dist.get_world_size()


def check_beton(path: str | os.PathLike, num_classes: int, checksum: bool | None = None) -> dict:
    """Meta of the beton at `path` after checking it is complete, intact and has `num_classes` classes.

    checksum: compare the sha256 recorded by the writer (None: only for files up to VERIFY_MAX_BYTES).
    """
    from ffcv.reader import Reader
    path, mpath = Path(path), meta_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"beton {path} does not exist")
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath} is missing: {path} was not written by timm_optdnn.data.write or the write "
                                f"did not finish; re-create it with `python -m timm_optdnn.data.write`")
    meta = json.loads(mpath.read_text())
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{mpath} is not a {META_FORMAT} meta file")
    size = path.stat().st_size
    if size != meta["size_bytes"]:
        raise ValueError(f"beton {path} is {size} bytes but its meta says {meta['size_bytes']}: truncated or replaced")
    if meta["num_classes"] != num_classes:
        raise ValueError(f"beton {path} has {meta['num_classes']} classes ({meta['source']}), "
                         f"but num_classes={num_classes} was requested")
    if (checksum is None and size <= VERIFY_MAX_BYTES) or checksum:
        if file_sha256(path) != meta["sha256"]:
            raise ValueError(f"beton {path} is corrupt: its sha256 differs from the one recorded in {mpath}")
    try:
        reader = Reader(str(path))
        ok = (reader.num_samples == meta["num_samples"] and set(reader.field_names) == {"image", "label"}
              and reader.header["alloc_table_ptr"] <= size and len(reader.alloc_table) >= reader.num_samples
              and (reader.alloc_table["ptr"] + reader.alloc_table["size"] <= size).all())
    except Exception as e:  # noqa: BLE001  ffcv raises assorted errors on garbage headers
        raise ValueError(f"beton {path} is corrupt: FFCV cannot read its header ({e})") from e
    if not ok:
        raise ValueError(f"beton {path} is corrupt: its header, fields or allocation table do not match its meta")
    return meta


def _batches(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


class _Loader:
    """The shared part of both backends: epoch, resolution schedule, device placement, targets."""

    def __init__(self, batches: int, img_size: int, res_schedule, targets: Targets | None):
        self.batches, self.img_size, self.res_schedule, self.targets = batches, img_size, res_schedule, targets
        self.soft_targets = bool(targets and targets.soft)
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return self.batches

    def resolution(self, epoch: int) -> int:
        return resolution(epoch, *self.res_schedule) if self.res_schedule else self.img_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Fix the order (from seed + epoch) and resolution of the next pass; `skip` drops its first batches
        without reading them (resume mid-epoch: the remaining batches are exactly those of the full epoch)."""
        if not 0 <= skip <= self.batches:
            raise ValueError(f"skip={skip} outside 0..{self.batches} batches per epoch")
        self.epoch, self.skip = epoch, skip


def _repeat_sampler(dataset, repeats: int, rank: int, world: int, order: str):
    """timm's RepeatAugSampler (DeiT's repeated augmentation, timm's --aug-repeats), or None for repeats=0.

    Each epoch takes a permutation, repeats every sample `repeats` times in a row and deals the copies round-robin
    to the ranks, then cuts every rank's share to N / world (N = len(dataset), first rounded down to a multiple of
    256 when it is >= 256): an epoch has the dataset's length, made of ~1/repeats of the samples, each seen
    `repeats` times with different augmentations, mostly on different ranks. Its generator is seeded with the epoch
    alone; the loaders pass seed + epoch (as torch's DistributedSampler seeds its own), so the recipe's seed counts
    and a resumed epoch has the same order.
    """
    if not repeats:
        return None
    from timm.data.distributed_sampler import RepeatAugSampler
    return RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=order != "sequential",
                            num_repeats=repeats)


class FFCVTrainLoader(_Loader):
    def __init__(self, path, *, batch_size, num_workers, img_size, res_schedule, scale, ratio, hflip, order,
                 distributed, seed, os_cache, drop_last, fast_decode, repeated_aug, augment: BatchAugment,
                 targets: Targets):
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor

        from .decoders import FastRandomResizedCropRGBImageDecoder
        orders = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
                  "sequential": OrderOption.SEQUENTIAL}
        if order not in orders:
            raise ValueError(f"order must be one of {sorted(orders)}, got {order!r}")
        if order == "quasi_random" and (distributed or os_cache):
            raise ValueError("FFCV's quasi_random order needs os_cache=False and distributed=False; use order='random'")
        rank, world = _rank_world(distributed)  # FFCV's sampler would fail with a less helpful message
        if fast_decode:  # crops and flips seeded per sample: a resumed run sees the same images
            self.decoder = FastRandomResizedCropRGBImageDecoder((img_size, img_size), scale, ratio, hflip, seed, rank)
            flip = []
        else:  # stock FFCV, for comparison: crops and flips from numba's unseeded per-thread RNG
            self.decoder = RandomResizedCropRGBImageDecoder((img_size, img_size), scale=scale, ratio=ratio)
            flip = [RandomHorizontalFlip(hflip)] if hflip > 0 else []
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                             order=orders[order], distributed=distributed, seed=seed, drop_last=drop_last,
                             pipelines={"image": [self.decoder, *flip, *augment.ffcv_ops()],
                                        "label": [IntDecoder(), ToTensor(), Squeeze()]})
        self.repeat = _repeat_sampler(range(len(self.loader.indices)), repeated_aug, rank, world, order)
        batches = len(self.loader) if self.repeat is None else _batches(len(self.repeat), batch_size, drop_last)
        super().__init__(batches, img_size, res_schedule, targets)
        self.augment, self.batch_size, self.compiled_res, self.seed = augment, batch_size, None, seed

    def __iter__(self):
        # ffcv's Loader.__iter__, with our epoch and skip instead of its own epoch counter
        from ffcv.loader.epoch_iterator import EpochIterator
        from ffcv.pipeline.compiler import Compiler
        Compiler.set_num_threads(self.loader.num_workers)
        res = self.resolution(self.epoch)
        self.decoder.output_size = (res, res)
        if hasattr(self.decoder, "epoch"):  # ours: crops and flips are a function of (seed, epoch, sample)
            self.decoder.epoch[0] = self.epoch
        if self.repeat is not None:
            self.repeat.set_epoch(self.seed + self.epoch)  # see _repeat_sampler
            order = self.loader.indices[list(self.repeat)]
        else:
            order = self.loader.traversal_order.sample_order(self.epoch)
        order = order[: self.batches * self.batch_size]
        if res != self.compiled_res:  # a new output size needs new code and buffers (a few s of numba compile)
            self.loader.generate_code()
            self.compiled_res = res
        batches = EpochIterator(self.loader, order[self.skip * self.batch_size:])
        try:
            for images, labels in batches:
                yield self.targets(self.augment(images), labels.to(self.augment.device, non_blocking=True).long().view(-1))
        finally:  # a trainer that stops mid-epoch must not leave FFCV's prefetch thread running
            batches.close()


class FFCVValLoader:
    """Sequential, unpadded: rank r reads samples r, r+world, ... so every sample is counted exactly once."""

    def __init__(self, path, *, batch_size, num_workers, img_size, crop_pct, distributed, os_cache, fast_decode,
                 mean, std, device, channels_last, num_samples):
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor

        from .decoders import FastCenterCropRGBImageDecoder
        rank, world = _rank_world(distributed)
        self.norm = BatchAugment(None, 0.0, mean, std, device, channels_last, fast=fast_decode)
        decoder = FastCenterCropRGBImageDecoder if fast_decode else CenterCropRGBImageDecoder
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                             order=OrderOption.SEQUENTIAL, indices=np.arange(rank, num_samples, world), drop_last=False,
                             pipelines={"image": [decoder((img_size, img_size), ratio=crop_pct), *self.norm.ffcv_ops()],
                                        "label": [IntDecoder(), ToTensor(), Squeeze()]})

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield self.norm(images), labels.to(self.norm.device, non_blocking=True).long().view(-1)


class TorchvisionTrainLoader(_Loader):
    """ImageFolder + timm create_transform (RandAugment and RandomErasing per sample in the workers)."""

    def __init__(self, root, *, batch_size, num_workers, img_size, res_schedule, distributed, seed, drop_last,
                 repeated_aug, device, channels_last, targets: Targets, transform_kwargs: dict):
        from torch.utils.data import DistributedSampler
        from torchvision.datasets import ImageFolder
        from .sources import load_rgb
        self.dataset = ImageFolder(root, loader=load_rgb)
        rank, world = _rank_world(distributed)
        repeat = _repeat_sampler(self.dataset, repeated_aug, rank, world, "random")
        self.seed_offset = 0 if repeat is None else seed  # see _repeat_sampler
        self.sampler = repeat if repeat is not None else \
            DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        super().__init__(_batches(len(self.sampler), batch_size, drop_last), img_size, res_schedule, targets)
        self.batch_size, self.num_workers, self.device, self.channels_last = batch_size, num_workers, device, channels_last
        self.transform_kwargs, self.loader_res = transform_kwargs, None
        self.order: list[int] = []  # the sampler the DataLoader reads, refilled in place each epoch (main process)

    def __iter__(self):
        from torch.utils.data import DataLoader
        res = self.resolution(self.epoch)
        if res != self.loader_res:  # workers hold a copy of the transform: a new resolution needs new workers
            self.dataset.transform = create_transform(res, is_training=True, **self.transform_kwargs)
            self.loader = DataLoader(self.dataset, self.batch_size, sampler=self.order, num_workers=self.num_workers,
                                     pin_memory=self.device.startswith("cuda"), persistent_workers=self.num_workers > 0)
            self.loader_res = res
        self.sampler.set_epoch(self.seed_offset + self.epoch)
        self.order[:] = list(self.sampler)[self.skip * self.batch_size: self.batches * self.batch_size]
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
            yield self.targets(images, labels.to(self.device, non_blocking=True))


class TorchvisionValLoader:
    def __init__(self, root, *, batch_size, num_workers, img_size, crop_pct, distributed, mean, std, device,
                 channels_last):
        from torch.utils.data import DataLoader, Subset
        from torchvision.datasets import ImageFolder
        from .sources import load_rgb
        rank, world = _rank_world(distributed)
        dataset = ImageFolder(root, loader=load_rgb, transform=create_transform(
            img_size, is_training=False, crop_pct=crop_pct, mean=mean, std=std))
        self.classes = dataset.classes
        self.loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size,
                                 num_workers=num_workers, pin_memory=device.startswith("cuda"))
        self.device, self.memory_format = device, torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format), \
                labels.to(self.device, non_blocking=True)


def create_loaders(cfg: DataConfig, *, num_classes: int, distributed: bool = False, seed: int = 0,
                   device: str | torch.device = "cpu"):
    """(train loader, val loader) for the data section `cfg`. Train yields normalised float images on `device` and
    int64 labels, or soft [B, num_classes] targets when mixup / cutmix / label_smoothing > 0 (`train.soft_targets`).
    Val yields (images, int64 labels), each val sample on exactly one rank. backend 'ffcv': the paths are betons;
    'torchvision': ImageFolder roots. fast_decode: our decoders (timm_optdnn.data.decoders): JPEGs decoded at 1/2..1/8
    scale when the crop is at least that much larger than the output, bilinear train resize, crops and flips seeded
    per sample (exact resume); False: stock FFCV's. repeated_aug: DeiT's repeated augmentation (timm's
    RepeatAugSampler, --aug-repeats), each train sample `repeated_aug` times per epoch spread over the ranks, epoch
    length kept; 0 = off."""
    backend, batch_size, num_workers, repeated_aug = cfg.backend, cfg.batch_size, cfg.num_workers, cfg.repeated_aug
    mixup, cutmix, crop_pct, res_schedule = cfg.mixup, cfg.cutmix, cfg.crop_pct, cfg.res_schedule
    train_path, val_path, img_size, device = cfg.train_path, cfg.val_path, cfg.img_size, str(device)
    mean, std = tuple(cfg.mean or IMAGENET_DEFAULT_MEAN), tuple(cfg.std or IMAGENET_DEFAULT_STD)
    scale, ratio, hflip, order, os_cache = tuple(cfg.scale), tuple(cfg.ratio), cfg.hflip, cfg.order, cfg.os_cache
    drop_last, fast_decode, channels_last, rand_augment = cfg.drop_last, cfg.fast_decode, cfg.channels_last, cfg.rand_augment
    re_prob = cfg.re_prob
    if backend not in ("ffcv", "torchvision"):
        raise ValueError(f"backend must be 'ffcv' or 'torchvision', got {backend!r}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    if repeated_aug < 0:
        raise ValueError(f"repeated_aug must be >= 0 (0 = off), got {repeated_aug}")
    if (mixup > 0 or cutmix > 0) and batch_size % 2:
        raise ValueError(f"timm Mixup/CutMix needs an even batch_size, got {batch_size}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if res_schedule is not None and len(res_schedule) != 4:
        raise ValueError(f"res_schedule is (start_res, end_res, start_ramp, end_ramp), got {res_schedule}")
    val_batch_size, val_img_size = cfg.val_batch_size or batch_size, cfg.val_img_size or img_size
    targets = Targets(num_classes, mixup, cutmix, cfg.label_smoothing)
    if backend == "torchvision":
        train = TorchvisionTrainLoader(
            train_path, batch_size=batch_size, num_workers=num_workers, img_size=img_size, res_schedule=res_schedule,
            distributed=distributed, seed=seed, drop_last=drop_last, repeated_aug=repeated_aug, device=device,
            channels_last=channels_last, targets=targets,
            transform_kwargs=dict(scale=scale, ratio=ratio, hflip=hflip, auto_augment=rand_augment, re_prob=re_prob,
                                  re_mode="pixel", mean=mean, std=std, interpolation="bilinear"))
        val = TorchvisionValLoader(val_path, batch_size=val_batch_size, num_workers=num_workers, img_size=val_img_size,
                                   crop_pct=crop_pct, distributed=distributed, mean=mean, std=std, device=device,
                                   channels_last=channels_last)
        if len(train.dataset.classes) != num_classes or train.dataset.classes != val.classes:
            raise ValueError(f"{train_path} has {len(train.dataset.classes)} classes and {val_path} "
                             f"{len(val.classes)}, num_classes={num_classes}: they must all agree")
        return train, val
    train_meta, val_meta = check_beton(train_path, num_classes), check_beton(val_path, num_classes)
    if train_meta["classes"] != val_meta["classes"]:
        raise ValueError(f"{train_path} and {val_path} have different class lists: not the same dataset")
    augment = BatchAugment(rand_augment, re_prob, mean, std, device, channels_last, threads=max(1, num_workers),
                           fast=fast_decode)
    train = FFCVTrainLoader(train_path, batch_size=batch_size, num_workers=num_workers, img_size=img_size,
                            res_schedule=res_schedule, scale=scale, ratio=ratio, hflip=hflip, order=order,
                            distributed=distributed, seed=seed, os_cache=os_cache, drop_last=drop_last,
                            fast_decode=fast_decode, repeated_aug=repeated_aug, augment=augment, targets=targets)
    val = FFCVValLoader(val_path, batch_size=val_batch_size, num_workers=num_workers, img_size=val_img_size,
                        crop_pct=crop_pct, distributed=distributed, os_cache=os_cache, fast_decode=fast_decode,
                        mean=mean, std=std,
                        device=device, channels_last=channels_last, num_samples=val_meta["num_samples"])
    return train, val
