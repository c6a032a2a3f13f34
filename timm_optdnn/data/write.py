"""Convert an ImageFolder tree or Fashion-MNIST to an FFCV .beton (fields `image` RGB, `label` int) + meta.json.

    python -m timm_optdnn.data.write imagenet/train train_400_0.50_90.beton --max-side 400 --compress-prob 0.5
    python -m timm_optdnn.data.write fashion-mnist fmnist_train.beton --split train

Images that cannot be decoded are skipped and listed at the end (or abort the write with --strict). The beton is
written under a temporary name and renamed on success; the meta.json (`<out>.meta.json`) is written before the
rename, and the loaders refuse a beton without one, so an interrupted write never leaves something that looks
complete. Ctrl-C, SIGTERM, a writer worker's death or a full disk end the write within a second, with a message
naming the cause: no temporary, worker or shared-memory segment is left, and an existing OUT is untouched.
"""
import argparse
import collections
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from .beton import META_FORMAT, file_sha256, meta_path
from .process import kept_threads
from .sources import (FASHION_MNIST_CLASSES, check_classes, check_images, load_rgb, read_fashion_mnist,
                      scan_image_folder, split_decodable)

LARGE_SIDE = 2048  # images with a longer side are worth shrinking with --max-side for any ImageNet-style recipe


class Interrupted(BaseException):
    """A termination signal, raised in the main thread so that the write cleans up after itself (a BaseException,
    as KeyboardInterrupt is, so that no `except Exception` on the way swallows it)."""


class _FolderImages:
    """Indexable (RGB uint8 HWC, label) for the FFCV writer workers (forked, so `failed` is shared).

    A file that passed the check but fails now (changed on disk) must not raise, which would end the write: it
    becomes a 1x1 placeholder and the write is rejected afterwards, naming the count.
    """

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples, self.failed = samples, mp.get_context("fork").Value("i", 0)

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
    with kept_threads():
        from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE
    if max_side:
        max_pixels = min(max_pixels, max_side * max_side)
    need = 2 * 3 * max_pixels + (1 << 20)  # JPEG of noise at q100 can exceed raw size; the margin keeps it in one page
    size = max(MIN_PAGE_SIZE, 1 << (need - 1).bit_length())  # small pages: each worker's last page is padded
    if size >= MAX_PAGE_SIZE:
        raise ValueError(f"an image of {max_pixels} pixels is too large for FFCV; use --max-side")
    return size


def _subset_indices(n: int, subset: float | None) -> np.ndarray:
    if subset is None:
        return np.arange(n)
    k = max(1, round(n * subset))
    return np.sort(np.random.default_rng(0).choice(n, k, replace=False))  # fixed seed: the same subset every time


