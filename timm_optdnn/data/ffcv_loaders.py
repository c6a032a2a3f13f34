"""The FFCV backend's train and val loaders. Pipelines (FFCV: some other orders hang the Loader at init):

    image: decoder (crop, flip) -> [RandAugment] -> NormalizeToFloat (+ RandomErasing, Mixup / CutMix) -> ToTensor
           -> [ToDevice]
    label: IntDecoder -> [SoftTargets] -> ToTensor -> [Squeeze] -> [ToDevice]

Everything runs in FFCV's pipeline thread and its numba worker threads; the training process's main thread takes
finished batches (a permute for channels_last is a view). For a CUDA device, the float batch and the labels are
written into FFCV's buffers, which FFCV pins where CUDA is present, and FFCV's ToDevice copies them with
non_blocking=True on FFCV's own CUDA stream; FFCV makes the consumer's stream wait for that copy, and reuses a
buffer only once the consumer's work on it is done. Batches then live in FFCV's ring of device buffers: use one
before taking the next few. For the CPU, each batch is new memory, yours to keep.
"""
from queue import Full

import numpy as np
import torch
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor

from .config import DataConfig
from .decoders import FastCenterCropRGBImageDecoder, FastRandomResizedCropRGBImageDecoder
from .loaders import EpochLoader, batches, mean_std, rank_world, repeat_sampler, soft_targets
from .process import kept_threads
from .rng import Stream
from .stages import NormalizeToFloat, RandAugment, SoftTargets

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM, "sequential": OrderOption.SEQUENTIAL}


class _Epoch(EpochIterator):
    """FFCV's epoch (its pipeline thread), except that an error there reaches the consumer: FFCV's thread dies
    silently and the consumer would wait forever for the next batch. Also puts back the torch thread count FFCV's
    thread sets, which threads started later would inherit."""

    def __init__(self, loader: Loader, order):
        self.failure, self.samples, self.torch_threads = None, None, torch.get_num_threads()
        super().__init__(loader, order)  # starts the thread

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        if self.samples is None:  # FFCV's run() has just set it
            torch.set_num_threads(self.torch_threads)
        self.samples = batch_indices
        return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001  handed to the consumer, see read_epoch()
            self.failure = e
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(None, timeout=0.5)  # FFCV's end-of-epoch marker
                    return
                except Full:
                    pass


def read_epoch(loader: Loader, order, what: str):
    """The batches of `order`; an error in FFCV's pipeline is raised here, naming the samples it was reading."""
    it = _Epoch(loader, order)
    try:
        yield from it
        if it.failure is not None:
            where = f"samples {list(map(int, it.samples[:8]))}{' ...' if len(it.samples) > 8 else ''}" \
                if it.samples is not None else "its first batch"
            raise RuntimeError(f"the FFCV pipeline reading {what} failed on {where}: "
                               f"{type(it.failure).__name__}: {it.failure}") from it.failure
    finally:  # a consumer that stops mid-epoch must not leave FFCV's pipeline thread running
        it.close()


def to_device(device: str) -> list:
    """The pipelines' last stage: FFCV's copy to a CUDA device (none for the CPU). With it, the stages before
    write into FFCV's buffers, the copy's pinned source."""
    return [ToDevice(torch.device(device), non_blocking=True)] if device.startswith("cuda") else []


def _hand_over(images: torch.Tensor, targets: torch.Tensor, channels_last: bool, on_device: bool):
    """The batch as the model takes it: NHWC viewed as channels_last NCHW; on the CPU, hard labels copied out of
    FFCV's buffer (B int64) so that, like the images, they stay valid as long as they are kept."""
    images = images.permute(0, 3, 1, 2) if channels_last else images
    return images, targets if on_device or targets.is_floating_point() else targets.clone()


