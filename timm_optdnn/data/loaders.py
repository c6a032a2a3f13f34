"""Train / val loaders over FFCV betons (default) or torchvision ImageFolders, behind one interface.

    train, val = create_loaders(DataConfig("train.beton", "val.beton", batch_size=256, img_size=176,
                                           res_schedule=[160, 192, 85, 95], rand_augment="rand-m9-mstd0.5-inc1",
                                           re_prob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1),
                                num_classes=1000, device="cuda")
    for epoch in range(start_epoch, epochs):
        train.set_epoch(epoch, skip=batches_done if epoch == start_epoch else 0)
        for images, targets in train: ...

The FFCV backend (`ffcv_loaders`) runs every augmentation in FFCV's worker threads and, for a CUDA device, copies
from pinned memory with FFCV's ToDevice; the torchvision backend runs timm's transforms in DataLoader workers.
"""
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.datasets import ImageFolder

from .augment import Targets, timm_train_transform
from .beton import check_beton, warn_if_oversized
from .config import DataConfig
from .process import kept_threads
from .sources import check_classes, check_images, load_rgb, scan_image_folder, split_decodable


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


def rank_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not dist.is_initialized():
        raise RuntimeError("distributed=True needs torch.distributed initialised first (deepspeed.init_distributed)")
    return dist.get_rank(), dist.get_world_size()


def mean_std(cfg: DataConfig) -> tuple[tuple, tuple]:
    return tuple(cfg.mean or IMAGENET_DEFAULT_MEAN), tuple(cfg.std or IMAGENET_DEFAULT_STD)


