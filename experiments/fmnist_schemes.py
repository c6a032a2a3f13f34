"""gd, hb, nag and apg2 on real images: the demo recipe (configs/demo.yaml) on Fashion-MNIST, 3 seeds each.

Every run is the real trainer (`deepspeed --module timm_optdnn.training`, 2 CPU ranks, as in `make demo`) on
the same network, `optdnn_apg2_convnext_iso_fm` with its scheme overridden, so all four schemes have the
same multiply-adds (the `gflops` above the table) and parameters up to one coefficient per block. The
budget is compressed to fit the grid into 15 minutes on 2 cores: `--epochs` over a `--subset` of the
60,000 training images, the demo's warmup scaled with it. Reported per run: test top-1 on all 10,000 test
images and the learned coefficients (t_k for apg2, m_k for hb/nag). The PNG shows top-1 per scheme and
the coefficients across depth. `--quick` is the CI smoke run: 1,200 training and 500 test images, one
seed, each run on one rank inside this process.

    python -m experiments.fmnist_schemes [--quick] [--out DIR] [--runs DIR] [--epochs E] [--subset F]
"""
import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib.pyplot as plt
from timm_optdnn.training.config import CONFIG_DIR, load_config
from timm_optdnn.training.demo import launch
from timm_optdnn.training.run_dir import RunDir
from timm_optdnn.training.trainer import main as train_here

from timm_optdnn.data import write_beton
from timm_optdnn.flops import count
from timm_optdnn.models.schemes import SCHEMES, init_coefficients
from .common import COLORS, SEEDS, save_figure, summary_table, write_csv

NAME = "fmnist_schemes"
MODEL = "optdnn_convnext_iso_fm"  # the scheme-neutral name: model.kwargs picks the scheme
RECIPE = CONFIG_DIR / "demo.yaml"
FULL = dict(seeds=SEEDS[:3], subset=0.5, test_subset=None)
QUICK = dict(seeds=SEEDS[:1], subset=0.02, test_subset=0.05)


def run_dir(runs: Path, scheme: str, seed: int) -> Path:
    return runs / f"{scheme}_s{seed}"


