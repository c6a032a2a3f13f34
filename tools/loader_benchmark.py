"""Loader throughput, side by side on the same ImageNet-like JPEGs and the same 224 px random-resized-crop output.

    python -m tools.loader_benchmark --images 1000 --workers 2 --repeats 3

The photos are crops and rescales of scikit-image's bundled colour sample photographs (astronaut, chelsea, coffee,
hubble_deep_field, ihc, motorcycle_left, retina, rocket), 500x375 or 375x500, saved as JPEG quality 90.
Rows: torchvision ImageFolder + PIL; FFCV with JPEG storage (stock FFCV's decoder, and ours:
timm_optdnn.data.decoders); FFCV with each storage choice (longer side 256, 400 or 500 px, all JPEG, half raw, all
raw; 400 / 50 % raw / quality 90 is the recipes'); the DeiT augmentations on top (RandAugment m9, RandomErasing 0.25,
Mixup 0.8 / CutMix 1.0, label smoothing 0.1); stock vs fast decoder at 128 px (the only rows not at 224 px); and
the raw decode bound (libjpeg-turbo alone, one core, times the workers). Each row runs in its own process, which
calls `setup_process()` as the trainer does; epoch 0 (numba compile, worker start) is not timed. `--repeats` runs
all rows again, interleaved, and reports the medians. "main thread" is the CPU time the consuming thread spends
per batch (`time.thread_time`), the time a training process's main thread loses to the data pipeline.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
          "retina.jpg", "rocket.jpg")


def make_photos(root: str | Path, n: int, classes: int = 10, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """n JPEGs (q90) in root/<class>/: random crops (30-100% of the area, 4:3 or 3:4) of the sample photographs,
    rescaled to `size` (or its transpose), randomly mirrored."""
    import skimage
    data_dir = Path(skimage.data.__file__).parent
    sources = [Image.open(data_dir / p).convert("RGB") for p in PHOTOS]
    rng = np.random.default_rng(seed)
    root = Path(root)
    for k in range(n):
        src = sources[k % len(sources)]
        w, h = size if rng.random() < 0.75 else size[::-1]
        crop = rng.uniform(0.3, 1.0) ** 0.5 * min(src.width / w, src.height / h)
        cw, ch = int(w * crop), int(h * crop)
        x, y = rng.integers(0, src.width - cw + 1), rng.integers(0, src.height - ch + 1)
        img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        (root / f"c{k % classes:02d}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"c{k % classes:02d}" / f"img{k:05d}.jpg", quality=90)
    return root


def decode_bound(root: Path, workers: int) -> float:
    """Images/s of libjpeg-turbo (FFCV's imdecode) decoding the files at full size on one core, times workers."""
    from ffcv.libffcv import imdecode
    files = [np.fromfile(p, np.uint8) for p in sorted(root.rglob("*.jpg"))]
    sizes = [Image.open(p).size for p in sorted(root.rglob("*.jpg"))]
    out = np.empty(max(w * h for w, h in sizes) * 3, np.uint8)
    start = time.perf_counter()
    for data, (w, h) in zip(files, sizes):
        imdecode(data, out, h, w, h, w, 0, 0, 1, 1, False, False)
    return workers * len(files) / (time.perf_counter() - start)


def loader_rate(train, epochs: int) -> tuple[float, float]:
    """(images/s, main-thread CPU ms per batch) over epochs 1..epochs (epoch 0 warms up: numba compile, worker
    start, page cache)."""
    images = batches = 0
    for epoch in range(epochs + 1):
        if epoch == 1:
            start, cpu = time.perf_counter(), time.thread_time()
        train.set_epoch(epoch)
        for x, _ in train:
            images, batches = images + len(x) * (epoch > 0), batches + (epoch > 0)
    return images / (time.perf_counter() - start), 1000 * (time.thread_time() - cpu) / batches


def _rate(path: str, kw: dict, epochs: int) -> tuple[float, float]:
    from timm_optdnn.data import DataConfig, create_loaders, setup_process
    setup_process()  # as the trainer runs
    kw = dict(kw)
    num_classes = kw.pop("num_classes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stored photos are larger than the 128 px rows use, as they should be
        train, _ = create_loaders(DataConfig(path, path, **kw), num_classes=num_classes)
    return loader_rate(train, epochs)


def in_fresh_process(fn, *args):
    """fn(*args) in a new interpreter: rows must not share thread pools (a finished loader's numba and OpenCV
    threads slowed the next row by up to 2x here) nor process settings (our decoder sets OpenCV to one thread)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # not daemonic: the
        return pool.submit(fn, *args).result()  # torchvision rows start DataLoader workers


def main(argv: list[str] | None = None) -> None:
    from timm_optdnn.data import write_beton
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--repeats", type=int, default=1, help="run all rows this many times, interleaved; medians")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed at the end)")
    p.add_argument("--only", default=None, help="comma-separated words: run only the rows whose label holds one")
    a = p.parse_args(argv)
    for flag in ("images", "workers", "batch_size", "epochs", "repeats"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    work = Path(a.dir or tempfile.mkdtemp(prefix="optdnn-bench-"))
    try:
        folder = work / "train"
        if not folder.exists():
            make_photos(folder, a.images)
        jpeg_mib = sum(f.stat().st_size for f in folder.rglob("*.jpg")) / 2**20
        storage = {"jpg": dict(compress_prob=1.0), "jpg256": dict(max_side=256, compress_prob=1.0),
                   "mix256": dict(max_side=256, compress_prob=0.5), "raw256": dict(max_side=256, compress_prob=0.0),
                   "jpg400": dict(max_side=400, compress_prob=1.0), "mix400": dict(max_side=400, compress_prob=0.5),
                   "mix500": dict(max_side=500, compress_prob=0.5)}
        betons = {}
        for name, kw in storage.items():
            betons[name] = work / f"{name}.beton"
            if not betons[name].exists():
                write_beton(str(folder), betons[name], workers=a.workers, **kw)
        common = dict(num_classes=10, batch_size=a.batch_size, num_workers=a.workers, img_size=224)
        deit = dict(rand_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
        rows = [("torchvision ImageFolder + PIL", None, dict(backend="torchvision")),
                ("FFCV, JPEG storage, stock decoder", "jpg", dict(fast_decode=False)),
                ("FFCV, JPEG storage, fast decoder", "jpg", {}),
                ("FFCV, max side 256, JPEG", "jpg256", {}),
                ("FFCV, max side 256, 50% raw", "mix256", {}),
                ("FFCV, max side 256, all raw", "raw256", {}),
                ("FFCV, max side 400, JPEG", "jpg400", {}),
                ("FFCV, max side 400, 50% raw (the recipes')", "mix400", {}),
                ("FFCV, max side 500, 50% raw (ffcv-imagenet's README)", "mix500", {}),
                ("FFCV, 256 50% raw + RandAugment m9", "mix256", dict(rand_augment=deit["rand_augment"])),
                ("FFCV, 256 50% raw + DeiT (RA + RE + Mixup/CutMix + LS)", "mix256", deit),
                ("FFCV, 400 50% raw + DeiT (the recipes')", "mix400", deit),
                ("torchvision + DeiT (RA + RE + Mixup/CutMix + LS)", None, dict(backend="torchvision", **deit)),
                # where DCT scaling is meant to help: the low-resolution epochs of progressive resizing
                ("FFCV, JPEG storage, stock decoder, 128 px output", "jpg", dict(fast_decode=False, img_size=128)),
                ("FFCV, JPEG storage, fast decoder, 128 px output", "jpg", dict(img_size=128))]
        if a.only:
            rows = [row for row in rows if any(word in row[0] for word in a.only.split(","))]
        load = os.getloadavg()[0]
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in rows}
        bounds = []
        for _ in range(a.repeats):  # interleaved, so a slow spell of this shared machine hits every row alike
            for label, beton, kw in rows:
                path = str(folder) if beton is None else str(betons[beton])
                runs[label].append(in_fresh_process(_rate, path, {**common, **kw}, a.epochs))
                print(f"{label}: {runs[label][-1][0]:.0f} img/s, main thread {runs[label][-1][1]:.1f} ms/batch",
                      file=sys.stderr, flush=True)
            bounds.append(in_fresh_process(decode_bound, folder, a.workers))
        bound = float(np.median(bounds))
        base = float(np.median([rate for rate, _ in runs[rows[0][0]]]))
        print(f"`{' '.join(['python -m tools.loader_benchmark', *(argv if argv is not None else sys.argv[1:])])}`\n")
        print(f"{a.images} photos of 500x375 (JPEG q90), 224 px random-resized-crop + flip, batch {a.batch_size}, "
              f"{a.workers} workers, {a.epochs} timed epochs, median of {a.repeats} interleaved runs (each row in a "
              f"fresh process); {os.cpu_count()} CPUs, load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at "
              f"end\n")
        print("| storage | disk MiB | write s (incl. decode check) |")
        print("|---|---:|---:|")
        print(f"| JPEG files (the source) | {jpeg_mib:.1f} | - |")
        for name, path in betons.items():
            meta = json.loads(Path(f"{path}.meta.json").read_text())
            print(f"| {name}: {storage[name]} | {path.stat().st_size / 2**20:.1f} | {meta['seconds']} |")
        print()
        print("| pipeline | disk MiB | img/s (median) | runs | x torchvision | x decode bound | main thread ms/batch |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, beton, _ in rows:
            rate, main_ms = (float(np.median(v)) for v in zip(*runs[label]))
            size = jpeg_mib if beton is None else betons[beton].stat().st_size / 2**20
            print(f"| {label} | {size:.1f} | {rate:.0f} | {'-'.join(f'{r:.0f}' for r, _ in sorted(runs[label]))} | "
                  f"{rate / base:.2f} | {rate / bound:.2f} | {main_ms:.1f} |")
        print(f"| libjpeg-turbo full-size decode alone, 1 core x {a.workers} | {jpeg_mib:.1f} | {bound:.0f} | "
              f"{'-'.join(f'{r:.0f}' for r in sorted(bounds))} | {bound / base:.2f} | 1.00 | - |")
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
