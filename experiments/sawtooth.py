"""Telgarsky's sawtooth: regression of a function with many oscillations, hard for shallow nets.

The target is the tent map t(x) = 1 - |2x - 1| composed `teeth_log2 + 1` times on [0, 1]: a
sawtooth with 2^teeth_log2 teeth. A depth-L ReLU network of fixed width can represent it with
L ~ teeth_log2, while a shallow one needs ~2^teeth_log2 units (Telgarsky 2016). Every scheme gets
the same width, depth, branch size, initial weights, samples and steps. Reported per run: train
and test mean squared error (test on a uniform grid; predicting the mean scores 1/12 = 0.083) and
`solved` (test MSE < 0.01; its mean over seeds is the fraction of seeds that fit every tooth).
The PNG shows each scheme's fitted function (first seed).

    python -m experiments.sawtooth [--quick] [--out DIR]
"""
from typing import Any, List, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from .common import COLORS, Config, Metrics, build, describe, experiment, first_seed, model_info, seeded_grids, train

NAME = "sawtooth"
FULL = dict(teeth_log2=3, width=8, hidden=16, depth=8, n_train=2048, steps=3000, batch=256, lr=1e-2)
QUICK = dict(FULL, steps=200)
SEEDS = tuple(range(10))  # runs fit every tooth or stall: count successes over more seeds than elsewhere
SOLVED = 0.01  # test MSE below this counts as fitting all teeth; runs either get there or stall near 1/12
BUDGET_S = dict(full=840, quick=40)


def sawtooth(x: torch.Tensor, teeth_log2: int) -> torch.Tensor:
    for _ in range(teeth_log2 + 1):
        x = 1 - (2 * x - 1).abs()
    return x


def fit_sawtooth(cfg: Config) -> Tuple[Metrics, Any]:
    """Train one network on the sawtooth; metrics and (grid, prediction) for the plot."""
    x = torch.rand(cfg["n_train"], 1, generator=torch.Generator().manual_seed(cfg["seed"]))
    xt = torch.linspace(0, 1, 4001)[:, None]
    model = build(cfg, 1, 1)
    # inputs centred to [-1, 1]: the stem sees zero-mean data, as in the other experiments
    train(model, 2 * x - 1, sawtooth(x, cfg["teeth_log2"]), F.mse_loss, cfg["steps"], cfg["lr"], cfg["batch"], cfg["seed"])
    with torch.no_grad():
        pred = model(2 * xt - 1)
        train_mse = F.mse_loss(model(2 * x - 1), sawtooth(x, cfg["teeth_log2"]))
    test_mse = float(F.mse_loss(pred, sawtooth(xt, cfg["teeth_log2"])))
    metrics = dict(train_mse=float(train_mse), test_mse=test_mse, solved=float(test_mse < SOLVED), **model_info(model))
    return metrics, (xt[:, 0], pred[:, 0])


def plot(configs: List[Config], artefacts: List[Any], rows: List[dict]) -> plt.Figure:
    shown = first_seed(configs, artefacts)
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 1.5 * len(shown)), sharex=True)
    for ax, (scheme, (xt, pred)) in zip(axes, shown.items()):
        mse = next(r["test_mse"] for r in rows if r["scheme"] == scheme and r["seed"] == configs[0]["seed"])
        ax.plot(xt, sawtooth(xt, configs[0]["teeth_log2"]), "k--", lw=0.8)
        ax.plot(xt, pred, color=COLORS[scheme], lw=1.2)
        ax.set_ylabel(f"{scheme}\nMSE {mse:.1e}", color=COLORS[scheme], fontsize=8)
    axes[0].set_title(f"sawtooth with {2 ** configs[0]['teeth_log2']} teeth, {describe(configs[0])}")
    return fig


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    return experiment(NAME, __doc__, argv, seeded_grids(QUICK, FULL, SEEDS), fit_sawtooth, plot, BUDGET_S)


if __name__ == "__main__":
    main()
