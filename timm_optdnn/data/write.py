"""Convert an ImageFolder tree or Fashion-MNIST to an FFCV .beton (fields `image` RGB, `label` int) + meta.json.

    python -m timm_optdnn.data.write imagenet/train train.beton --max-side 256 --compress-prob 0.5 --jpeg-quality 90
    python -m timm_optdnn.data.write fashion-mnist fmnist_train.beton --split train

Images that cannot be decoded are skipped and listed at the end (or abort the write with --strict). The beton is
written under a temporary name and renamed on success; the meta.json (`<out>.meta.json`) is written last, and the
loaders refuse a beton without one, so an interrupted write never leaves something that looks complete.
"""
import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

from .sources import FASHION_MNIST_CLASSES, check_image, load_rgb, read_fashion_mnist, scan_image_folder

META_FORMAT = "timm_optdnn-beton-v1"


def meta_path(beton: str | os.PathLike) -> Path:
    return Path(f"{beton}.meta.json")


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _FolderImages:
    """Indexable (RGB uint8 HWC, label) for the FFCV writer workers (forked, so `failed` is shared).

    A file that passed the scan but fails now (changed on disk) must not raise: an exception kills the FFCV
    worker and the writer then waits forever. It becomes a 1x1 placeholder and the write is rejected afterwards.
    """

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples, self.failed = samples, mp.Value("i", 0)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        try:
            return np.asarray(load_rgb(path)), label
        except Exception as e:  # noqa: BLE001
            print(f"\nfailed to decode {path} during write: {e}", file=sys.stderr)
            with self.failed.get_lock():
                self.failed.value += 1
            return np.zeros((1, 1, 3), np.uint8), label


class _ArrayImages:
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels, self.failed = images, labels, None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.repeat(self.images[i][:, :, None], 3, axis=2), int(self.labels[i])


def _page_size(max_pixels: int, max_side: int | None) -> int:
    """FFCV pages must hold the largest sample (a bigger one kills its writer worker): next power of two >= 2x raw."""
    from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE
    if max_side:
        max_pixels = min(max_pixels, max_side * max_side)
    need = 2 * 3 * max_pixels + (1 << 20)  # JPEG of noise at q100 can exceed raw size; the margin keeps it in one page
    size = max(MIN_PAGE_SIZE, 1 << (need - 1).bit_length())  # small pages: each worker's last page is padded
    if size >= MAX_PAGE_SIZE:
        raise ValueError(f"an image of {max_pixels} pixels is too large for FFCV; use --max-side")
    return size


def _scan(samples: list[tuple[str, int]], workers: int) -> tuple[list[tuple[str, int]], list[tuple[str, str]], int]:
    """Decode every file once (JPEGs at reduced DCT scale: fast, still catches truncation) in `workers` processes."""
    from tqdm import tqdm
    good, bad, max_pixels = [], [], 0
    with mp.get_context("fork").Pool(workers) as pool:
        results = pool.imap(check_image, [p for p, _ in samples], chunksize=32)
        for (path, label), (reason, pixels) in tqdm(zip(samples, results), total=len(samples), unit="img",
                                                    desc="checking", file=sys.stderr):
            if reason is None:
                good.append((path, label))
                max_pixels = max(max_pixels, pixels)
            else:
                bad.append((path, reason))
    return good, bad, max_pixels


def _subset_indices(n: int, subset: float | None) -> np.ndarray:
    if subset is None:
        return np.arange(n)
    k = max(1, round(n * subset))
    return np.sort(np.random.default_rng(0).choice(n, k, replace=False))  # fixed seed: the same subset every time


