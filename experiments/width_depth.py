"""Narrow-deep against wide-shallow: the paper's two width/depth regimes, on a 4-tooth sawtooth.

narrow-deep: fixed width 4 (branch hidden size 8), depth 2..16. wide-shallow: fixed depth 2, width
8..128 (branch hidden size 2 x width). Each point trains every scheme from the same initial
weights on the same samples (see `sawtooth`), so the curves compare schemes at equal width, depth
and, within a setting, parameter count (the schemes differ by one scalar per block). Reported per
run: train/test MSE. The PNG plots test MSE (mean and std over seeds) against depth and width.

    python -m experiments.width_depth [--quick] [--out DIR]
"""
from typing import Any, List, Optional, Sequence

import matplotlib.pyplot as plt

from .common import COLORS, SEEDS, Config, experiment, grid
from .sawtooth import FULL as SAWTOOTH, fit_sawtooth
from timm_optdnn.models.schemes import SCHEMES

NAME = "width_depth"
# 4 teeth, not sawtooth's 8: at width 4 the 8-tooth fit stalls near 1/12 at every depth in 2000 steps
FULL = dict(base=dict(SAWTOOTH, teeth_log2=2, steps=1500), narrow_width=4, depths=(2, 4, 8, 16), shallow_depth=2,
            widths=(8, 32, 128), seeds=SEEDS[:3])
QUICK = dict(FULL, base=dict(SAWTOOTH, teeth_log2=2, steps=200), depths=(2, 4), widths=(8,), seeds=SEEDS[:1])
BUDGET_S = dict(full=840, quick=40)


def sweep(spec: dict) -> List[Config]:
    narrow = grid(dict(spec["base"], setting="narrow-deep", width=spec["narrow_width"], hidden=2 * spec["narrow_width"]),
                  spec["seeds"], depth=spec["depths"])
    wide = grid(dict(spec["base"], setting="wide-shallow", depth=spec["shallow_depth"]), spec["seeds"], width=spec["widths"])
    return narrow + [dict(c, hidden=2 * c["width"]) for c in wide]


def plot(configs: List[Config], artefacts: List[Any], rows: List[dict]) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (setting, knob) in zip(axes, (("narrow-deep", "depth"), ("wide-shallow", "width"))):
        for scheme in SCHEMES:
            rs = [r for r in rows if r["setting"] == setting and r["scheme"] == scheme]
            xs = sorted({r[knob] for r in rs})
            vals = [[r["test_mse"] for r in rs if r[knob] == v] for v in xs]
            mean = [sum(v) / len(v) for v in vals]
            std = [(sum((a - m) ** 2 for a in v) / max(len(v) - 1, 1)) ** 0.5 for v, m in zip(vals, mean)]
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, color=COLORS[scheme], label=scheme)
        ax.axhline(1 / 12, color="k", ls=":", lw=0.8, label="predict the mean")
        fixed = f"width {rows[0]['width']}" if knob == "depth" else f"depth {next(r['depth'] for r in rows if r['setting'] == setting)}"
        ax.set(xscale="log", xlabel=knob, title=f"{setting} ({fixed})")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
    axes[0].set_ylabel("sawtooth test MSE")
    axes[1].legend(fontsize=7)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    return experiment(NAME, __doc__, argv, lambda quick: sweep(QUICK if quick else FULL), fit_sawtooth, plot, BUDGET_S)


if __name__ == "__main__":
    main()