class FFCVTrainLoader(EpochLoader):
    def __init__(self, cfg: DataConfig, *, num_classes: int, distributed: bool, seed: int, device: str):
        if cfg.order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}, got {cfg.order!r}")
        if cfg.order == "quasi_random" and (distributed or cfg.os_cache):
            raise ValueError("FFCV's quasi_random order needs os_cache=False and distributed=False; use order='random'")
        rank, world = rank_world(distributed)  # FFCV's sampler would fail with a less helpful message
        self.stream, size, mean, std = Stream(seed, rank), (cfg.img_size, cfg.img_size), *mean_std(cfg)
        if cfg.fast_decode:  # crops and flips seeded per sample: a resumed run sees the same images
            self.decoder = FastRandomResizedCropRGBImageDecoder(size, tuple(cfg.scale), tuple(cfg.ratio), cfg.hflip,
                                                                self.stream)
            flip = []
        else:  # stock FFCV, for comparison: crops and flips from numba's unseeded per-thread RNG
            self.decoder = RandomResizedCropRGBImageDecoder(size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio))
            flip = [RandomHorizontalFlip(cfg.hflip)] if cfg.hflip > 0 else []
        copy = to_device(device)
        pinned = bool(copy)
        image = [self.decoder, *flip, *([RandAugment(cfg.rand_augment, mean, self.stream)] if cfg.rand_augment else []),
                 NormalizeToFloat(mean, std, cfg.channels_last, pinned, cfg.re_prob, cfg.mixup, cfg.cutmix,
                                  self.stream), ToTensor(), *copy]
        if soft_targets(cfg):
            label = [IntDecoder(), SoftTargets(num_classes, cfg.label_smoothing, cfg.mixup, cfg.cutmix, self.stream,
                                               lambda: self.decoder.output_size, pinned), ToTensor(), *copy]
        else:
            label = [IntDecoder(), ToTensor(), Squeeze(1), *copy]
        self.loader = Loader(str(cfg.train_path), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                             os_cache=cfg.os_cache, order=ORDERS[cfg.order], distributed=distributed, seed=seed,
                             drop_last=cfg.drop_last, pipelines={"image": image, "label": label})
        self.repeat = repeat_sampler(range(len(self.loader.indices)), cfg.repeated_aug, rank, world, cfg.order)
        num_batches = len(self.loader) if self.repeat is None else batches(len(self.repeat), cfg.batch_size,
                                                                          cfg.drop_last)
        super().__init__(cfg, num_batches)
        self.cfg, self.seed, self.compiled_res, self.on_device = cfg, seed, cfg.img_size, pinned

    def __iter__(self):
        res, batch_size = self.resolution(self.epoch), self.cfg.batch_size
        self.stream.set_epoch(self.epoch)
        if self.repeat is not None:
            self.repeat.set_epoch(self.seed + self.epoch)  # see repeat_sampler
            order = self.loader.indices[list(self.repeat)]
        else:
            order = self.loader.traversal_order.sample_order(self.epoch)
        order = order[: self.batches * batch_size]
        if res != self.compiled_res:  # a new output size needs new code and buffers (a few s of numba compile)
            self.decoder.output_size = (res, res)
            with kept_threads():
                Compiler.set_num_threads(self.loader.num_workers)  # FFCV's code generation reads this global
                self.loader.generate_code()
            self.compiled_res = res
        for images, targets in read_epoch(self.loader, order[self.skip * batch_size:], self.cfg.train_path):
            yield _hand_over(images, targets, self.cfg.channels_last, self.on_device)


class FFCVValLoader:
    """Sequential, unpadded: rank r reads samples r, r+world, ... so every sample is counted exactly once."""

    def __init__(self, cfg: DataConfig, *, num_samples: int, distributed: bool, device: str):
        rank, world = rank_world(distributed)
        size = cfg.val_img_size or cfg.img_size
        decoder = (FastCenterCropRGBImageDecoder if cfg.fast_decode else CenterCropRGBImageDecoder)(
            (size, size), ratio=cfg.crop_pct)
        copy = to_device(device)
        self.loader = Loader(str(cfg.val_path), batch_size=cfg.val_batch_size or cfg.batch_size,
                             num_workers=cfg.num_workers, os_cache=cfg.os_cache, order=OrderOption.SEQUENTIAL,
                             indices=np.arange(rank, num_samples, world), drop_last=False,
                             pipelines={"image": [decoder, NormalizeToFloat(*mean_std(cfg), cfg.channels_last,
                                                                            bool(copy)), ToTensor(), *copy],
                                        "label": [IntDecoder(), ToTensor(), Squeeze(1), *copy]})
        self.cfg, self.on_device = cfg, bool(copy)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in read_epoch(self.loader, self.loader.traversal_order.sample_order(0), self.cfg.val_path):
            yield _hand_over(images, labels, self.cfg.channels_last, self.on_device)
