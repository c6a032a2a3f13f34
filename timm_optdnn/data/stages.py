"""The FFCV operations after the crop decoder, run in FFCV's worker threads: RandAugment on the uint8 batch, then
one pass to the model's float batch (normalisation, RandomErasing, Mixup / CutMix), and the soft targets. The
training process's main thread receives finished batches and only launches compute. The per-image work is in
`augment`; each stage seeds its draws per sample or per batch (`rng`)."""
from dataclasses import replace

import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from .augment import erase, fill_colour, mix_pair, mix_params, normalize, rand_augment, rand_augment_spec
from .rng import ERASE, RAND_AUGMENT, Stream, seed_sample

_F32 = np.float32


class RandAugment(Operation):
    """timm's RandAugment on the uint8 HxWx3 batch, per sample in FFCV's worker threads, seeded from `stream`."""

    def __init__(self, config_str: str, mean, stream: Stream):
        super().__init__()
        self.spec, self.fill, self.stream = rand_augment_spec(config_str), fill_colour(mean), stream

    def generate_code(self):
        my_range, stream, fill = Compiler.get_iterator(), self.stream.reader(), self.fill
        s = self.spec
        ops, weights, num_layers, prob = s["ops"], s["weights"], s["num_layers"], s["prob"]
        magnitude, magnitude_std, magnitude_max = s["magnitude"], s["magnitude_std"], s["magnitude_max"]

        def augment(images, spare, indices):
            now = stream()
            for i in my_range(images.shape[0]):
                seed_sample(now, indices, i, RAND_AUGMENT)
                if rand_augment(images[i], spare[i], ops, weights, num_layers, prob, magnitude, magnitude_std,
                                magnitude_max, fill):
                    images[i] = spare[i]
            return images

        augment.is_parallel = True
        augment.with_indices = True
        return augment

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        return previous_state, AllocationQuery(previous_state.shape, previous_state.dtype)


class NormalizeToFloat(Operation):
    """uint8 HxWx3 batch -> the model's float32 batch in one pass in FFCV's worker threads: normalised, then (train)
    timm's RandomErasing per sample and Mixup / CutMix across the batch, laid out as the model wants it: (B, H, W, 3),
    a channels_last NCHW tensor once permuted, or (B, 3, H, W).

    `pinned`: write into FFCV's buffers (pinned memory where CUDA is present) for FFCV's ToDevice to copy from,
    rewritten a few batches later; otherwise into a new batch per call, which stays valid as long as it is kept.
    """

    def __init__(self, mean, std, channels_last: bool, pinned: bool = False, re_prob: float = 0.0,
                 mixup: float = 0.0, cutmix: float = 0.0, stream: Stream | None = None):
        super().__init__()
        mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)  # timm's 0..1 convention
        self.scale, self.bias = (1.0 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)
        self.channels_last, self.pinned, self.re_prob, self.mixup, self.cutmix = \
            channels_last, pinned, re_prob, mixup, cutmix
        self.stream = stream or Stream()

    def generate_code(self):
        my_range, stream, channels_last = Compiler.get_iterator(), self.stream.reader(), self.channels_last
        scale, bias, re_prob, mixup, cutmix, pinned = \
            self.scale, self.bias, self.re_prob, self.mixup, self.cutmix, self.pinned

        def to_float(images, buffers, indices):
            n, h, w, _ = images.shape
            out = buffers[:n] if pinned else np.empty((n, h, w, 3) if channels_last else (n, 3, h, w), np.float32)
            now = stream()
            for i in my_range(n):
                normalize(images[i], out[i], scale, bias, channels_last)
                if re_prob > 0:
                    seed_sample(now, indices, i, ERASE)
                    if np.random.random() < re_prob:
                        erase(out[i], h, w, channels_last)
            if mixup > 0 or cutmix > 0:
                lam, cut, y0, y1, x0, x1 = mix_params(now, indices, mixup, cutmix, h, w)
                for i in my_range(n // 2):
                    mix_pair(out[i], out[n - 1 - i], lam, cut, y0, y1, x0, x1, channels_last)
            return out

        to_float.is_parallel = True
        to_float.with_indices = True
        return to_float

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        h, w, _ = previous_state.shape
        shape = (h, w, 3) if self.channels_last else (3, h, w)
        state = replace(previous_state, jit_mode=True, dtype=np.dtype(np.float32), shape=shape)
        # unpinned, the batch is allocated per call: a 1-sample placeholder keeps FFCV's argument typed
        return state, AllocationQuery(shape if self.pinned else (1, 1, 1), np.dtype(np.float32))


class SoftTargets(Operation):
    """Class indices -> timm's soft targets (B, num_classes) float32: label smoothing, and the same Mixup / CutMix as
    `NormalizeToFloat` draws for the batch (`image_size` gives the box's area)."""

    def __init__(self, num_classes: int, smoothing: float, mixup: float, cutmix: float, stream: Stream,
                 image_size, pinned: bool = False):
        super().__init__()
        self.num_classes, self.smoothing, self.mixup, self.cutmix, self.stream, self.image_size, self.pinned = \
            num_classes, smoothing, mixup, cutmix, stream, image_size, pinned

    def generate_code(self):
        stream, num_classes, pinned, mixup, cutmix = self.stream.reader(), self.num_classes, self.pinned, \
            self.mixup, self.cutmix
        off = _F32(self.smoothing / num_classes)
        on = _F32(1.0 - self.smoothing) + off
        h, w = self.image_size()

        def targets(labels, buffers, indices):
            n = labels.shape[0]
            out = buffers[:n] if pinned else np.empty((n, num_classes), np.float32)
            lam = 1.0
            if mixup > 0 or cutmix > 0:
                lam = mix_params(stream(), indices, mixup, cutmix, h, w)[0]
            out[:] = off
            for i in range(n):
                out[i, labels[i, 0]] += _F32(lam) * (on - off)
                out[i, labels[n - 1 - i, 0]] += _F32(1.0 - lam) * (on - off)
            return out

        targets.with_indices = True
        return targets

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        shape = (self.num_classes,)
        state = replace(previous_state, jit_mode=True, dtype=np.dtype(np.float32), shape=shape)
        return state, AllocationQuery(shape if self.pinned else (1,), np.dtype(np.float32))
