"""Nested rings in 2-D: the paper's first toy experiment, at the width of the input (2).

Three concentric rings, labelled +1 / -1 / +1 from the centre out, so the decision region of the
positive class is a disk plus an annulus. A network whose state stays 2-D must fold the plane to
separate them: width-bounded universality is what makes that possible. Every scheme gets the same
width, depth, branch size, initial weights, data and steps. Reported per run: test accuracy and
the classification margin, the signed distance of a test point to the decision boundary to first
order, y f(x) / |grad_x f(x)| (f the logit, y = +-1; the rings are 0.4 apart, so a boundary midway
is 0.2 from the ring edges): its median and its 5% quantile over the test set (negative where errors remain).
The PNG shows each scheme's decision regions (first seed).

    python -m experiments.rings [--quick] [--out DIR]
"""
import math
from typing import Any, List, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import torch

from .common import (COLORS, SEEDS, Config, Metrics, build, describe, experiment, first_seed, logistic_loss, model_info,
                      seeded_grids, train)

NAME = "rings"
BANDS = ((0.0, 0.5, 1.0), (0.9, 1.4, -1.0), (1.8, 2.3, 1.0))  # (r_min, r_max, label)
LIM = 2.6  # plot range
FULL = dict(width=2, hidden=4, depth=8, n_train=2000, steps=3000, batch=256, lr=1e-2)
QUICK = dict(FULL, n_train=500, steps=200)
BUDGET_S = dict(full=600, quick=40)


def rings(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """n points, a band chosen uniformly, radius uniform in the band, angle uniform; labels +-1."""
    gen = torch.Generator().manual_seed(seed)
    band = torch.randint(len(BANDS), (n,), generator=gen)
    lo, hi, label = (torch.tensor(b)[band] for b in zip(*BANDS))
    r = lo + (hi - lo) * torch.rand(n, generator=gen)
    phi = 2 * math.pi * torch.rand(n, generator=gen)
    return torch.stack([r * phi.cos(), r * phi.sin()], 1), label[:, None]


def run(cfg: Config) -> Tuple[Metrics, Any]:
    x, y = rings(cfg["n_train"], seed=cfg["seed"])
    xt, yt = rings(2000, seed=10_000 + cfg["seed"])
    model = build(cfg, 2, 1)
    train(model, x, y, logistic_loss, cfg["steps"], cfg["lr"], cfg["batch"], cfg["seed"])
    xt.requires_grad_(True)
    f = model(xt)
    margin = ((yt * f).squeeze(1) / torch.autograd.grad(f.sum(), xt)[0].norm(dim=1)).detach()
    xt = xt.detach()
    with torch.no_grad():
        u = torch.linspace(-LIM, LIM, 201)
        plane = torch.stack(torch.meshgrid(u, u, indexing="xy"), -1).reshape(-1, 2)
        regions = torch.sigmoid(model(plane)).reshape(len(u), len(u))
    metrics = dict(test_acc=float((margin > 0).float().mean()), margin_median=float(margin.median()),
                   margin_q05=float(margin.quantile(0.05)), **model_info(model))
    return metrics, (regions.numpy(), xt.numpy(), yt.numpy())


def plot(configs: List[Config], artefacts: List[Any], rows: List[dict]) -> plt.Figure:
    shown = first_seed(configs, artefacts)
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4))
    for ax, (scheme, (regions, xt, yt)) in zip(axes, shown.items()):
        ax.imshow(regions, extent=(-LIM, LIM, -LIM, LIM), origin="lower", cmap="RdBu", vmin=0, vmax=1, alpha=0.6)
        ax.contour(regions, levels=[0.5], extent=(-LIM, LIM, -LIM, LIM), colors="k", linewidths=0.8)
        ax.scatter(xt[:400, 0], xt[:400, 1], c=yt[:400, 0], cmap="RdBu", vmin=-1, vmax=1, s=3)
        acc = next(r["test_acc"] for r in rows if r["scheme"] == scheme and r["seed"] == configs[0]["seed"])
        ax.set_title(f"{scheme}: test acc {acc:.3f}", color=COLORS[scheme])
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"decision regions, {describe(configs[0])}")
    return fig


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    return experiment(NAME, __doc__, argv, seeded_grids(QUICK, FULL, SEEDS), run, plot, BUDGET_S)


if __name__ == "__main__":
    main()