def batches(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


def soft_targets(cfg: DataConfig) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0 or cfg.label_smoothing > 0


class EpochLoader:
    """The shared part of both backends' train loaders: epoch, resume skip, resolution schedule."""

    def __init__(self, cfg: DataConfig, num_batches: int):
        self.batches, self.img_size, self.res_schedule = num_batches, cfg.img_size, cfg.res_schedule
        self.soft_targets = soft_targets(cfg)
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


def repeat_sampler(dataset, repeats: int, rank: int, world: int, order: str):
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


class CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder over the samples the beton writer would store: `scan_image_folder`'s listing
    (symlinks followed, hidden files ignored), undecodable files skipped (every file decoded once, as the writer
    does, the ranks sharing the work) and listed in `skipped`, an error if a class is left without images."""

    def __init__(self, root: str, workers: int, distributed: bool):
        self.workers, self.distributed = workers, distributed
        super().__init__(root, loader=load_rgb)

    def find_classes(self, directory):
        self.scan = scan_image_folder(directory)
        return self.scan[1], {c: i for i, c in enumerate(self.scan[1])}

    def make_dataset(self, directory, class_to_idx, *args, **kwargs):
        samples, classes = self.scan
        rank, world = rank_world(self.distributed)
        checks = check_images([p for p, _ in samples[rank::world]], self.workers)
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, checks)
            checks = [shares[i % world][i // world] for i in range(len(samples))]
        good, self.skipped = split_decodable(samples, checks)
        check_classes(good, classes, directory)
        return good


class TorchvisionTrainLoader(EpochLoader):
    """ImageFolder + timm create_transform (RandAugment and RandomErasing per sample in the workers), timm Mixup /
    CutMix / smoothing on the device batch."""

    def __init__(self, cfg: DataConfig, *, num_classes: int, distributed: bool, seed: int, device: str):
        self.dataset = CheckedImageFolder(cfg.train_path, max(1, cfg.num_workers), distributed)
        rank, world = rank_world(distributed)
        repeat = repeat_sampler(self.dataset, cfg.repeated_aug, rank, world, "random")
        self.seed_offset = 0 if repeat is None else seed  # see repeat_sampler
        from torch.utils.data import DistributedSampler
        self.sampler = repeat if repeat is not None else \
            DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        super().__init__(cfg, batches(len(self.sampler), cfg.batch_size, cfg.drop_last))
        mean, std = mean_std(cfg)
        self.cfg, self.device, self.loader_res = cfg, device, None
        self.targets = Targets(num_classes, cfg.mixup, cfg.cutmix, cfg.label_smoothing)
        self.transform_kwargs = dict(scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
                                     auto_augment=cfg.rand_augment, re_prob=cfg.re_prob, re_mode="pixel",
                                     mean=mean, std=std, interpolation="bilinear")
        self.order: list[int] = []  # the sampler the DataLoader reads, refilled in place each epoch (main process)

    def __iter__(self):
        from torch.utils.data import DataLoader
        res, cfg = self.resolution(self.epoch), self.cfg
        if res != self.loader_res:  # workers hold a copy of the transform: a new resolution needs new workers
            self.dataset.transform = timm_train_transform(res, **self.transform_kwargs)
            self.loader = DataLoader(self.dataset, cfg.batch_size, sampler=self.order, num_workers=cfg.num_workers,
                                     pin_memory=self.device.startswith("cuda"), persistent_workers=cfg.num_workers > 0)
            self.loader_res = res
        self.sampler.set_epoch(self.seed_offset + self.epoch)
        self.order[:] = list(self.sampler)[self.skip * cfg.batch_size: self.batches * cfg.batch_size]
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
            yield self.targets(images, labels.to(self.device, non_blocking=True))


class TorchvisionValLoader:
    def __init__(self, cfg: DataConfig, *, distributed: bool, device: str):
        from torch.utils.data import DataLoader, Subset
        rank, world = rank_world(distributed)
        mean, std = mean_std(cfg)
        dataset = CheckedImageFolder(cfg.val_path, max(1, cfg.num_workers), distributed)
        dataset.transform = create_transform(cfg.val_img_size or cfg.img_size, is_training=False,
                                             crop_pct=cfg.crop_pct, mean=mean, std=std)
        self.classes = dataset.classes
        self.loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)),
                                 cfg.val_batch_size or cfg.batch_size, num_workers=cfg.num_workers,
                                 pin_memory=device.startswith("cuda"))
        self.device = device
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format), \
                labels.to(self.device, non_blocking=True)


def _check(cfg: DataConfig) -> None:
    if cfg.backend not in ("ffcv", "torchvision"):
        raise ValueError(f"backend must be 'ffcv' or 'torchvision', got {cfg.backend!r}")
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {cfg.batch_size} and {cfg.num_workers}")
    if cfg.repeated_aug < 0:
        raise ValueError(f"repeated_aug must be >= 0 (0 = off), got {cfg.repeated_aug}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ValueError(f"timm Mixup/CutMix needs an even batch_size, got {cfg.batch_size}")
    if not 0 < cfg.crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {cfg.crop_pct}")
    if cfg.res_schedule is not None and len(cfg.res_schedule) != 4:
        raise ValueError(f"res_schedule is (start_res, end_res, start_ramp, end_ramp), got {cfg.res_schedule}")


def create_loaders(cfg: DataConfig, *, num_classes: int, distributed: bool = False, seed: int = 0,
                   device: str | torch.device = "cpu"):
    """(train loader, val loader) for the data section `cfg`. Train yields normalised float images on `device` and
    int64 labels, or soft [B, num_classes] targets when mixup / cutmix / label_smoothing > 0 (`train.soft_targets`).
    Val yields (images, int64 labels), each val sample on exactly one rank. backend 'ffcv': the paths are betons;
    'torchvision': ImageFolder roots. Nothing process-wide is changed (see `setup_process` for what is tuned)."""
    _check(cfg)
    device = str(device)
    if cfg.backend == "torchvision":
        train = TorchvisionTrainLoader(cfg, num_classes=num_classes, distributed=distributed, seed=seed, device=device)
        val = TorchvisionValLoader(cfg, distributed=distributed, device=device)
        if len(train.dataset.classes) != num_classes or train.dataset.classes != val.classes:
            raise ValueError(f"{cfg.train_path} has {len(train.dataset.classes)} classes and {cfg.val_path} "
                             f"{len(val.classes)}, num_classes={num_classes}: they must all agree")
        return train, val
    train_meta, val_meta = check_beton(cfg.train_path, num_classes), check_beton(cfg.val_path, num_classes)
    if train_meta["classes"] != val_meta["classes"]:
        raise ValueError(f"{cfg.train_path} and {cfg.val_path} have different class lists: not the same dataset")
    largest_use = max(cfg.img_size, *(cfg.res_schedule or [0])[:2],
                      math.ceil((cfg.val_img_size or cfg.img_size) / cfg.crop_pct))
    for path in dict.fromkeys(map(os.fspath, (cfg.train_path, cfg.val_path))):
        warn_if_oversized(Path(path), largest_use)
    with kept_threads():
        from .ffcv_loaders import FFCVTrainLoader, FFCVValLoader
        train = FFCVTrainLoader(cfg, num_classes=num_classes, distributed=distributed, seed=seed, device=device)
        val = FFCVValLoader(cfg, num_samples=val_meta["num_samples"], distributed=distributed, device=device)
    return train, val
