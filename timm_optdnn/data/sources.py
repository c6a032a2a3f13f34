"""Dataset sources for the beton writer and the torchvision backend: ImageFolder trees and Fashion-MNIST.

Every image goes through `load_rgb`, so the FFCV writer and the torchvision loader see the same pixels:
EXIF orientation applied, 16-bit / float images rescaled (PIL's own convert would clip them to white),
grayscale / CMYK / palette / alpha converted to RGB the way torchvision's `pil_loader` does.
"""
import gzip
import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit ('I;16*'), 32-bit int ('I') and float ('F') single-channel images, scaled to 0..255 by their dtype
    range."""
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


def check_image(path: str) -> tuple[str | None, int, int]:
    """(None, width, height) if `path` decodes to an RGB image, else (the reason it does not, 0, 0)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
        load_rgb(path, draft=64)
    except Exception as e:  # noqa: BLE001  PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"{type(e).__name__}: {e}", 0, 0
    return (None, width, height) if width * height else ("empty image", 0, 0)


def check_images(paths: list[str], workers: int) -> list[tuple[str | None, int, int]]:
    """`check_image` of every path, in `workers` processes (JPEGs decoded at a reduced DCT scale: fast, and the
    whole entropy stream is still read, so truncation is caught)."""
    from tqdm import tqdm
    with mp.get_context("fork").Pool(workers, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)) \
            as pool:  # SIGTERM's default action in the workers, which Pool.terminate() relies on
        return list(tqdm(pool.imap(check_image, paths, chunksize=32), total=len(paths), unit="img", desc="checking",
                         file=sys.stderr, disable=len(paths) < 1000))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every file under root/<class>/, classes in sorted folder-name order: the one listing
    both backends use. Symlinked folders and files are followed (as torchvision's ImageFolder does; within a class, a
    folder reached twice through links is listed once, so a link back up the tree ends), hidden files and folders
    (names starting with '.') are ignored.

    Files are not opened here: undecodable ones are found by `check_image`.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"ImageFolder root {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"ImageFolder root {root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise PermissionError(f"ImageFolder root {root} is not readable")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _is_hidden(e.name))
    if not classes:
        raise ValueError(f"ImageFolder root {root} has no class folders (expected {root}/<class>/<image>; "
                         "pass the folder that holds the class folders, e.g. imagenet/train)")
    samples, empty, unreadable = [], [], []

    def cannot_read(e: OSError) -> None:
        unreadable.append(f"{e.filename} ({e.strerror})")

    for label, name in enumerate(classes):
        files, seen = [], set()
        for folder, dirs, names in os.walk(root / name, onerror=cannot_read, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a link back up the tree, or a second link to one folder
                dirs.clear()
                continue
            seen.add(real)
            dirs[:] = [d for d in dirs if not _is_hidden(d)]
            files += [os.path.join(folder, n) for n in names if not _is_hidden(n)]
        if not files:
            empty.append(name)
        samples += [(f, label) for f in sorted(files)]
    if unreadable:
        raise PermissionError(f"{len(unreadable)} folder(s) under {root} cannot be read: "
                              f"{', '.join(unreadable[:10])}{' ...' if len(unreadable) > 10 else ''}")
    if empty:
        raise ValueError(f"{len(empty)} class folder(s) under {root} hold no files: {', '.join(empty[:10])}"
                         f"{' ...' if len(empty) > 10 else ''} (remove them, or their class index would have no data)")
    return samples, classes


def split_decodable(samples: list[tuple[str, int]], checks: list[tuple[str | None, int, int]]) \
        -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(decodable samples, [(path, reason)] for the rest) from `check_images`' results."""
    good = [s for s, (reason, _, _) in zip(samples, checks) if reason is None]
    return good, [(path, reason) for (path, _), (reason, _, _) in zip(samples, checks) if reason is not None]


def check_classes(good: list[tuple[str, int]], classes: list[str], root: str | os.PathLike) -> None:
    """Every class still has an image once undecodable files are skipped: a class without data would keep its index
    and never be seen."""
    if not good:
        raise ValueError(f"no decodable images under {root}")
    left = set(label for _, label in good)
    empty = [name for label, name in enumerate(classes) if label not in left]
    if empty:
        raise ValueError(f"{len(empty)} class folder(s) under {root} hold no decodable image once undecodable files "
                         f"are skipped: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")


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
        raise ValueError(f"{path} is truncated: header says {shape}, file has {len(data) - 4 * (1 + ndim)} bytes of "
                         f"data")
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
