"""Parity of d bits (d >= 8): binary classification that is hard for shallow networks.

Inputs are all 2^d vectors in {-1, +1}^d, the label is their product (+1 for an even number of
-1s); a fixed per-seed split holds out a quarter of them. Parity depends only on the number of
-1s, so a network can solve it by projecting onto the all-ones direction and then oscillating
d times along it: a sawtooth, which depth buys cheaply. Every scheme gets the same width, depth,
branch size, initial weights, split and steps. Reported per run: train and test error. The PNG
shows the fitted function: mean predicted P(label = +1) against the number of -1s, on the
held-out inputs (first seed).

    python -m experiments.parity [--quick] [--out DIR]
"""
import itertools
from typing import Any, List, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import torch

from .common import (COLORS, SEEDS, Config, Metrics, build, describe, experiment, first_seed, logistic_loss, model_info,
                      seeded_grids, train)

NAME = "parity"
FULL = dict(bits=12, train_frac=0.25, width=4, hidden=4, depth=8, steps=2000, batch=256, lr=1e-2)
QUICK = dict(FULL, bits=8, steps=200)
BUDGET_S = dict(full=600, quick=40)


def parity(bits: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All of {-1, +1}^bits, their parity labels, and a seeded permutation (first 3/4 = train)."""
    if bits < 1:
        raise ValueError(f"parity: bits must be >= 1, got {bits}")
    x = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=bits)))
    return x, x.prod(1, keepdim=True), torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))


def run(cfg: Config) -> Tuple[Metrics, Any]:
    x, y, perm = parity(cfg["bits"], cfg["seed"])
    n = int(cfg["train_frac"] * len(x))
    tr, te = perm[:n], perm[n:]
    model = build(cfg, cfg["bits"], 1)
    train(model, x[tr], y[tr], logistic_loss, cfg["steps"], cfg["lr"], cfg["batch"], cfg["seed"])
    with torch.no_grad():
        wrong = (model(x) * y <= 0).float().squeeze(1)
        p = torch.sigmoid(model(x[te])).squeeze(1)
    ones = (x[te] < 0).sum(1)
    curve = [(k, float(p[ones == k].mean())) for k in range(cfg["bits"] + 1) if (ones == k).any()]
    metrics = dict(train_err=float(wrong[tr].mean()), test_err=float(wrong[te].mean()), **model_info(model))
    return metrics, curve


def plot(configs: List[Config], artefacts: List[Any], rows: List[dict]) -> plt.Figure:
    bits = configs[0]["bits"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    k = range(bits + 1)
    ax.plot(k, [float(i % 2 == 0) for i in k], "k--", lw=1, label="target")
    for scheme, curve in first_seed(configs, artefacts).items():
        err = next(r["test_err"] for r in rows if r["scheme"] == scheme and r["seed"] == configs[0]["seed"])
        ax.plot(*zip(*curve), "o-", color=COLORS[scheme], label=f"{scheme} (test err {err:.3f})")
    ax.set_xlabel("number of -1 bits (held-out inputs)")
    ax.set_ylabel("mean predicted P(even)")
    ax.set_title(f"parity of {bits} bits, {describe(configs[0])}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    return experiment(NAME, __doc__, argv, seeded_grids(QUICK, FULL, SEEDS), run, plot, BUDGET_S)


if __name__ == "__main__":
    main()
