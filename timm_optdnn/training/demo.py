"""The main job (`make demo`): Fashion-MNIST betons -> DeepSpeed training of a small OptDNN-APG2 model on 2 CPU
ranks -> eval -> export to safetensors -> reload with timm.create_model -> re-eval -> one-line report.

    python -m timm_optdnn.training.demo                   # APG2 model of configs/demo.yaml
    python -m timm_optdnn.training.demo --compare         # + its GD twin, same recipe and budget, side by side
    python -m timm_optdnn.training.demo schedule.epochs=2 # recipe overrides pass through to the trainer

Each model's run goes to <out>/<model>; a previous demo run there is replaced (said on the console).
The last line printed is `demo: model=<name> top1=<float>% params=<M>M gflops=<G> train_img_s=<float> wall_s=<float>`
(with --compare, one such line per model, APG2 last).
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from .config import CONFIG_DIR, TrainConfig, load_config
from .launch import free_port
from .run_dir import RunDir


def write_data(data_dir: Path) -> List[str]:
    """Both Fashion-MNIST splits as betons (from the Debian package's IDX files; no download): recipe overrides."""
    from timm_optdnn.data import write_beton
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train_path": data_dir / "fashion_mnist_train.beton", "val_path": data_dir / "fashion_mnist_test.beton"}
    for (key, path), split in zip(paths.items(), ("train", "test")):
        write_beton("fashion-mnist", path, split=split, overwrite=True)
    return [f"data.{key}={path}" for key, path in paths.items()]


def launch(config: Path, overrides: List[str], nproc: int) -> None:
    """`deepspeed --num_gpus N --module timm_optdnn.training`, the launcher a GPU node uses (CPU ranks: gloo)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(free_port()), "--module", "timm_optdnn.training", "--config", str(config), *overrides]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def reload_and_eval(weights: Path, cfg: TrainConfig) -> float:
    """Top-1 of the exported file loaded the way a user would, on one process."""
    import timm
    import timm_optdnn  # noqa: F401
    from .trainer import create_loaders_for, evaluate
    model = timm.create_model(cfg.model.name, pretrained=True, num_classes=cfg.model.num_classes,
                              pretrained_cfg_overlay=dict(file=str(weights)), **cfg.model.kwargs)
    _, val = create_loaders_for(cfg, model)
    return evaluate(model, val, torch.device("cpu"))["top1"]


def gflops(cfg: TrainConfig) -> float:
    from timm_optdnn.flops import count
    return count(cfg.model.name, img_size=cfg.data.img_size, num_classes=cfg.model.num_classes, **cfg.model.kwargs)[0]


def run_one(model: str, args, data: List[str], t_start: float) -> Dict[str, Any]:
    from .export import export
    run = RunDir(Path(args.out) / model)
    overrides = [*data, f"model.name={model}", f"run.out_dir={run.path}", "run.resume=none", *args.overrides]
    cfg = load_config(str(args.config), overrides)  # checked here, before the launcher starts
    if run.is_run():
        print(f"demo: replacing the previous demo run in {run.path}", flush=True)
        shutil.rmtree(run.path)
    launch(args.config, overrides, args.nproc)
    result = json.loads(run.result.read_text())
    weights = export(run.path, Path(args.out) / f"{model}.safetensors")
    top1, reload_top1 = result["last"]["top1"], reload_and_eval(weights, cfg)
    if abs(top1 - reload_top1) > 0.05:
        raise RuntimeError(f"reloaded {weights} scores {reload_top1:.2f}% but the run measured {top1:.2f}%")
    return dict(model=model, top1=top1, reload_top1=reload_top1, ema_top1=result["last"].get("ema_top1"),
                params=result["params"] / 1e6, gflops=gflops(cfg), train_img_s=result["train_img_s"],
                train_s=result["train_s"], epochs=result["last"]["epoch"], steps=result["step"],
                peak_mem_mb=result["peak_mem_mb"], coef=result["scheme_coefficients"], weights=str(weights),
                wall_s=time.time() - t_start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIG_DIR / "demo.yaml")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks")
    p.add_argument("--compare", action="store_true", help="also train the GD twin and print both")
    p.add_argument("overrides", nargs="*", help="section.key=value recipe overrides")
    args = p.parse_args(argv)
    apg2 = load_config(str(args.config), args.overrides).model.name
    models = [apg2.replace("optdnn_apg2_", "optdnn_gd_"), apg2] if args.compare else [apg2]

    t0 = time.time()
    data = write_data(Path(args.out) / "data")
    print(f"data: Fashion-MNIST betons written in {time.time() - t0:.1f} s", flush=True)
    results = []
    for model in models:
        t_model = t0 if model == models[0] else time.time()  # each model's wall time: its own data-to-report span
        results.append(run_one(model, args, data, t_model))

    print("\n| model | val top-1 (DeepSpeed eval) | top-1 reloaded | params | GFLOPs | train img/s | epochs | "
          "train s | wall s |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['top1']:.2f}% | {r['reload_top1']:.2f}% | {r['params']:.3f}M | {r['gflops']:.4f} | "
              f"{r['train_img_s']:.0f} | {r['epochs']} | {r['train_s']:.0f} | {r['wall_s']:.0f} |")
    for r in results:
        if r["coef"]:
            print(f"{r['model']} learned coefficients: {r['coef']}")
        print(f"weights: {r['weights']}")
    for r in results:
        print(f"demo: model={r['model']} top1={r['top1']:.2f}% params={r['params']:.3f}M gflops={r['gflops']:.4f} "
              f"train_img_s={r['train_img_s']:.1f} wall_s={r['wall_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
