"""The data section of a recipe: everything `create_loaders` needs to know about the data and its augmentation."""
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class DataConfig:
    train_path: str = ""  # a beton (backend ffcv) or an ImageFolder root (backend torchvision)
    val_path: str = ""
    backend: str = "ffcv"  # ffcv | torchvision
    batch_size: int = 128  # per device, per micro step
    val_batch_size: Optional[int] = None  # None: batch_size
    num_workers: int = 2
    img_size: int = 224
    val_img_size: Optional[int] = None  # None: img_size
    crop_pct: float = 0.875
    res_schedule: Optional[List[int]] = None  # progressive resizing: [start_res, end_res, start_ramp, end_ramp] epochs
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    mean: Optional[List[float]] = None  # None: ImageNet's (the trainer passes the model's pretrained cfg)
    std: Optional[List[float]] = None
    rand_augment: Optional[str] = None  # timm's RandAugment string, e.g. rand-m9-mstd0.5-inc1 (see docs/data.md)
    re_prob: float = 0.0  # RandomErasing probability
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    repeated_aug: int = 0  # DeiT's repeated augmentation (timm --aug-repeats): each sample N times per epoch; 0 = off
    channels_last: bool = False
    order: str = "random"  # random | quasi_random | sequential
    os_cache: bool = True
    drop_last: bool = True
    fast_decode: bool = True  # our partial-JPEG crop decoders, seeded crops and flips; False: stock FFCV's (comparison)
