"""FFCV data pipeline: real JPEG folders and Fashion-MNIST written to betons, read back through the loaders."""
import ctypes
import ctypes.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv")
# numba prints a KeyError while garbage-collecting FFCV's compiled ctypes wrappers: harmless, not ours
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform  # noqa: E402

from timm_optdnn.data import resolution, write_beton  # noqa: E402
from conftest import make_loaders  # noqa: E402
from timm_optdnn.data.sources import load_rgb, read_fashion_mnist  # noqa: E402
from timm_optdnn.data.write import main  # noqa: E402

CLASSES = ["ant", "bee", "cat"]
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


def photo(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A smooth random RGB picture (JPEG-friendly, unlike white noise)."""
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/<class>/*.JPEG: 3 classes x 4 real JPEGs of 64x48 (q95)."""
    root = tmp_path_factory.mktemp("imagefolder") / "train"
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(4):
            photo(rng, 48, 64).save(root / c / f"{c}_{i}.JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def betons(folder, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("betons")
    paths = {"jpg": out / "jpg.beton", "raw": out / "raw.beton"}
    write_beton(str(folder), paths["jpg"], workers=2)
    write_beton(str(folder), paths["raw"], compress_prob=0.0, workers=1)
    return paths


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    """200 Fashion-MNIST test images through the CLI entry point (in process: no second interpreter start-up)."""
    out = tmp_path_factory.mktemp("fmnist") / "fm_test.beton"
    main(["fashion-mnist", str(out), "--split", "test", "--subset", "0.02", "--workers", "2"])
    return out


@pytest.mark.timeout(120)
def test_writer_meta_and_labels(betons, folder):
    meta = json.loads(Path(f"{betons['jpg']}.meta.json").read_text())
    assert meta["classes"] == CLASSES and meta["num_samples"] == 12 and meta["class_counts"] == [4, 4, 4]
    assert meta["options"]["write_mode"] == "jpg" and meta["skipped"] == []
    assert meta["source"] == {"kind": "imagefolder", "path": str(folder.resolve())}
    assert json.loads(Path(f"{betons['raw']}.meta.json").read_text())["options"]["write_mode"] == "raw"
    assert not list(betons["jpg"].parent.glob(".*tmp*"))  # temporaries renamed away


@pytest.mark.timeout(120)
def test_val_pixels_and_labels_match_source(betons, folder):
    """Raw storage, crop_pct=1 on 48x48 center crops of the 64x48 sources: exact pixels, one label per image."""
    files = sorted(folder.rglob("*.JPEG"))
    for kind, tol in (("raw", 1), ("jpg", 8)):
        _, val = make_loaders(betons[kind], betons[kind], num_classes=3, batch_size=4, num_workers=1,
                                img_size=48, crop_pct=1.0)
        images, labels = map(torch.cat, zip(*val))
        assert labels.dtype == torch.int64 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        ref = torch.stack([torch.from_numpy(np.asarray(load_rgb(f))[:, 8:56].copy()).permute(2, 0, 1) for f in files])
        err = (to_uint8(images).int() - ref.int()).abs().float()
        assert err.max() <= tol if kind == "raw" else err.mean() <= tol, (kind, err.max(), err.mean())


@pytest.mark.timeout(120)
def test_val_center_crop_matches_timm_reference(betons, folder):
    """crop_pct 0.875 at 32 px vs timm's eval transform (resize shorter side to 32/0.875, center crop 32)."""
    _, val = make_loaders(betons["jpg"], betons["jpg"], num_classes=3, batch_size=12, num_workers=1,
                            img_size=32, crop_pct=0.875)
    images, _ = next(iter(val))
    tf = create_transform(32, is_training=False, crop_pct=0.875, interpolation="bilinear")
    ref = torch.stack([tf(load_rgb(f)) for f in sorted(folder.rglob("*.JPEG"))])
    assert images.shape == ref.shape == (12, 3, 32, 32)
    err = (to_uint8(images).float() - to_uint8(ref).float()).abs()
    assert err.mean() < 6, err.mean()  # JPEG re-encode + INTER_AREA vs bilinear resampling


@pytest.mark.timeout(180)
def test_fast_decoders_close_to_stock_ffcv(tmp_path):
    """Real photos (500x375, q90). Val: 0.875 center crop (328 px) to 112 / 64 px, where libjpeg-turbo decodes at
    1/2 / 1/4 scale; both decoders against full decode + box-filter resize of the same crop (PIL). Train: the whole
    photo (a crop every decoder draws the same) bilinearly resized from a 1/2-scale decode, against stock FFCV's
    full decode + INTER_AREA; a certain flip is the exact mirror image."""
    from tools.loader_benchmark import make_photos
    root = make_photos(tmp_path / "train", 8, classes=2)
    write_beton(str(root), tmp_path / "photos.beton", workers=1)
    beton = tmp_path / "photos.beton"
    for res in (112, 64):
        out = {}
        for fast in (False, True):
            _, val = make_loaders(beton, beton, num_classes=2, batch_size=8, num_workers=1, img_size=res,
                                    crop_pct=0.875, fast_decode=fast)
            out[fast] = to_uint8(next(iter(val))[0]).float()
        refs = []
        for f in sorted(root.rglob("*.jpg")):
            im = load_rgb(f)
            c = int(0.875 * min(im.size))
            box = ((im.width - c) // 2, (im.height - c) // 2, (im.width - c) // 2 + c, (im.height - c) // 2 + c)
            refs.append(torch.from_numpy(np.array(im.crop(box).resize((res, res), Image.BOX))).permute(2, 0, 1))
        ref = torch.stack(refs).float()
        stock, fast = (out[False] - ref).abs().mean(), (out[True] - ref).abs().mean()
        assert stock < 3 and fast < 6, (res, stock, fast)  # mean abs error in 0..255 levels
        assert not torch.equal(out[False], out[True])  # the scaled path really ran

    def train_batch(fast: bool, hflip: float) -> torch.Tensor:
        train, _ = make_loaders(beton, beton, num_classes=2, batch_size=8, num_workers=1, img_size=112, hflip=hflip,
                                  scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), order="sequential", fast_decode=fast)
        return to_uint8(next(iter(train))[0]).float()
    fast, stock = train_batch(True, 0.0), train_batch(False, 0.0)
    assert (fast - stock).abs().mean() < 4, (fast - stock).abs().mean()
    assert torch.equal(train_batch(True, 1.0), fast.flip(-1))


def test_region_decode_equals_full_decode(tmp_path):
    """decode_region (our C, libjpeg-turbo's partial decoding) gives the crop of a full decode bit for bit, at every
    DCT scale, for crops touching any edge; errors are return codes, not crashes."""
    from ffcv.libffcv import imdecode
    from tools.loader_benchmark import make_photos
    from timm_optdnn.data.decoders import c_functions
    decode_region = c_functions().decode_region
    files = sorted(make_photos(tmp_path, 4, classes=1).rglob("*.jpg"))
    rng = np.random.default_rng(0)
    for f in files:
        data = np.fromfile(f, np.uint8)
        width, height = Image.open(f).size
        for d in (1, 2, 4, 8):
            sh, sw = -(-height // d), -(-width // d)
            full = np.empty((sh, sw, 3), np.uint8)
            imdecode(data, full, height, width, height, width, 0, 0, 1, d, False, False)
            crops = [(0, 0, sh, sw), (sh - 5, sw - 7, 5, 7), (16 // d, 16 // d, 9, 9)]
            crops += [(y, x, rng.integers(1, sh - y + 1), rng.integers(1, sw - x + 1))
                      for y, x in zip(rng.integers(0, sh, 6), rng.integers(0, sw, 6))]
            for y, x, h, w in crops:
                out = np.zeros((sh, sw, 3), np.uint8)
                shift = decode_region(data.ctypes.data, data.size, d, y, x, h, w, out.ctypes.data, 3 * sw)
                assert 0 <= shift <= x and np.array_equal(out[:h, shift:shift + w], full[y:y + h, x:x + w]), (d, y, x)
    out = np.zeros(64 * 64 * 3, np.uint8)
    assert decode_region(data.ctypes.data, data.size, 1, 0, 0, height + 1, 8, out.ctypes.data, 3 * width) == -2
    junk = np.frombuffer(b"\xff\xd8 not a jpeg" * 10, np.uint8)
    assert decode_region(junk.ctypes.data, junk.size, 1, 0, 0, 8, 8, out.ctypes.data, 24) == -1
    cut = data[: data.size // 3].copy()  # truncated: libjpeg pads with grey and warns, as TurboJPEG does
    assert decode_region(cut.ctypes.data, cut.size, 1, 0, 0, 8, 8, out.ctypes.data, 3 * width) == 0


@pytest.mark.timeout(240)
def test_loader_benchmark_runs_rows_apart_and_rejects_bad_counts(tmp_path, capsys):
    """The benchmark measures each row in a fresh interpreter (here the decode bound and a DeiT-augmented loader on
    4 real photos: images/s and the consuming thread's CPU ms per batch)."""
    from tools.loader_benchmark import _rate, decode_bound, in_fresh_process, main as bench_main, make_photos
    root = make_photos(tmp_path / "photos", 4, classes=1)
    assert in_fresh_process(decode_bound, root, 2) > 0
    write_beton(str(root), tmp_path / "p.beton", workers=1)
    rate, main_ms = in_fresh_process(_rate, str(tmp_path / "p.beton"), dict(
        num_classes=1, batch_size=2, num_workers=1, img_size=32, rand_augment="rand-m9-mstd0.5-inc1", mixup=0.8), 1)
    assert rate > 0 and main_ms > 0
    for flag in ("--repeats", "--images", "--epochs"):
        with pytest.raises(SystemExit):
            bench_main([flag, "0", "--dir", str(tmp_path / "unused")])
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "unused").exists()


@pytest.mark.timeout(120)
def test_fashion_mnist_roundtrip(fmnist):
    images, labels = read_fashion_mnist("test")
    idx = np.sort(np.random.default_rng(0).choice(len(images), 200, replace=False))
    _, val = make_loaders(fmnist, fmnist, num_classes=10, batch_size=64, num_workers=2, img_size=28, crop_pct=1.0)
    got, got_labels = map(torch.cat, zip(*val))
    assert got_labels.tolist() == labels[idx].tolist()
    ref = torch.from_numpy(images[idx]).unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.equal(to_uint8(got), ref)  # raw storage: bit exact
    # both layouts of the normalised batch hold the same values, also where 16 does not divide the pixel count
    for size in (28, 27):
        batches = [next(iter(make_loaders(fmnist, fmnist, num_classes=10, batch_size=64, num_workers=2, img_size=size,
                                            crop_pct=1.0, channels_last=cl)[1]))[0] for cl in (False, True)]
        assert batches[1].is_contiguous(memory_format=torch.channels_last) and batches[0].is_contiguous()
        assert torch.equal(batches[0], batches[1])


@pytest.mark.timeout(180)
def test_train_loader_contract(fmnist):
    kw = dict(num_classes=10, batch_size=16, num_workers=2, img_size=24, scale=(0.35, 1.0), seed=3)
    train, val = make_loaders(fmnist, fmnist, channels_last=True, **kw)
    assert len(train) == 200 // 16 and not train.soft_targets and len(val) == 13
    train.set_epoch(1)
    epoch1 = [(x, y) for x, y in train]
    x, y = epoch1[0]
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and y.shape == (16,)
    assert -3 < x.mean() < 3 and x.std() > 0.3  # normalised
    labels1 = torch.cat([y for _, y in epoch1])
    train.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in train]), labels1)  # order fixed by seed + epoch
    train.set_epoch(2)
    assert not torch.equal(torch.cat([y for _, y in train]), labels1)
    train.set_epoch(1, skip=5)
    tail = [(x, y) for x, y in train]
    assert torch.equal(torch.cat([y for _, y in tail]), labels1[5 * 16:])  # resume = tail of the same epoch
    # crops and flips are seeded too: the tail holds exactly the images of the full epoch, in another loader too
    assert torch.equal(torch.cat([x for x, _ in tail]), torch.cat([x for x, _ in epoch1[5:]]))
    with pytest.raises(ValueError, match="skip=99"):
        train.set_epoch(1, skip=99)
    threads = threading.active_count()
    for i, _ in enumerate(train):  # a trainer stopping mid-epoch (max_steps, preemption)
        if i == 1:
            break
    time.sleep(1.5)  # FFCV's prefetch thread polls its stop flag every 0.5 s
    assert threading.active_count() == threads
    twin, _ = make_loaders(fmnist, fmnist, **kw)  # a new process resuming: the same seeded crops
    twin.set_epoch(1)
    assert torch.equal(next(iter(twin))[0], x)


@pytest.mark.timeout(180)
def test_seeded_crops_follow_the_sample_not_the_batch(fmnist):
    """Crops and flips are a function of (seed, epoch, sample): batch size does not change them; repeated
    augmentation's copies of one sample get different crops."""
    kw = dict(num_classes=10, num_workers=1, img_size=24, scale=(0.35, 1.0), seed=3)
    epochs = {}
    for bs in (16, 8):
        train, _ = make_loaders(fmnist, fmnist, batch_size=bs, **kw)
        train.set_epoch(1)
        epochs[bs] = torch.cat([x for x, _ in train])
    assert torch.equal(epochs[16], epochs[8][: len(epochs[16])])
    train, _ = make_loaders(fmnist, fmnist, batch_size=12, repeated_aug=3, **kw)
    train.set_epoch(0)
    x, y = next(iter(train))  # timm's RepeatAugSampler on one rank: copies a, a, a, b, b, b, ...
    assert y[0] == y[1] == y[2] and not torch.equal(x[0], x[1]) and not torch.equal(x[1], x[2])


@pytest.mark.timeout(180)
def test_train_augment_and_progressive_resizing(fmnist):
    train, _ = make_loaders(fmnist, fmnist, num_classes=10, batch_size=32, num_workers=2, img_size=28,
                              res_schedule=(16, 28, 0, 3), rand_augment="rand-m9-mstd0.5-inc1", re_prob=0.5,
                              mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    assert train.soft_targets
    for epoch, res in [(0, 16), (3, 28)]:  # each new size recompiles the pipeline (seconds): two are enough
        assert resolution(epoch, 16, 28, 0, 3) == res
        train.set_epoch(epoch, skip=len(train) - 1)
        (x, y), = list(train)
        assert x.shape == (32, 3, res, res) and y.shape == (32, 10)
        assert torch.allclose(y.sum(1), torch.ones(32)) and y.min() >= 0.1 / 10 - 1e-6  # smoothed soft targets


def test_freed_batch_memory_is_kept_for_the_next_batch():
    from timm_optdnn.data.process import retain_freed_memory
    assert retain_freed_memory()  # glibc here

    class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2: allocator state, not kernel fault accounting
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    block = 40 << 20  # a batch-sized block, over glibc's default 32 MiB mmap threshold
    before = libc.mallinfo2()
    batch = torch.empty(block, dtype=torch.uint8).fill_(1)
    held = libc.mallinfo2()
    del batch
    freed = libc.mallinfo2()
    # glibc's default serves the block from its own mapping (hblkhd +40 MiB) and unmaps it on free, so the next batch
    # page-faults fresh memory; retained, it comes from the heap and stays there, free, for the next batch
    assert held.hblkhd - before.hblkhd < block
    assert freed.fordblks - held.fordblks >= block


def test_resolution_schedule():
    # linear ramp rounded (half to even, np.round as ffcv-imagenet) to multiples of 32: 169.6 -> 160, 182.4 -> 192
    assert [resolution(e, 160, 192, 10, 20) for e in (0, 10, 13, 17, 20, 30)] == [160, 160, 160, 192, 192, 192]
    assert [resolution(e, 160, 224, 0, 4) for e in range(5)] == [160, 192, 192, 192, 224]  # 176 -> 192, 208 -> 192
    assert [resolution(e, 16, 28, 0, 3) for e in range(4)] == [16, 20, 24, 28]  # tiny images: multiples of 4
    with pytest.raises(ValueError, match="ramp"):
        resolution(0, 16, 28, 5, 2)


@pytest.mark.timeout(180)
def test_torchvision_backend_same_interface(folder):
    train, val = make_loaders(str(folder), str(folder), num_classes=3, backend="torchvision", batch_size=4,
                                num_workers=1, img_size=32, rand_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                                label_smoothing=0.1, res_schedule=(24, 32, 0, 1))
    assert len(train) == 3 and train.soft_targets and len(val) == 3
    train.set_epoch(0)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 24, 24) and y.shape == (4, 3)
    train.set_epoch(1, skip=2)
    assert [x.shape[-1] for x, _ in train] == [32]
    images, labels = map(torch.cat, zip(*val))
    assert images.shape == (12, 3, 32, 32) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.timeout(180)
def test_both_backends_list_the_same_samples(tmp_path):
    """Symlinked folders and files followed, hidden files and folders ignored, a link back up the tree ended: the
    writer and the torchvision backend see the same 8 + 5 images (the writer used to skip a symlinked folder that
    torchvision's ImageFolder followed)."""
    rng, root, extra = np.random.default_rng(1), tmp_path / "train", tmp_path / "extra"
    for folder, n in ((root / "a", 4), (root / "b", 4), (extra, 4), (root / "a/.cache", 1), (root / ".trash", 1)):
        folder.mkdir(parents=True)
        for i in range(n):
            photo(rng, 24, 32).save(folder / f"{i}.jpg")
    photo(rng, 24, 32).save(root / "b/.hidden.jpg")
    (root / "a/more").symlink_to(extra, target_is_directory=True)
    (root / "a/loop").symlink_to(root / "a", target_is_directory=True)
    (root / "b/linked.jpg").symlink_to(root / "a/0.jpg")
    meta = write_beton(str(root), tmp_path / "x.beton", workers=1)
    assert meta["classes"] == ["a", "b"] and meta["class_counts"] == [8, 5]
    train, val = make_loaders(root, root, num_classes=2, backend="torchvision", batch_size=2, num_workers=0,
                              img_size=16)
    assert [label for _, label in train.dataset.samples] == [0] * 8 + [1] * 5
    names = {str(Path(p).relative_to(root)) for p, _ in train.dataset.samples}
    assert {"a/more/0.jpg", "b/linked.jpg"} <= names and not any("/." in f"/{n}" for n in names)


@pytest.mark.timeout(240)
def test_mixup_cutmix_and_their_targets_agree(fmnist):
    """The same seed gives the same crops with and without mixing, so each mixed image can be checked against the
    unmixed batch: Mixup blends sample i with sample B-1-i by one lam per batch, CutMix pastes one box from it, and
    the soft targets carry the same lam (timm's batch mode, label smoothing 0.1)."""
    kw = dict(num_classes=10, batch_size=16, num_workers=2, img_size=24, seed=5, order="sequential")
    plain, _ = make_loaders(fmnist, fmnist, **kw)
    plain.set_epoch(0)
    x0, y0 = next(iter(plain))
    j = torch.arange(15, -1, -1)  # the partner of each sample
    smooth = lambda y: torch.full((16, 10), 0.01).scatter_(1, y[:, None], 0.91)  # noqa: E731
    for mix in (dict(mixup=0.8), dict(cutmix=1.0)):
        train, _ = make_loaders(fmnist, fmnist, label_smoothing=0.1, **mix, **kw)
        train.set_epoch(0)
        x, targets = next(iter(train))
        if "mixup" in mix:
            a, b = (x0 - x0[j]).flatten(1), (x - x0[j]).flatten(1)
            lam = float((a * b).sum() / (a * a).sum())
            assert torch.allclose(x, lam * x0 + (1 - lam) * x0[j], atol=1e-5)
        else:
            inside = (x != x0).flatten(0, 1).any(0)  # where any image took its partner's pixels: one box for all
            rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
            box = torch.zeros_like(inside)
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
            assert torch.equal(torch.where(box, x0[j], x0), x)
            lam = 1 - float(box.sum()) / box.numel()
        assert 0 < lam < 1
        assert torch.allclose(targets, lam * smooth(y0) + (1 - lam) * smooth(y0[j]), atol=1e-6), mix


@pytest.mark.timeout(240)
def test_library_leaves_the_process_as_it_found_it(fmnist):
    """A fresh process: importing the library, building FFCV loaders with the DeiT augmentations and reading an
    epoch changes none of the process-wide settings: torch's and numba's threads (FFCV sets both), OpenCV's
    threads, timm's RandAugment op table, glibc's allocator. setup_process() is the one call that changes some."""
    script = f"""
import ctypes, ctypes.util, json, threading
import numba, torch
from timm.data import auto_augment

libc, cv = ctypes.CDLL(None), ctypes.CDLL(ctypes.util.find_library("opencv_core"))
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t)
                for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo2

def settings():
    new_thread = []
    t = threading.Thread(target=lambda: new_thread.append(torch.get_num_threads()))
    t.start(), t.join()
    before = libc.mallinfo2().hblkhd
    block = torch.empty(40 << 20, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd > before  # glibc's default: a block this big gets its own mapping
    del block
    return dict(torch=torch.get_num_threads(), new_thread=new_thread[0], numba=numba.get_num_threads(),
                opencv=cv.cvGetNumThreads(), ops={{k: v.__name__ for k, v in auto_augment.NAME_TO_OP.items()}},
                big_blocks_mapped=mapped)

found = settings()
from timm_optdnn.data import DataConfig, create_loaders, setup_process
train, val = create_loaders(DataConfig("{fmnist}", "{fmnist}", batch_size=32, num_workers=2, img_size=24,
                                       rand_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup=0.8, cutmix=1.0),
                            num_classes=10)
train.set_epoch(0)
n = sum(len(x) for x, _ in train) + sum(len(x) for x, _ in val)
after = settings()
setup_process()
print(json.dumps(dict(found=found, after=after, setup=settings(), n=n)))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=220)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == 192 + 200 and out["after"] == out["found"], out
    assert out["found"]["opencv"] > 1 and out["found"]["big_blocks_mapped"]  # so that the check could fail
    assert out["setup"]["opencv"] == 1 and not out["setup"]["big_blocks_mapped"]


@pytest.mark.parametrize("ffcv_first", [False, True])
def test_setup_process_neither_imports_ffcv_nor_starts_numba_threads(ffcv_first):
    """setup_process() as a process's first data call (the model benchmark's, the torchvision backend's) leaves
    torch's threads as they were and starts no numba thread pool: FFCV's import starts one (and sets torch to 1
    thread), and a fork after that, such as a DataLoader worker's, makes numba's TBB layer print a warning. The
    process that imports FFCV first shows what the check catches."""
    script = ("import os, sys, torch; torch.set_num_threads(2)\n" + ("import ffcv\n" if ffcv_first else "") +
              "from timm_optdnn.data import setup_process; setup_process()\n"
              "print(torch.get_num_threads(), 'ffcv' in sys.modules, flush=True)\n"
              "pid = os.fork()\n"
              "os._exit(0) if pid == 0 else os.waitpid(pid, 0)")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    warned = "Unable to join threads" in r.stdout + r.stderr
    assert (r.stdout.split()[:2], warned) == ((["1", "True"], True) if ffcv_first else (["2", "False"], False))


@pytest.mark.timeout(240)
def test_device_feed_path_on_the_cpu(fmnist, monkeypatch):
    """The pipelines a CUDA device gets (stages writing into FFCV's buffers, FFCV's ToDevice last), run with the CPU
    as the device: the same batches as the CPU pipelines (the GPU suite compares with a real device)."""
    from ffcv.transforms import ToDevice
    from timm_optdnn.data import ffcv_loaders
    kw = dict(num_classes=10, batch_size=32, num_workers=2, img_size=24, seed=2, channels_last=True,
              rand_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    batches = {}
    for via_buffers in (False, True):
        if via_buffers:
            monkeypatch.setattr(ffcv_loaders, "to_device", lambda device: [ToDevice(torch.device("cpu"))])
        train, val = make_loaders(fmnist, fmnist, **kw)
        train.set_epoch(1)
        batches[via_buffers] = [(x.clone(), y.clone()) for loader in (train, val) for x, y in loader]
    assert len(batches[True]) == len(batches[False]) == 6 + 7
    for (x, y), (xb, yb) in zip(batches[False], batches[True]):
        assert torch.equal(x, xb) and torch.equal(y, yb)