def train_one(overrides: List[str], in_process: bool) -> None:
    """One run of the demo recipe with `overrides`: 2 ranks through the deepspeed launcher, or 1 rank here."""
    # a launch costs ~30 CPU s of start-up per rank (imports, numba, DeepSpeed), so 4 would not fit --quick's
    # minute; in-process, this process keeps DeepSpeed's process group afterwards
    if in_process:
        code = train_here(load_config(str(RECIPE), overrides))
        if code:
            raise SystemExit(f"training with {overrides} failed (exit code {code})")
    else:
        launch(RECIPE, overrides, nproc=2)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, 1,200 images, in this process: the CI smoke run")
    p.add_argument("--out", type=Path, default=Path("results"), help=f"directory for {NAME}.csv and {NAME}.png")
    p.add_argument("--runs", type=Path, default=Path("runs") / NAME, help="betons and one trainer out_dir per run")
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (the demo's 8 take ~90 min for the grid)")
    p.add_argument("--subset", type=float, help="fraction of the training images (default 0.5; --quick 0.02)")
    args = p.parse_args(argv)
    mode = dict(QUICK if args.quick else FULL, **({} if args.subset is None else dict(subset=args.subset)))
    out, runs = args.out.resolve(), args.runs.resolve()  # the launcher runs the trainer from the repository root
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)

    demo = load_config(str(RECIPE))
    common = [f"model.name={MODEL}", f"data.train_path={runs / 'train.beton'}", f"data.val_path={runs / 'test.beton'}",
              f"schedule.epochs={args.epochs}",
              f"schedule.warmup_epochs={demo.schedule.warmup_epochs * args.epochs / demo.schedule.epochs}"]
    load_config(str(RECIPE), common)  # a bad --epochs fails now, not after the data is written
    t0 = time.perf_counter()
    meta = write_beton("fashion-mnist", runs / "train.beton", split="train", subset=mode["subset"], overwrite=True)
    write_beton("fashion-mnist", runs / "test.beton", split="test", subset=mode["test_subset"], overwrite=True)
    gflops = {s: count(MODEL, img_size=demo.data.img_size, num_classes=demo.model.num_classes, scheme=s)[0]
              for s in SCHEMES}

    rows: List[Dict[str, Any]] = []
    todo = [(s, seed) for s in SCHEMES for seed in mode["seeds"]]
    for i, (scheme, seed) in enumerate(todo):
        run = run_dir(runs, scheme, seed)
        shutil.rmtree(run, ignore_errors=True)  # the recipe's run.resume=none refuses an existing run: a fresh grid
        t_run = time.perf_counter()
        train_one(common + [f"model.kwargs={{scheme: {scheme}}}", f"run.seed={seed}", f"run.out_dir={run}"],
                  in_process=args.quick)
        result = json.loads(RunDir(run).result.read_text())
        rows.append(dict(scheme=scheme, seed=seed, epochs=args.epochs, train_images=meta["num_samples"],
                         gflops=gflops[scheme], params=result["params"], top1=result["last"]["top1"],
                         train_s=round(result["train_s"], 1), wall_s=round(time.perf_counter() - t_run, 1),
                         coef=" ".join(f"{c:.3f}" for c in result["scheme_coefficients"])))
        write_csv(out / f"{NAME}.csv", rows)  # after every run: an interrupted grid keeps what it finished
        print(f"[{i + 1}/{len(todo)}] {scheme} seed {seed}: top1 {rows[-1]['top1']:.2f}% "
              f"in {rows[-1]['wall_s']:.0f} s", flush=True)

    print(f"\n{NAME}: {len(rows)} runs in {time.perf_counter() - t0:.0f} s wall, wrote {out / NAME}.csv\n")
    print(summary_table(rows, metric_keys=["params", "top1", "train_s", "wall_s"]))
    save_figure(plot(rows), out, NAME)
    return rows


def plot(rows: List[Dict[str, Any]]) -> plt.Figure:
    """Top-1 per scheme (each seed a dot, mean +- std a bar), then the learned coefficients across depth."""
    fig, (ax_acc, ax_t, ax_m) = plt.subplots(1, 3, figsize=(13, 3.8))
    for x, scheme in enumerate(SCHEMES):
        top1 = [r["top1"] for r in rows if r["scheme"] == scheme]
        std = statistics.stdev(top1) if len(top1) > 1 else 0.0
        ax_acc.errorbar(x, statistics.fmean(top1), yerr=std, fmt="_", ms=20, capsize=6, color=COLORS[scheme])
        ax_acc.scatter([x] * len(top1), top1, s=14, color=COLORS[scheme])
    ax_acc.set_xticks(range(len(SCHEMES)), SCHEMES)
    ax_acc.set_ylabel("test top-1 (%)")
    ax_acc.set_title(f"{rows[0]['epochs']} epoch(s) on {rows[0]['train_images']} images")
    for ax, schemes, name in ((ax_t, ("apg2",), "b_k"), (ax_m, ("hb", "nag"), "b_k")):
        for scheme in schemes:
            learned = [[float(c) for c in r["coef"].split()] for r in rows if r["scheme"] == scheme]
            for j, coef in enumerate(learned):
                ax.plot(range(len(coef)), coef, "o-", ms=3, color=COLORS[scheme], alpha=0.7,
                        label=scheme if j == 0 else None)
            n = len(learned[0])  # one momentum between consecutive blocks
            ax.plot(range(n), init_coefficients(scheme, n + 1).tolist(), "--", color=COLORS[scheme], lw=1,
                    label=f"{scheme} at init")
        ax.set_xlabel("block k")
        ax.set_ylabel(f"learned {name}")
        ax.set_title(f"{'/'.join(schemes)}: {name} across depth (one line per seed)")
        ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    main()