def _describe_exit(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def _last_error(lines) -> str:
    """The exception line of the last traceback among `lines` (what a dying worker printed), or ''."""
    for line in reversed(lines):
        name = line.split(":", 1)[0]
        if name.isidentifier() and (name.endswith("Error") or name.endswith("Exception")):
            return f": {line.strip()}"
    return ""


def _write_job(tmp: Path, fields: dict, page_size: int, workers: int, dataset, chunk_size: int, report) -> None:
    """FFCV's writer, in a child process that leads its own process group: FFCV's worker processes join the group,
    so the parent can end all of them at once (FFCV's writer waits forever for a worker that died, and leaves its
    shared-memory segment when it is killed). Reports ("shm", name), then ("done", None) or ("error", why)."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it gets Ctrl-C and ends this group
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler, inherited through fork
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:
            report.send(message)

    tail = collections.deque(maxlen=50)  # the last lines written to stderr here or by the workers, for their errors
    stderr, (pipe_out, pipe_in) = os.dup(2), os.pipe()
    os.dup2(pipe_in, 2)
    os.close(pipe_in)

    def forward() -> None:
        while chunk := os.read(pipe_out, 1 << 16):
            os.write(stderr, chunk)
            tail.extend(chunk.decode(errors="replace").splitlines())

    def dead_child() -> tuple[int, int] | None:
        """(pid, exit code as multiprocessing gives it) of a worker that ended badly, or None. A dead child is first
        looked for without reaping it (multiprocessing reaps a dead worker when it lists or starts children, and
        then no longer lists it); then among the workers listed so far."""
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = None
        if info is not None and (info.si_code != os.CLD_EXITED or info.si_status != 0):
            return info.si_pid, info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        try:
            workers_seen.update((p.pid, p) for p in mp.active_children())
        except RuntimeError:  # the set of children changed while it was read: read it next time
            pass
        dead = [p for p in workers_seen.values() if p.exitcode not in (None, 0)]
        return (dead[0].pid, dead[0].exitcode) if dead else None

    def watch() -> None:
        while (dead := dead_child()) is None:
            time.sleep(0.05)
        time.sleep(0.2)  # let its traceback arrive through the pipe
        send(("error", f"FFCV writer worker (pid {dead[0]}) {_describe_exit(dead[1])}{_last_error(tail)}"))
        os._exit(1)

    workers_seen: dict = {}

    with kept_threads():
        from ffcv.writer import DatasetWriter

    class Writer(DatasetWriter):
        def prepare(self):
            super().prepare()
            send(("shm", self.metadata_sm.name))  # the parent removes it if this process is killed

    threading.Thread(target=forward, daemon=True).start()
    threading.Thread(target=watch, daemon=True).start()
    try:
        Writer(str(tmp), fields, page_size=page_size, num_workers=workers).from_indexed_dataset(
            dataset, chunksize=chunk_size)
    except BaseException as e:  # noqa: BLE001  reported, then this process ends
        send(("error", f"{type(e).__name__}: {e}"))
        os._exit(1)
    send(("done", None))


def _run_write_job(tmp: Path, *args) -> None:
    """`_write_job` in a child process group, waited for; on any way out but success (an exception here, Ctrl-C,
    a signal turned into `Interrupted`, an error there) the group is killed and its temporary and shared-memory
    segment removed."""
    ctx = mp.get_context("fork")
    receive, report = ctx.Pipe(duplex=False)
    job = ctx.Process(target=_write_job, args=(tmp, *args, report), daemon=False)
    job.start()
    report.close()
    try:
        os.setpgid(job.pid, job.pid)  # also set by the job itself: the group exists whichever runs first
    except OSError:
        pass  # already set by the job (or it has already ended)
    shm, outcome = None, None
    try:
        while outcome is None:
            if receive.poll(0.2):
                try:
                    kind, value = receive.recv()
                except EOFError:  # the job and every worker are gone
                    kind, value = "error", f"the writer process {_describe_exit(job.exitcode)} without a word"
                if kind == "shm":
                    shm = value
                else:
                    outcome = (kind, value)
            elif job.exitcode is not None and not receive.poll():  # its workers may keep the pipe open
                outcome = ("error", f"the writer process {_describe_exit(job.exitcode)}")
        if outcome[0] == "error":
            raise RuntimeError(f"{outcome[1]}; nothing written")
        job.join(30)
    finally:
        if job.exitcode is None or outcome is None or outcome[0] != "done":
            try:
                os.killpg(job.pid, signal.SIGKILL)  # the job is not reaped yet, so its pid is still the group's
            except ProcessLookupError:
                pass
        job.join()
        if shm:
            Path("/dev/shm", shm).unlink(missing_ok=True)
        if outcome is None or outcome[0] != "done":
            tmp.unlink(missing_ok=True)


def write_beton(src: str, out: str | os.PathLike, *, split: str = "train", max_side: int | None = None,
                jpeg_quality: int = 90, compress_prob: float | None = None, subset: float | None = None,
                workers: int = 2, chunk_size: int = 100, strict: bool = False, overwrite: bool = False) -> dict:
    """Write `src` (an ImageFolder root or 'fashion-mnist') to the beton `out`; returns the meta dict (also saved).

    Any exception (KeyboardInterrupt included) ends the write cleanly: nothing is left but what was there. The CLI
    turns SIGTERM into such an exception (`Interrupted`); a program calling this can do the same."""
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
        checks = check_images([p for p, _ in samples], workers)
        samples, skipped = split_decodable(samples, checks)
        if skipped:
            listing = "\n".join(f"  {p}: {r}" for p, r in skipped)
            print(f"skipped {len(skipped)} undecodable file(s):\n{listing}", file=sys.stderr)
            if strict:
                raise ValueError(f"--strict: {len(skipped)} undecodable file(s) in {src}, nothing written")
        check_classes(samples, classes, src)
        sides = [(w, h) for reason, w, h in checks if reason is None]
        max_pixels = max(w * h for w, h in sides)
        large = [(w, h) for w, h in sides if max(w, h) > LARGE_SIDE]
        if large and max_side is None:
            w, h = max(large, key=lambda s: s[0] * s[1])
            warnings.warn(f"{len(large)} image(s) have a side over {LARGE_SIDE} px (largest {w}x{h}, "
                          f"{3 * w * h / 2**20:.0f} MiB raw): stored at full size they make the beton large and "
                          f"every read decodes pixels that training at 224-500 px never uses. Pass --max-side "
                          f"(400 for the ImageNet recipes)", stacklevel=2)
        dataset, default_prob = _FolderImages(samples), 1.0
        source = {"kind": "imagefolder", "path": str(Path(src).resolve())}
    prob = default_prob if compress_prob is None else compress_prob
    mode = {0.0: "raw", 1.0: "jpg"}.get(prob, "proportion")
    labels = dataset.labels if isinstance(dataset, _ArrayImages) else np.array([label for _, label in dataset.samples])

    with kept_threads():
        from ffcv.fields import IntField, RGBImageField
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    mtmp = meta_path(tmp)
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=max_side, jpeg_quality=jpeg_quality,
                                     compress_probability=prob),
              "label": IntField()}
    start = time.time()
    try:
        _run_write_job(tmp, fields, _page_size(max_pixels, max_side), workers, dataset, chunk_size)
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
        mtmp.write_text(json.dumps(meta, indent=1))  # may fail (disk full) while `out` is still untouched
        meta_path(out).unlink(missing_ok=True)  # a stale meta must never describe the new file
        tmp.rename(out)
        mtmp.rename(meta_path(out))
    finally:
        tmp.unlink(missing_ok=True)
        mtmp.unlink(missing_ok=True)
    return meta


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="ImageFolder root (the folder holding the class folders) or 'fashion-mnist'")
    p.add_argument("out", help="output .beton path (meta goes to <out>.meta.json)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="Fashion-MNIST split")
    p.add_argument("--max-side", type=int, default=None,
                   help="shrink so the longer side is at most N px, never enlarge (default: keep the size)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of the stored JPEGs, 1..100 (default 90)")
    p.add_argument("--compress-prob", type=float, default=None,
                   help="fraction stored as JPEG, rest raw (default: 1 for folders, 0 for fashion-mnist)")
    p.add_argument("--subset", type=float, default=None, help="write a fixed random fraction of the data")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for the decode check and the writer (default: all CPUs)")
    p.add_argument("--chunk-size", type=int, default=100, help="samples per writer work item")
    p.add_argument("--strict", action="store_true", help="fail instead of skipping undecodable files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (kept until the write succeeds)")
    a = p.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        meta = write_beton(a.src, a.out, split=a.split, max_side=a.max_side, jpeg_quality=a.jpeg_quality,
                           compress_prob=a.compress_prob, subset=a.subset, workers=a.workers,
                           chunk_size=a.chunk_size, strict=a.strict, overwrite=a.overwrite)
    except (KeyboardInterrupt, Interrupted) as e:
        name = str(e) or "SIGINT"
        kept = f" ({a.out} is as it was)" if Path(a.out).exists() else ""
        print(f"error: interrupted by {name}: nothing written{kept}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # everything is cleaned up: skip the interpreter's teardown (seconds with torch and numba loaded, longer
        # on a busy machine) so that a signalled writer ends at once
        os._exit(128 + signal.Signals[name])
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {a.out}: {meta['num_samples']} images, {meta['num_classes']} classes, "
          f"{meta['size_bytes'] / 2**20:.1f} MiB in {meta['seconds']} s, {len(meta['skipped'])} skipped")


if __name__ == "__main__":
    main()
