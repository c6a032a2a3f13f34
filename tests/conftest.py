import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (e.g. reference_convnext_iso) import by name


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (the CUDA suite, `make gpu-test`) skip where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_loaders(train_path, val_path, *, num_classes, distributed=False, seed=0, device="cpu", **data):
    """create_loaders with the data section's fields as keywords, as the tests were written."""
    from timm_optdnn.data import DataConfig, create_loaders
    return create_loaders(DataConfig(str(train_path), str(val_path), **data), num_classes=num_classes,
                          distributed=distributed, seed=seed, device=device)


@pytest.fixture(scope="session")
def fmnist_betons(tmp_path_factory):
    """Recipe overrides naming small real Fashion-MNIST betons: 1200 training images (18 steps of 2 x 32), 500 test."""
    from timm_optdnn.data import write_beton
    d = tmp_path_factory.mktemp("fmnist")
    write_beton("fashion-mnist", d / "train.beton", split="train", subset=0.02)
    write_beton("fashion-mnist", d / "test.beton", split="test", subset=0.05)
    return [f"data.train_path={d / 'train.beton'}", f"data.val_path={d / 'test.beton'}"]
