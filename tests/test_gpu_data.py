"""The FFCV loaders feeding a CUDA device (`make gpu-test`; skipped without CUDA, and without FFCV, which builds
against system libjpeg-turbo and OpenCV). Every random draw of the pipeline is seeded per sample, so the batches
FFCV's ToDevice delivers must equal, bit for bit, those of the same loaders on the CPU: through the DeiT
augmentations, two epochs, a change of resolution, both layouts, and the consumer's own stream at work."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]
pytest.importorskip("ffcv", reason="the FFCV backend needs ffcv (pip install ffcv, with libturbojpeg and OpenCV)")
from timm_optdnn.data import DataConfig, create_loaders, write_beton  # noqa: E402

DEIT = dict(rand_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1)


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    from tools.loader_benchmark import make_photos
    root = tmp_path_factory.mktemp("gpu")
    make_photos(root / "train", 96, classes=4)
    path = root / "photos.beton"
    write_beton(str(root / "train"), path, max_side=256, compress_prob=0.5, workers=2)
    return path


def _epochs(train, epochs, check=lambda x, y: None) -> list:
    out = []
    for epoch in epochs:
        train.set_epoch(epoch)
        for x, y in train:
            check(x, y)
            out.append((x.cpu(), y.cpu()))  # copies on the consumer's stream: it must see FFCV's copy finished
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("channels_last", [True, False])
def test_cuda_batches_equal_cpu_batches(beton, channels_last):
    cfg = DataConfig(str(beton), str(beton), batch_size=16, num_workers=4, img_size=64, res_schedule=[48, 64, 0, 1],
                     channels_last=channels_last, **DEIT)
    (cpu_train, cpu_val), (gpu_train, gpu_val) = (create_loaders(cfg, num_classes=4, seed=3, device=device)
                                                  for device in ("cpu", torch.device("cuda", 0)))

    def on_device(x, y):
        assert x.device.type == y.device.type == "cuda" and x.dtype == y.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        busy = torch.randn(2048, 2048, device=x.device)
        for _ in range(8):  # the consumer's stream kept busy: FFCV must not reuse a buffer this work still reads
            busy = busy @ busy / 2048 + x.mean()

    cpu, gpu = _epochs(cpu_train, (0, 1)), _epochs(gpu_train, (0, 1), on_device)
    assert len(cpu) == len(gpu) == 2 * (96 // 16) and {x.shape[-1] for x, _ in gpu} == {48, 64}
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert torch.equal(xc, xg) and torch.equal(yc, yg)
    for (xc, yc), (xg, yg) in zip(cpu_val, gpu_val):
        assert xg.is_cuda and yg.dtype == torch.int64 and torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


@pytest.mark.timeout(300)
def test_cuda_hard_labels_and_resume(beton):
    """Without Mixup / smoothing: int64 labels on the device; a resumed epoch (skip) is the tail of the full one."""
    cfg = DataConfig(str(beton), str(beton), batch_size=16, num_workers=4, img_size=64,
                     rand_augment=DEIT["rand_augment"])
    train, _ = create_loaders(cfg, num_classes=4, seed=1, device="cuda")
    full = _epochs(train, (2,))
    train.set_epoch(2, skip=2)
    tail = [(x.cpu(), y.cpu()) for x, y in train]
    assert full[0][1].dtype == torch.int64 and len(tail) == len(full) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], tail))
