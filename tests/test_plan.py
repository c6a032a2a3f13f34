"""--plan and --plan --measure: the plan's arithmetic from a given measurement, and a real measurement of a tiny
recipe on this machine's device (CPU here, the GPU where there is one)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_optdnn.training.config import load_config
from timm_optdnn.training.plan import Measured, States, plan

ROOT = Path(__file__).resolve().parent.parent
# the demo recipe at tiny width, progressive resizing 20 -> 28 px, EMA on: two resolutions, every state counted
TINY = ["model.kwargs={dim: 32, depth: 3}", "data.batch_size=16", "optim.grad_accum=2", "schedule.epochs=2",
        "data.res_schedule=[20,28,0,1]", "model.ema=true", "plan.nodes=2", "plan.gpus_per_node=4"]


def tiny(*extra: str):
    return load_config(str(ROOT / "configs" / "demo.yaml"), [*TINY, *extra])


def test_measured_plan_extrapolates_from_the_measurement(fmnist_betons):
    cfg = tiny(*fmnist_betons)
    gib = 2 ** 30
    m = Measured("a device", 5, {20: 1000.0, 28: 500.0}, peak_bytes=3 * gib, states=States(gib // 4, gib // 4,
                                                                                              gib // 2, 0))
    p = plan(cfg, m)
    assert (p["world"], p["global_batch"], p["train_samples"], p["steps_per_epoch"]) == (8, 256, 1200, 4)
    # epoch 1 at 20 px, epoch 2 at 28 px; 8 devices, each at the measured rate
    assert p["wall_h"] * 3600 == pytest.approx(1024 / (8 * 1000) + 1024 / (8 * 500))
    assert p["gpu_h"] == pytest.approx(p["wall_h"] * 8)
    assert p["memory_gib"] == pytest.approx(2.0 + p["model_state_gib"])  # measured activations + ZeRO's states
    # ZeRO-1 (the demo recipe's) over 8 ranks: weights and gradients whole, optimizer state + fp32 weights sharded
    assert p["model_state_gib"] == pytest.approx(0.25 + 0.25 + (0.5 + 0.25) / 8)
    # achieved TFLOP/s in the devices' convention: 3 x forward multiply-adds x 2 FLOPs each
    from timm_optdnn.flops import count
    gflops28 = count("optdnn_apg2_convnext_iso_fm", img_size=28, num_classes=10, dim=32, depth=3)[0]
    assert p["achieved_tflops"][28] == pytest.approx(500 * 3 * gflops28 * 2 / 1e3)


def test_assumed_plan_is_the_labelled_fallback(fmnist_betons):
    cfg = tiny(*fmnist_betons, "plan.peak_tflops=100", "plan.utilization=0.5")
    p = plan(cfg)
    assert not p["measured"] and p["memory_gib"] is None
    seconds = p["train_pflop"] * 1e15 * 2 / (8 * 100e12 * 0.5)  # fvcore FLOPs are multiply-adds: x 2 for peaks
    assert p["wall_h"] * 3600 == pytest.approx(seconds)


MEASURE = """import json, sys
from timm_optdnn.training.config import load_config
from timm_optdnn.training.plan import measure
m = measure(load_config(sys.argv[1], sys.argv[2:]), steps=2, warmup=1)
print(json.dumps(dict(img_s=m.img_s, peak=m.peak_bytes, states=m.states, activations=m.activation_bytes,
                      device=m.device)))"""


@pytest.mark.timeout(300)
def test_measure_runs_the_recipe_steps_on_this_device():
    """A real measurement: both resolutions timed; the model states it reports are exactly the tensors of
    AdamW training with an EMA copy (weights, gradients, two moments, EMA: 5 x 4 bytes per parameter). In a fresh
    process: on CPU the peak is the growth of the resident memory, which a process that freed memory before hides."""
    import timm
    r = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT / "configs" / "demo.yaml"), *TINY], cwd=ROOT,
                       capture_output=True, text=True, timeout=280, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout)
    assert set(m["img_s"]) == {"20", "28"} and all(v > 0 for v in m["img_s"].values())
    tensors = list(timm.create_model("optdnn_apg2_convnext_iso_fm", num_classes=10, dim=32, depth=3).parameters())
    params = sum(p.numel() for p in tensors)
    assert m["states"] == [4 * params, 4 * params, 8 * params + 4 * len(tensors), 4 * params]  # + AdamW's steps
    assert m["peak"] > sum(m["states"]) and m["activations"] > 0
    assert m["device"].startswith("cpu" if not torch.cuda.is_available() else "NVIDIA")


@pytest.mark.timeout(300)
def test_cli_plan_measure(fmnist_betons):
    r = subprocess.run([sys.executable, "-m", "timm_optdnn.training", "--config", "configs/demo.yaml", "--plan",
                        "--measure", *TINY, *fmnist_betons], cwd=ROOT, capture_output=True, text=True, timeout=280,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "2 node(s) x 4 GPUs = 8 ranks" in out and "16 per GPU x accum 2 = 256 global" in out
    assert "measured on         cpu" in out or "measured on         NVIDIA" in out
    assert "img/s at 20 px" in out and "img/s at 28 px" in out and "activations (measured)" in out
    assert "(measured img/s x ranks; data loading and communication not included)" in out
    assert "ASSUMED" not in out


def test_cuda_training_settings_are_restored():
    from timm_optdnn.training.trainer import cuda_training_settings
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    with cuda_training_settings():
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == ("high", True)
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before


def test_zero_shards_the_states_as_deepspeed_does():
    s = States(params=400, grads=400, optimizer=800, ema=400)
    assert s.per_gpu(0, 4, 10) == 2000  # plain data parallel: everything on every GPU
    assert s.per_gpu(1, 4, 10) == 400 + 400 + (800 + 400) / 4 + 400  # optimizer state + fp32 weight copy sharded
    assert s.per_gpu(2, 4, 10) == 400 + (800 + 400 + 400) / 4 + 400  # and the gradients
    assert s.per_gpu(3, 4, 10) == 40 + (400 + 800 + 400 + 400) / 4 + 400  # and the weights, one layer gathered
