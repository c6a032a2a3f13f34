"""Dataset sources for the beton writer and the torchvision backend: ImageFolder trees and Fashion-MNIST.

Every image goes through `load_rgb`, so the FFCV writer and the torchvision loader see the same pixels:
EXIF orientation applied, 16-bit / float images rescaled (PIL's own convert would clip them to white),
grayscale / CMYK / palette / alpha converted to RGB the way torchvision's `pil_loader` does.
"""
import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit ('I;16*'), 32-bit int ('I') and float ('F') single-channel images, scaled to 0..255 by their dtype range."""
    a = np.asarray(img)
    if img.mode == "F":
        hi = 1.0 if a.max(initial=0.0) <= 1.0 else 255.0  # float images come as 0..1 or 0..255
    else:
        hi = 255.0 if a.max(initial=0) <= 255 else 65535.0
    return Image.fromarray(np.clip(a.astype(np.float64) * (255.0 / hi), 0, 255).round().astype(np.uint8), "L")


def load_rgb(path: str | os.PathLike, draft: int | None = None) -> Image.Image:
    """Fully decode an image file to an RGB PIL image. Raises (OSError, ValueError, ...) if it cannot be decoded.

    draft: let libjpeg decode JPEGs at a reduced DCT scale no smaller than this side (the whole entropy stream
    is still read, so truncated files still fail): a cheap validity check.
    """
    with Image.open(path) as img:
        if draft is not None:
            img.draft("RGB", (draft, draft))
        img.load()  # decode here: truncated data raises now, not later in a writer worker
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            img = _to_8bit(img)
        return img.convert("RGB")


def check_image(path: str) -> tuple[str | None, int]:
    """(None, pixel count) if `path` decodes to an RGB image, else (the reason it does not, 0)."""
    try:
        with Image.open(path) as img:
            pixels = img.width * img.height
        load_rgb(path, draft=64)
    except Exception as e:  # noqa: BLE001  PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"{type(e).__name__}: {e}", 0
    return (None, pixels) if pixels else ("empty image", 0)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every file under root/<class>/ (recursively), classes in sorted folder-name order.

    Files are not opened here: undecodable ones are found by `check_image`. Hidden files are ignored.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"ImageFolder root {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"ImageFolder root {root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"ImageFolder root {root} has no class folders (expected {root}/<class>/<image>; "
                         "pass the folder that holds the class folders, e.g. imagenet/train)")
    samples, empty = [], []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            empty.append(name)
        samples += [(f, label) for f in files]
    if empty:
        raise ValueError(f"{len(empty)} class folder(s) under {root} hold no files: {', '.join(empty[:10])}"
                         f"{' ...' if len(empty) > 10 else ''} (remove them, or their class index would have no data)")
    return samples, classes


def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the Debian package dataset-fashion-mnist "
                                f"(`apt-get install dataset-fashion-mnist`) or set FASHION_MNIST_DIR")
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3] if len(data) >= 4 else 0
    header = np.frombuffer(data, ">u4", count=1 + ndim) if len(data) >= 4 * (1 + ndim) else None
    if header is None or header[0] != magic:
        raise ValueError(f"{path} is not an IDX file with magic {magic}")
    shape = tuple(int(s) for s in header[1:])
    if len(data) - 4 * (1 + ndim) != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, file has {len(data) - 4 * (1 + ndim)} bytes of data")
    return np.frombuffer(data, np.uint8, offset=4 * (1 + ndim)).reshape(shape)


def read_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images [N, 28, 28] uint8 and labels [N] int64 for split 'train' (60k) or 'test' (10k)."""
    if split not in ("train", "test"):
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels
