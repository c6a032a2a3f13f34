"""Two real gloo ranks: train shards are disjoint up to the sampler's padding and cover the dataset every epoch;
val shards are disjoint, unpadded and cover it exactly once. 41 classes of one image each, so label = sample id."""
import json
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from PIL import Image

pytest.importorskip("ffcv")
# numba prints a KeyError while garbage-collecting FFCV's compiled ctypes wrappers: harmless, not ours
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
from timm_optdnn.data import write_beton  # noqa: E402
from conftest import make_loaders  # noqa: E402

N = 41


def _rank(rank: int, port: int, folder: str, beton: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    seen = {}
    for backend, path, workers in (("ffcv", beton, 1), ("torchvision", folder, 0)):
        train, val = make_loaders(path, path, num_classes=N, backend=backend, batch_size=4, num_workers=workers,
                                    img_size=16, drop_last=False, distributed=True, seed=7)
        for epoch in (0, 1):
            train.set_epoch(epoch)
            seen[f"{backend}_train{epoch}"] = [t for _, y in train for t in y.tolist()]
        seen[f"{backend}_val"] = [t for _, y in val for t in y.tolist()]
        train, _ = make_loaders(path, path, num_classes=N, backend=backend, batch_size=4, num_workers=workers,
                                  img_size=16, drop_last=False, distributed=True, seed=7, repeated_aug=3)
        for epoch in (0, 1):
            train.set_epoch(epoch)
            seen[f"{backend}_repeat{epoch}"] = [t for _, y in train for t in y.tolist()]
        train.set_epoch(1, skip=2)  # resumed 2 batches into epoch 1: the order is recomputed from seed + epoch
        seen[f"{backend}_repeat1_resumed"] = [t for _, y in train for t in y.tolist()]
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_rank_sharding(tmp_path):
    folder = tmp_path / "train"
    rng = np.random.default_rng(0)
    for i in range(N):
        (folder / f"c{i:02d}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"c{i:02d}/x.jpg")
    beton = tmp_path / "ids.beton"
    write_beton(str(folder), beton, workers=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp_mp.spawn(_rank, args=(port, str(folder), str(beton), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for backend in ("ffcv", "torchvision"):
        for epoch in (0, 1):
            a, b = r0[f"{backend}_train{epoch}"], r1[f"{backend}_train{epoch}"]
            assert len(a) == len(b) == 21  # 41 padded to 42 by repeating one sample, as DistributedSampler does
            assert set(a) | set(b) == set(range(N)) and len(set(a) & set(b)) <= 1
        assert r0[f"{backend}_train0"] != r0[f"{backend}_train1"]  # a new order each epoch
        va, vb = r0[f"{backend}_val"], r1[f"{backend}_val"]
        assert sorted(va + vb) == list(range(N)) and {len(va), len(vb)} == {20, 21}  # each sample exactly once
    assert r0["ffcv_train0"] == r0["torchvision_train0"]  # same sampler, same seed: the backends agree on the order
    # repeated augmentation (timm's RepeatAugSampler, 3 repeats): 41 x 3 copies dealt round-robin to the 2 ranks,
    # each rank's share cut to ceil(41 / 2) = 21 (the epoch keeps the dataset's length): the first 14 samples of
    # the epoch's permutation, 3 copies each, every one on both ranks
    for backend in ("ffcv", "torchvision"):
        for epoch in (0, 1):
            a, b = r0[f"{backend}_repeat{epoch}"], r1[f"{backend}_repeat{epoch}"]
            assert len(a) == len(b) == 21
            counts = Counter(a + b)
            assert len(counts) == 14 and set(counts.values()) == {3}
            assert set(a) == set(b)
        assert set(r0[f"{backend}_repeat0"]) != set(r0[f"{backend}_repeat1"])  # other samples next epoch
        for r in (r0, r1):
            assert r[f"{backend}_repeat1_resumed"] == r[f"{backend}_repeat1"][2 * 4:]
    assert r0["ffcv_repeat0"] == r0["torchvision_repeat0"] and r1["ffcv_repeat1"] == r1["torchvision_repeat1"]
