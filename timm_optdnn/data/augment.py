"""Batch-level augmentation for FFCV batches: FFCV has no RandAugment or random erasing, so they run here, per sample,
on the uint8 batch the loader returns, followed by normalisation, timm RandomErasing and timm Mixup/CutMix.

The torchvision backend gets RandAugment and RandomErasing from timm's `create_transform` instead and shares
`Targets` (Mixup / CutMix / label smoothing) with the FFCV path.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import Mixup, mixup_target
from timm.data.random_erasing import RandomErasing


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for Pillow >= 12, which rejects bits=0; older Pillow returned a black image, as here."""
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)


# 'PosterizeIncreasing' at magnitude 10 (reached by rand-m9-mstd0.5) asks for 0 bits: without this RandAugment
# crashes in both backends (timm's create_transform uses the same table)
auto_augment.NAME_TO_OP.update({k: _posterize for k, v in auto_augment.NAME_TO_OP.items() if v is auto_augment.posterize})


def to_device(images: torch.Tensor, device: str, channels_last: bool) -> torch.Tensor:
    """One copy to a new float32 tensor on `device` in the wanted memory format (out of FFCV's reused buffers)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(images.shape, dtype=torch.float32, device=device, memory_format=fmt)
    return out.copy_(images, non_blocking=True)


class BatchAugment:
    """FFCV batch -> RandAugment per sample -> float normalised on device -> RandomErasing.

    Without RandAugment, FFCV normalises in its parallel worker threads: with our stages (`fast`) straight into a
    new batch in the model's layout (decoders.NormalizeToFloat), with stock FFCV's into its ring buffer, copied out
    here. RandAugment needs the uint8 images, so then normalisation runs here, on `device`.
    """

    def __init__(self, rand_augment: str | None, re_prob: float, mean, std, device: str, channels_last: bool,
                 threads: int = 2, fast: bool = True):
        self.rand_augment, self.device, self.channels_last = rand_augment, device, channels_last
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.img_mean = tuple(min(255, round(255 * m)) for m in mean)
        self.ra, self.ra_size = None, None
        # PIL releases the GIL in most RandAugment ops, so threads overlap with the FFCV workers' decoding
        self.pool = ThreadPoolExecutor(threads) if rand_augment else None
        self.erase = RandomErasing(re_prob, mode="pixel", device=device) if re_prob > 0 else None
        self.ffcv_normalize = not rand_augment
        self.fresh = fast and self.ffcv_normalize  # batches come normalised in new memory (NormalizeToFloat)

    def _rand_augment(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-1]
        if self.ra_size != size:  # translate range scales with the image, as in timm's create_transform
            self.ra = rand_augment_transform(self.rand_augment, dict(translate_const=int(size * 0.45),
                                                                     img_mean=self.img_mean))
            self.ra_size = size
        arrays = images.permute(0, 2, 3, 1).numpy()
        out = list(self.pool.map(lambda a: np.asarray(self.ra(Image.fromarray(a))), arrays))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)

    def ffcv_ops(self) -> list:
        """FFCV pipeline tail after decode / flip. Stock: [decoder, flip, NormalizeImage, ToTensor, ToTorchImage], an
        order that works (others hang the Loader at init, DESIGN.md section 4)."""
        from ffcv.transforms import NormalizeImage, ToTensor, ToTorchImage

        from .decoders import NormalizeToFloat
        mean, std = self.mean.view(3).cpu().numpy(), self.std.view(3).cpu().numpy()
        if self.fresh:
            return [NormalizeToFloat(mean, std, self.channels_last), ToTensor()]
        return [*([NormalizeImage(mean, std, np.float32)] if self.ffcv_normalize else []), ToTensor(), ToTorchImage()]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.fresh:  # already normalised, in new memory: only the move to the device is left
            x = (images.permute(0, 3, 1, 2) if self.channels_last else images).to(self.device, non_blocking=True)
        else:
            if self.rand_augment:
                images = self._rand_augment(images)
            x = to_device(images, self.device, self.channels_last)
            if images.dtype == torch.uint8:
                x.sub_(self.mean).div_(self.std)
        return self.erase(x) if self.erase is not None else x


class Targets:
    """int64 labels -> hard labels, or soft [B, num_classes] targets when Mixup / CutMix / label smoothing is on."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, label_smoothing: float = 0.0):
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                           num_classes=num_classes) if mixup > 0 or cutmix > 0 else None
        self.soft = self.mixup is not None or label_smoothing > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is not None:
            return self.mixup(images, labels)  # mixes images in place, returns smoothed soft targets
        if self.smoothing > 0:
            return images, mixup_target(labels, self.num_classes, 1.0, self.smoothing)
        return images, labels
