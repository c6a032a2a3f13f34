"""Every bad input of the writer and the loaders: converted, skipped with a listing, or a clear error."""
import ctypes
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv")
# numba prints a KeyError while garbage-collecting FFCV's compiled ctypes wrappers: harmless, not ours
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

from timm_optdnn.data import check_beton, write_beton  # noqa: E402
from timm_optdnn.data.beton import META_FORMAT, file_sha256, meta_path  # noqa: E402
from conftest import make_loaders  # noqa: E402
from timm_optdnn.data.sources import load_rgb, read_fashion_mnist  # noqa: E402
from timm_optdnn.data.write import main  # noqa: E402

# (class, file, expected RGB after conversion) for the convertible images, in the beton's (sorted) order
CONVERTIBLE = [("a", "cmyk.jpg", (200, 50, 30)), ("a", "gray.jpg", (100, 100, 100)), ("a", "rgba.png", (10, 200, 30)),
               ("b", "exif.jpg", (40, 80, 160)), ("b", "palette.png", (30, 60, 90)),
               ("b", "sixteen.png", (128, 128, 128)), ("c", "good.JPEG", (90, 120, 150))]
UNDECODABLE = ["corrupt.JPEG", "notes.txt", "truncated.JPEG"]


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy") / "train"
    for c in "abc":
        (root / c).mkdir(parents=True)
    solid = lambda rgb, size=(32, 32): Image.new("RGB", size, rgb)  # noqa: E731
    solid((200, 50, 30)).convert("CMYK").save(root / "a/cmyk.jpg", quality=95)
    Image.new("L", (32, 32), 100).save(root / "a/gray.jpg", quality=95)
    Image.new("RGBA", (32, 32), (10, 200, 30, 128)).save(root / "a/rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 on display, so the stored 48x24 shows as 24x48
    solid((40, 80, 160), (48, 24)).save(root / "b/exif.jpg", quality=95, exif=exif)
    solid((30, 60, 90)).convert("P", palette=Image.ADAPTIVE).save(root / "b/palette.png")
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(root / "b/sixteen.png")  # 16-bit gray, half scale
    solid((90, 120, 150)).save(root / "c/good.JPEG", quality=95)
    full = (root / "c/good.JPEG").read_bytes()
    (root / "c/truncated.JPEG").write_bytes(full[: len(full) // 2])
    (root / "c/corrupt.JPEG").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "c/notes.txt").write_text("not an image")
    return root


@pytest.mark.timeout(120)
def test_convertible_written_undecodable_skipped(messy, tmp_path):
    out = tmp_path / "messy.beton"
    meta = write_beton(str(messy), out, compress_prob=0.0, workers=2)
    assert meta["num_samples"] == len(CONVERTIBLE) and meta["class_counts"] == [3, 3, 1]
    assert sorted(Path(s["path"]).name for s in meta["skipped"]) == UNDECODABLE
    assert all(s["reason"] for s in meta["skipped"])
    assert load_rgb(messy / "b/exif.jpg").size == (24, 48)  # EXIF rotation applied
    assert load_rgb(messy / "b/sixteen.png").getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to 255
    _, val = make_loaders(out, out, num_classes=3, batch_size=8, num_workers=1, img_size=16, crop_pct=1.0)
    images, labels = next(iter(val))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2]
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    colours = (images.mean((2, 3)) * std + mean) * 255
    assert torch.allclose(colours, torch.tensor([c for _, _, c in CONVERTIBLE], dtype=torch.float32), atol=3), colours


@pytest.mark.timeout(120)
def test_cli_strict_fails_and_lists(messy, tmp_path, capsys):
    out = tmp_path / "strict.beton"
    with pytest.raises(SystemExit, match="--strict: 3 undecodable file") as e:
        main([str(messy), str(out), "--strict", "--workers", "1"])
    assert str(e.value).startswith("error: ")  # a message and exit status 1, not a traceback
    listing = capsys.readouterr().err
    assert all(name in listing for name in UNDECODABLE)  # the listing names every file
    assert not out.exists() and list(tmp_path.iterdir()) == []
    main([str(messy), str(out), "--workers", "1"])
    printed = capsys.readouterr().out  # without --strict: written, with the skipped files counted
    assert "7 images, 3 classes" in printed and "3 skipped" in printed and out.exists()


def test_bad_roots_and_options(tmp_path, messy):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_beton(str(tmp_path / "nope"), tmp_path / "x.beton")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        write_beton(str(tmp_path / "file"), tmp_path / "x.beton")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        write_beton(str(tmp_path / "empty"), tmp_path / "x.beton")
    (tmp_path / "one/full").mkdir(parents=True)
    (tmp_path / "one/hollow").mkdir()
    shutil.copy(messy / "c/good.JPEG", tmp_path / "one/full")
    with pytest.raises(ValueError, match="1 class folder.*no files: hollow"):
        write_beton(str(tmp_path / "one"), tmp_path / "x.beton")
    (tmp_path / "junk/cls").mkdir(parents=True)
    (tmp_path / "junk/cls/a.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no decodable images"):
        write_beton(str(tmp_path / "junk"), tmp_path / "x.beton")
    for kw, msg in [(dict(jpeg_quality=0), "jpeg-quality"), (dict(compress_prob=1.5), "compress-prob"),
                    (dict(subset=0.0), "subset"), (dict(max_side=0), "max-side"), (dict(workers=0), "workers")]:
        with pytest.raises(ValueError, match=msg):
            write_beton(str(messy), tmp_path / "x.beton", **kw)
    with pytest.raises(FileNotFoundError, match="output directory"):
        write_beton(str(messy), tmp_path / "nodir/x.beton")


@pytest.mark.timeout(60)
def test_fashion_mnist_missing_or_bad(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        read_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        read_fashion_mnist("val")
    src = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    data = gzip.decompress(src.read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(data[:-10]))
    shutil.copy(src.with_name("t10k-images-idx3-ubyte.gz"), tmp_path)
    with pytest.raises(ValueError, match="truncated"):
        read_fashion_mnist("test", root=tmp_path)


# ---------------------------------------------------------------- the writer interrupted, a real process each time

def _session(sid: int) -> dict[int, tuple[str, int]]:
    """{pid: (state, process group)} of the processes in session `sid` (the writer, its job, FFCV's workers)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        if int(fields[3]) == sid:
            found[int(stat.parent.name)] = fields[0], int(fields[2])
    return found


def _shm_segments(pids) -> set[str]:
    names = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        names |= {line.split()[-1] for line in maps.splitlines() if "/dev/shm/" in line}
    return names


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """400 hard links to 3 large JPEGs (1600x1200, q95): several seconds of writing with 2 workers."""
    root = tmp_path_factory.mktemp("big") / "train"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        small = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
        Image.fromarray(small).resize((1600, 1200), Image.BICUBIC).save(root / f"c{c}/0.jpg", quality=95)
        for i in range(1, 134):
            os.link(root / f"c{c}/0.jpg", root / f"c{c}/{i}.jpg")
    return root


def _interrupted_write(src: Path, out: Path, interrupt, while_checking: bool = False) -> tuple[int, str, float]:
    """Run the writer CLI over an existing OUT (--overwrite), call interrupt(proc, FFCV's worker pids) once they
    are writing (None: let it run; while_checking: once the decode check's pool runs, with its pids), and check
    that it ended cleanly: (exit code, stderr, seconds from the interrupt to the exit)."""
    old = b"an older beton, to be kept"
    out.write_bytes(old)
    Path(f"{out}.meta.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, "-m", "timm_optdnn.data.write", str(src), str(out), "--workers", "2",
                             "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen, shm, sent = {}, set(), None
    while proc.poll() is None:
        now = _session(proc.pid)
        seen.update(now)
        shm |= _shm_segments(seen)
        job = [pid for pid, (state, group) in now.items() if group != proc.pid]  # the writer job and its workers
        writing = len(job) >= 3 and shm and list(out.parent.glob(f".{out.name}.tmp*"))
        pool = [pid for pid, (state, group) in now.items() if group == proc.pid and pid != proc.pid]
        if sent is None and interrupt is not None and (len(pool) >= 2 if while_checking else writing):
            interrupt(proc, pool if while_checking else [pid for pid in job if now[pid][1] != pid])
            sent = time.time()
        time.sleep(0.05)
    waited = time.time() - (sent or time.time())
    stderr = proc.stderr.read()
    assert sent or interrupt is None, f"the write ended before it could be interrupted: {stderr}"
    assert while_checking or shm, f"the write ended before its workers were seen: {stderr}"
    left = {pid: state for pid, (state, _) in _session(proc.pid).items() if state != "Z"}  # zombies have ended
    assert not left, f"orphaned processes {left}"
    assert not [s for s in shm if Path(s).exists()], f"shared memory left: {shm}"
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, f"{out.name}.meta.json"])
    assert out.read_bytes() == old and Path(f"{out}.meta.json").read_text() == "{}"
    return proc.returncode, stderr, waited


@pytest.mark.timeout(300)
def test_ctrl_c_ends_the_write_cleanly(big_folder, tmp_path):
    """SIGINT to the writer's process group, as a terminal's Ctrl-C sends it."""
    rc, err, waited = _interrupted_write(big_folder, tmp_path / "x.beton",
                                         lambda proc, _: os.killpg(proc.pid, signal.SIGINT))
    assert rc == 130 and "interrupted by SIGINT" in err and waited < 10, (rc, err, waited)


@pytest.mark.timeout(300)
def test_sigterm_ends_the_write_cleanly(big_folder, tmp_path):
    rc, err, waited = _interrupted_write(big_folder, tmp_path / "x.beton",
                                         lambda proc, _: os.kill(proc.pid, signal.SIGTERM))
    assert rc == 143 and "interrupted by SIGTERM" in err and waited < 10, (rc, err, waited)


@pytest.mark.timeout(300)
def test_sigterm_during_the_decode_check(big_folder, tmp_path):
    rc, err, waited = _interrupted_write(big_folder, tmp_path / "x.beton",
                                         lambda proc, _: os.kill(proc.pid, signal.SIGTERM), while_checking=True)
    assert rc == 143 and "interrupted by SIGTERM" in err and waited < 10, (rc, err, waited)


@pytest.mark.timeout(300)
def test_dead_writer_worker_ends_the_write(big_folder, tmp_path):
    """A worker killed outright (as the OOM killer would): FFCV's writer alone would wait for it forever."""
    def kill_a_worker(proc, workers):
        os.kill(workers[-1], signal.SIGKILL)
        kill_a_worker.pid = workers[-1]
    rc, err, waited = _interrupted_write(big_folder, tmp_path / "x.beton", kill_a_worker)
    assert rc == 1 and f"worker (pid {kill_a_worker.pid}) was killed by SIGKILL" in err and waited < 10, (rc, err)


@pytest.mark.timeout(300)
def test_full_disk_ends_the_write(big_folder, tmp_path):
    """The beton written to a 3 MiB tmpfs: a worker's page write fails with ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here")
    try:
        rc, err, _ = _interrupted_write(big_folder, disk / "x.beton", None)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert rc == 1 and "No space left on device" in err and "nothing written" in err, (rc, err)


@pytest.mark.timeout(120)
def test_loader_rejects_bad_betons(messy, tmp_path):
    good = tmp_path / "good.beton"
    write_beton(str(messy), good, workers=1)
    with pytest.raises(ValueError, match="3 classes.*num_classes=10"):
        check_beton(good, num_classes=10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_beton(tmp_path / "missing.beton", 3)
    nometa = tmp_path / "nometa.beton"
    shutil.copy(good, nometa)
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        check_beton(nometa, 3)
    data = good.read_bytes()
    for name, content, msg in [("trunc", data[: len(data) // 2], "truncated"),
                               ("flipped", data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:], "sha256")]:
        bad = tmp_path / f"{name}.beton"
        bad.write_bytes(content)
        shutil.copy(f"{good}.meta.json", f"{bad}.meta.json")
        with pytest.raises(ValueError, match=msg):
            make_loaders(bad, good, num_classes=3, batch_size=2)
    other = tmp_path / "other.beton"
    write_beton("fashion-mnist", other, split="test", subset=0.001, workers=1)
    with pytest.raises(ValueError, match="10 classes"):
        make_loaders(good, other, num_classes=3, batch_size=2)
    with pytest.raises(ValueError, match="backend"):
        make_loaders(good, good, num_classes=3, batch_size=2, backend="dali")
    with pytest.raises(ValueError, match="even batch_size"):
        make_loaders(good, good, num_classes=3, batch_size=3, mixup=0.8)
    with pytest.raises(ValueError, match="order must be one of"):
        make_loaders(good, good, num_classes=3, batch_size=2, order="shuffled")
    with pytest.raises(ValueError, match="os_cache=False"):
        make_loaders(good, good, num_classes=3, batch_size=2, order="quasi_random")
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        make_loaders(good, good, num_classes=3, batch_size=2, distributed=True)
    with pytest.raises(ValueError, match="GaussianBlur.*backend 'torchvision'"):
        make_loaders(good, good, num_classes=3, batch_size=2, rand_augment="rand-m9-t3a")


def _ffcv_beton(path: Path, label_field, labels: list, num_classes: int) -> None:
    """A beton written by FFCV's own writer (8x8 images) with a meta that vouches for it, as a user could make."""
    from ffcv.fields import RGBImageField
    from ffcv.writer import DatasetWriter

    class Samples:
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return np.full((8, 8, 3), 10 * i, np.uint8), labels[i]
    DatasetWriter(str(path), {"image": RGBImageField(), "label": label_field}, num_workers=1).from_indexed_dataset(
        Samples())
    meta = {"format": META_FORMAT, "source": {}, "classes": [str(c) for c in range(num_classes)],
            "num_classes": num_classes, "num_samples": len(labels), "class_counts": [], "skipped": [], "options": {},
            "size_bytes": path.stat().st_size, "sha256": file_sha256(path), "seconds": 0}
    meta_path(path).write_text(json.dumps(meta))


@pytest.mark.timeout(120)
def test_float_label_beton_is_an_error_not_a_hang(tmp_path):
    """A FloatField label: refused when the loaders are built; and read anyway (the check bypassed), FFCV's
    pipeline thread fails, which reaches the training process as an error naming the samples instead of a hang."""
    from ffcv.fields import FloatField
    from timm_optdnn.data import DataConfig
    from timm_optdnn.data.ffcv_loaders import FFCVTrainLoader
    beton = tmp_path / "float.beton"
    _ffcv_beton(beton, FloatField(), [float(i % 2) for i in range(8)], 2)
    with pytest.raises(ValueError, match="'label': 'FloatField'.*the loaders read"):
        make_loaders(beton, beton, num_classes=2, batch_size=4)
    train = FFCVTrainLoader(DataConfig(str(beton), str(beton), batch_size=4, num_workers=1, img_size=8),
                            num_classes=2, distributed=False, seed=0, device="cpu")
    with pytest.raises(RuntimeError, match=r"pipeline reading .*float.beton failed on samples \[\d+, \d+, \d+, \d+\]"):
        list(train)


def test_labels_outside_num_classes(tmp_path):
    from ffcv.fields import IntField
    for labels in ([100 + i for i in range(6)], [0, 1, -1, 2]):
        beton = tmp_path / f"labels{labels[0]}.beton"
        _ffcv_beton(beton, IntField(), labels, 10)
        with pytest.raises(ValueError, match=r"label\(s\) outside \[0, 10\)"):
            make_loaders(beton, beton, num_classes=10, batch_size=2)


@pytest.mark.timeout(120)
def test_oversized_images_warn(tmp_path):
    """A 2100x900 photo: the writer warns without --max-side; a loader whose recipe uses 16 px warns that the
    beton's images are far larger than it will ever use."""
    (tmp_path / "src/a").mkdir(parents=True)
    Image.new("RGB", (2100, 900), (50, 100, 150)).save(tmp_path / "src/a/big.jpg")
    beton = tmp_path / "big.beton"
    with pytest.warns(UserWarning, match="1 image.* side over 2048 px .largest 2100x900.*--max-side"):
        write_beton(str(tmp_path / "src"), beton, workers=1)
    with pytest.warns(UserWarning, match="1 of 1 images .* over 4x the 19 px this recipe uses .largest 2100 px."):
        make_loaders(beton, beton, num_classes=1, batch_size=1, img_size=16)


def test_unreadable_folder_is_reported(messy, tmp_path):
    """A class folder the writer may not read: an error naming it, not a class that "holds no files". Root reads
    everything, so the writer runs without the capabilities that let it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    root = tmp_path / "train"
    shutil.copytree(messy, root)
    (root / "b").chmod(0)
    libc = ctypes.CDLL(None, use_errno=True)

    def without_root_reads():
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if os.geteuid() == 0 and libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    try:
        r = subprocess.run([sys.executable, "-m", "timm_optdnn.data.write", str(root), str(tmp_path / "x.beton"),
                            "--workers", "1"], capture_output=True, text=True, preexec_fn=without_root_reads)
    finally:
        (root / "b").chmod(0o755)
    assert r.returncode == 1 and f"1 folder(s) under {root} cannot be read: {root / 'b'} (Permission denied)" \
        in r.stderr, r.stderr
    assert not (tmp_path / "x.beton").exists()


@pytest.mark.timeout(180)
def test_class_emptied_by_undecodable_files(messy, tmp_path):
    """A class whose only file cannot be decoded: an error in both backends (the writer used to store the other
    classes and count this one as 0)."""
    root = tmp_path / "train"
    for c in "ab":
        (root / c).mkdir(parents=True)
    shutil.copy(messy / "c/good.JPEG", root / "a")
    shutil.copy(messy / "c/corrupt.JPEG", root / "b")
    with pytest.raises(ValueError, match="1 class folder.*no decodable image once undecodable files are skipped: b"):
        write_beton(str(root), tmp_path / "x.beton", workers=1)
    with pytest.raises(ValueError, match="1 class folder.*no decodable image once undecodable files are skipped: b"):
        make_loaders(root, root, num_classes=2, backend="torchvision", batch_size=2, num_workers=0)

