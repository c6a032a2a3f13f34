"""The trainer on CUDA (`pytest -m gpu`, `make gpu-test`; skipped without a CUDA device): a short real run through
the deepspeed launcher on 1 GPU (2 ranks where 2 GPUs exist) with EMA, bf16 autocast and ZeRO-1, preempted by
max_steps, resumed to its end, exported, and the export reloaded on the GPU scoring what the run measured.

The data is a folder of real JPEGs written here, read by the torchvision backend, so neither FFCV nor the
Fashion-MNIST package is needed (a GPU machine often has neither). Needs DeepSpeed (skipped, naming it, if absent).
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.gpu

CLASSES, PER_CLASS, SIZE = 4, 48, 32


def jpeg_folder(root: Path, per_class: int, seed: int) -> Path:
    """CLASSES class folders of SIZE x SIZE JPEGs: a class is a colour, with noise and a random bright square."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(colours[c] + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255)
            x, y = rng.integers(0, SIZE - 8, 2)
            img[y:y + 8, x:x + 8] = 255
            Image.fromarray(img.astype(np.uint8)).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


def launcher(nproc: int) -> list:
    """`deepspeed` on the first `nproc` visible GPUs (it ignores CUDA_VISIBLE_DEVICES when given --num_gpus)."""
    from timm_optdnn.training.launch import free_port
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port())]
    return cmd if os.environ.get("CUDA_VISIBLE_DEVICES") else cmd + ["--num_gpus", str(nproc)]


def launch_env(nproc: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if env.get("CUDA_VISIBLE_DEVICES"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(env["CUDA_VISIBLE_DEVICES"].split(",")[:nproc])
    return env


@pytest.mark.timeout(300)
def test_bf16_ema_run_checkpoints_resumes_and_exports_on_cuda(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    import timm
    from timm_optdnn.training.config import load_config
    from timm_optdnn.training.export import export
    from timm_optdnn.training.run_dir import RunDir
    from timm_optdnn.training.trainer import create_loaders_for, evaluate
    nproc = min(2, torch.cuda.device_count())
    train, val = jpeg_folder(tmp_path / "train", PER_CLASS, 0), jpeg_folder(tmp_path / "val", 16, 1)
    out = tmp_path / "run"
    recipe = ["model.name=optdnn_apg2_convnext_iso_fm", "model.kwargs={dim: 64, depth: 4}",
              f"model.num_classes={CLASSES}", "model.ema=true", "model.ema_decay=0.9",
              "data.backend=torchvision", f"data.train_path={train}", f"data.val_path={val}", f"data.img_size={SIZE}",
              "data.crop_pct=1.0", "data.batch_size=16", "data.val_batch_size=32", "data.num_workers=2",
              "optim.lr=2e-3", "schedule.epochs=3", "schedule.warmup_epochs=0.5",
              "dist.precision=bf16", "dist.zero_stage=1", "dist.device=cuda", "dist.timeout_s=120",
              "run.ckpt_every_steps=2", "run.log_every_steps=2", f"run.out_dir={out}", "run.resume=auto"]
    cmd = [*launcher(nproc), "--module", "timm_optdnn.training", *recipe]
    steps_per_epoch = CLASSES * PER_CLASS // (16 * nproc)
    total = 3 * steps_per_epoch

    first = subprocess.run([*cmd, f"schedule.max_steps={steps_per_epoch + 1}"], cwd=ROOT, env=launch_env(nproc),
                           capture_output=True, text=True, timeout=200)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "ZeRO-1 bf16 on cuda:0" in first.stdout
    run = RunDir(out)
    assert json.loads(run.result.read_text())["status"] == "max_steps"
    second = subprocess.run(cmd, cwd=ROOT, env=launch_env(nproc), capture_output=True, text=True, timeout=200)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert f"resumed from {run.checkpoint(f'step{steps_per_epoch + 1:08d}')}" in second.stdout

    result = json.loads(run.result.read_text())
    assert result["status"] == "finished" and result["step"] == total
    assert result["compute_dtype"] == "torch.bfloat16" and result["peak_mem_mb"] > 0
    assert [int(r["step"]) for r in csv.DictReader(run.steps.open())] == list(range(1, total + 1))
    state = run.client_state()
    assert {v.dtype for v in state["module"].values()} == {v.dtype for v in state["ema"].values()} == {torch.float32}

    cfg = load_config(None, recipe)
    for ema, key in ((False, "top1"), (True, "ema_top1")):
        weights = export(out, tmp_path / f"w_{ema}.safetensors", ema=ema)
        model = timm.create_model(cfg.model.name, pretrained=True, num_classes=CLASSES, **cfg.model.kwargs,
                                  pretrained_cfg_overlay=dict(file=str(weights))).cuda()
        _, val_loader = create_loaders_for(cfg, model, device=torch.device("cuda"))
        top1 = evaluate(model, val_loader, torch.device("cuda"), autocast=torch.bfloat16)["top1"]
        # one process instead of nproc, other batch shapes: bf16 kernels may round a near tie differently
        assert top1 == pytest.approx(result["last"][key], abs=2 * 100 / (CLASSES * 16) + 1e-9)