def write_beton(src: str, out: str | os.PathLike, *, split: str = "train", max_side: int | None = None,
                jpeg_quality: int = 90, compress_prob: float | None = None, subset: float | None = None,
                workers: int = 2, chunk_size: int = 100, strict: bool = False, overwrite: bool = False) -> dict:
    """Write `src` (an ImageFolder root or 'fashion-mnist') to the beton `out`; returns the meta dict (also saved)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if compress_prob is not None and not 0.0 <= compress_prob <= 1.0:
        raise ValueError(f"--compress-prob must be in [0, 1], got {compress_prob}")
    if subset is not None and not 0.0 < subset <= 1.0:
        raise ValueError(f"--subset is a fraction in (0, 1], got {subset}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"--max-side must be a positive number of pixels, got {max_side}")
    if workers < 1 or chunk_size < 1:
        raise ValueError(f"--workers and --chunk-size must be >= 1, got {workers} and {chunk_size}")

    skipped: list[tuple[str, str]] = []
    if src == "fashion-mnist":
        images, labels = read_fashion_mnist(split)
        idx = _subset_indices(len(images), subset)
        dataset, classes, source = _ArrayImages(images[idx], labels[idx]), list(FASHION_MNIST_CLASSES), \
            {"kind": "fashion-mnist", "split": split}
        max_pixels, default_prob = 28 * 28, 0.0  # 2.3 KB raw: JPEG would only lose pixels
    else:
        samples, classes = scan_image_folder(src)
        samples = [samples[i] for i in _subset_indices(len(samples), subset)]
        samples, skipped, max_pixels = _scan(samples, workers)
        if skipped:
            listing = "\n".join(f"  {p}: {r}" for p, r in skipped)
            print(f"skipped {len(skipped)} undecodable file(s):\n{listing}", file=sys.stderr)
            if strict:
                raise ValueError(f"--strict: {len(skipped)} undecodable file(s) in {src}, nothing written")
        if not samples:
            raise ValueError(f"no decodable images under {src}")
        dataset, source, default_prob = _FolderImages(samples), {"kind": "imagefolder", "path": str(Path(src).resolve())}, 1.0
    prob = default_prob if compress_prob is None else compress_prob
    mode = {0.0: "raw", 1.0: "jpg"}.get(prob, "proportion")
    labels = dataset.labels if isinstance(dataset, _ArrayImages) else np.array([label for _, label in dataset.samples])

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=max_side, jpeg_quality=jpeg_quality,
                                     compress_probability=prob),
              "label": IntField()}
    start = time.time()
    try:
        writer = DatasetWriter(str(tmp), fields, page_size=_page_size(max_pixels, max_side), num_workers=workers)
        writer.from_indexed_dataset(dataset, chunksize=chunk_size)
        if dataset.failed is not None and dataset.failed.value:
            raise RuntimeError(f"{dataset.failed.value} image(s) changed on disk and failed to decode during the "
                               f"write; nothing written")
        meta = {"format": META_FORMAT, "source": source, "classes": classes, "num_classes": len(classes),
                "num_samples": len(dataset), "class_counts": np.bincount(labels, minlength=len(classes)).tolist(),
                "skipped": [{"path": p, "reason": r} for p, r in skipped],
                "options": {"max_side": max_side, "jpeg_quality": jpeg_quality, "compress_prob": prob,
                            "write_mode": mode, "subset": subset, "chunk_size": chunk_size},
                "size_bytes": tmp.stat().st_size, "sha256": file_sha256(tmp),
                "seconds": round(time.time() - start, 1)}
        meta_path(out).unlink(missing_ok=True)  # a stale meta must never describe the new file
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    mtmp = meta_path(tmp)
    mtmp.write_text(json.dumps(meta, indent=1))
    mtmp.rename(meta_path(out))
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="ImageFolder root (the folder holding the class folders) or 'fashion-mnist'")
    p.add_argument("out", help="output .beton path (meta goes to <out>.meta.json)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="Fashion-MNIST split")
    p.add_argument("--max-side", type=int, default=None, help="resize so the longer side is at most N px")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-prob", type=float, default=None,
                   help="fraction stored as JPEG, rest raw (default: 1 for folders, 0 for fashion-mnist)")
    p.add_argument("--subset", type=float, default=None, help="write a fixed random fraction of the data")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunk-size", type=int, default=100, help="samples per writer work item")
    p.add_argument("--strict", action="store_true", help="fail instead of skipping undecodable files")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        meta = write_beton(a.src, a.out, split=a.split, max_side=a.max_side, jpeg_quality=a.jpeg_quality,
                           compress_prob=a.compress_prob, subset=a.subset, workers=a.workers,
                           chunk_size=a.chunk_size, strict=a.strict, overwrite=a.overwrite)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.out}: {meta['num_samples']} images, {meta['num_classes']} classes, "
          f"{meta['size_bytes'] / 2**20:.1f} MiB in {meta['seconds']} s, {len(meta['skipped'])} skipped")


if __name__ == "__main__":
    main()
