"""The pre-registered depth experiment: does the skip pattern help deep, narrow networks? (docs/results.md)

gd, hb, apg2 and apg2 with the driver's experimental prox train the same pre-norm MLP (width 32) on all of
Fashion-MNIST at depths 4, 16 and 64, seeds 0-9, paired by seed: the seed fixes the initial weights and the batch
order of every arm. Primary metric: the final cross-entropy over the full training set. Per arm and depth,
d = ln CE(arm) - ln CE(gd) per seed, its mean with a paired bootstrap interval, the exact Wilcoxon signed-rank
test, and the slope of d against log2 depth tested by sign-flip permutation; Holm over all of them.

Writes DIR/depth.csv, one row per run, appended as each run finishes (a restart skips the runs already there), and
once the grid is complete DIR/depth.md (the tables and the pre-registered decision) and DIR/depth.png, computed
from the CSV. Each run is one thread, deterministic; `--workers` run side by side. `--reread` instead applies the
same paired statistics to the earlier experiments' CSVs in DIR and writes DIR/depth_reread.md.

    python -m experiments.depth [--quick] [--out DIR] [--workers N] [--stop-after MIN] [--reread]
"""
import argparse
import csv
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from timm_optdnn.data.sources import read_fashion_mnist
from timm_optdnn.models.schemes import SchemeBlocks
from .common import COLORS, bootstrap_ci, compare, holm, paired, save_figure, sign_flip_p

NAME = "depth"
# what each arm passes to the driver: the arms differ in nothing else
ARMS = {"gd": dict(scheme="gd"), "hb": dict(scheme="hb"), "apg2": dict(scheme="apg2"),
        "apg2_prox": dict(scheme="apg2", prox="norm")}
ARM_COLORS = dict(COLORS, apg2_prox="tab:purple")
FULL = dict(depths=(4, 16, 64), seeds=tuple(range(10)), width=32, hidden=64, epochs=5.0, warmup_epochs=0.5,
            batch=128, lr=2e-3, weight_decay=0.05)
QUICK = dict(FULL, depths=(4,), seeds=(0,), epochs=0.05, warmup_epochs=0.005)  # 23 steps: the CI smoke run
SETTINGS = ("width", "hidden", "epochs", "warmup_epochs", "batch", "lr", "weight_decay")  # a resumed CSV must match
FIELDS = ("depth", "arm", "seed", *SETTINGS, "steps", "train_ce", "test_ce", "test_top1", "loss_auc", "diverged",
          "params", "coef", "coef_above_1", "prox", "cpu_s")
ALPHA = 0.05


class PreNormMLP(nn.Module):
    """Linear stem 784 -> width; `depth` branches LayerNorm -> Linear -> GELU -> Linear under one arm's scheme; final
    LayerNorm; linear head. Built under one seed, every arm draws the same weights in the same order."""

    def __init__(self, depth: int, arm: str, width: int, hidden: int, in_dim: int = 784, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Linear(in_dim, width)
        branches = [nn.Sequential(nn.LayerNorm(width), Mlp(width, hidden, act_layer=nn.GELU)) for _ in range(depth)]
        self.blocks = SchemeBlocks(branches, **ARMS[arm])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


def load_fashion_mnist() -> Dict[str, torch.Tensor]:
    """Both splits flattened to [N, 784], standardised by the training set's pixel mean and standard deviation."""
    data = {}
    for split in ("train", "test"):
        images, labels = read_fashion_mnist(split)
        data[f"{split}_x"] = torch.tensor(images.reshape(len(images), -1), dtype=torch.float32) / 255
        data[f"{split}_y"] = torch.from_numpy(labels)
    mean, std = data["train_x"].mean(), data["train_x"].std()
    for split in ("train", "test"):
        data[f"{split}_x"] = (data[f"{split}_x"] - mean) / std
    return data


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 10_000) -> Tuple[float, float]:
    """(mean cross-entropy, top-1 %) over all of x, in eval mode."""
    model.eval()
    ce, correct = 0.0, 0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk])
        ce += float(F.cross_entropy(logits, y[i:i + chunk], reduction="sum"))
        correct += int((logits.argmax(1) == y[i:i + chunk]).sum())
    return ce / len(x), 100.0 * correct / len(x)


def train_one(cfg: Dict[str, Any], data: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Train one (depth, arm, seed) and return its CSV row. A non-finite minibatch loss stops the run: diverged."""
    cpu_start = time.process_time()
    torch.manual_seed(cfg["seed"])
    model = PreNormMLP(cfg["depth"], cfg["arm"], cfg["width"], cfg["hidden"])
    x, y = data["train_x"], data["train_y"]
    per_epoch = len(x) // cfg["batch"]  # full batches only; each epoch drops a different remainder
    steps, warmup = round(cfg["epochs"] * per_epoch), round(cfg["warmup_epochs"] * per_epoch)
    # weight decay on the weight matrices only: timm leaves 1-d parameters (biases, norms, coefficients) undecayed
    opt = create_optimizer_v2(model, "adamw", lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = CosineLRScheduler(opt, t_initial=steps - warmup, warmup_t=warmup, warmup_prefix=True, t_in_epochs=False)
    batches = torch.Generator().manual_seed(cfg["seed"])
    losses: List[float] = []
    model.train()
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=batches)
        idx = order[step % per_epoch * cfg["batch"]:(step % per_epoch + 1) * cfg["batch"]]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step_update(step + 1)
    train_ce, _ = evaluate(model, x, y)
    test_ce, test_top1 = evaluate(model, data["test_x"], data["test_y"])
    coef = model.blocks.coefficients()
    prox = [float(v) for v in getattr(model.blocks, "prox_gate", torch.zeros(0)).detach().flatten()]
    return dict(depth=cfg["depth"], arm=cfg["arm"], seed=cfg["seed"], **{k: cfg[k] for k in SETTINGS}, steps=steps,
                train_ce=train_ce, test_ce=test_ce, test_top1=test_top1, loss_auc=statistics.fmean(losses),
                diverged=int(not all(map(math.isfinite, (*losses, train_ce, test_ce)))),
                params=sum(p.numel() for p in model.parameters()), coef=" ".join(f"{c:.4f}" for c in coef),
                coef_above_1=sum(c > 1 for c in coef), prox=" ".join(f"{g:.4f}" for g in prox),
                cpu_s=round(time.process_time() - cpu_start, 1))


# --- running the grid: resumable, one thread per run ------------------------------------------------------------

_DATA: Dict[str, torch.Tensor] = {}


def _start_worker() -> None:
    torch.set_num_threads(1)  # tiny matrices: one thread each, and the workers side by side
    _DATA.update(load_fashion_mnist())


def _run(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return train_one(cfg, _DATA)


def finished_runs(todo: List[Dict[str, Any]], workers: int, deadline: float) -> Iterator[Dict[str, Any]]:
    """Each run's row as it finishes; none starts after `deadline` (time.monotonic()), and those started finish."""
    if workers == 1:  # in this process (the quick mode's test watches the models it builds)
        _start_worker()
        for cfg in todo:
            if time.monotonic() > deadline:
                return
            yield _run(cfg)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker) as pool:
        queue, running = list(todo), {}
        while queue or running:
            while queue and len(running) < workers and time.monotonic() < deadline:
                cfg = queue.pop(0)
                running[pool.submit(_run, cfg)] = cfg
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                del running[future]
                yield future.result()


def read_rows(path: Path, spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The runs already in `path` (none if it does not exist), typed; refuses rows from other settings."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise ValueError(f"{path} is not a {NAME} CSV of this version (columns {reader.fieldnames}, expected "
                             f"{list(FIELDS)}): move it away or choose another --out")
        rows = [{k: _parse(k, v) for k, v in r.items()} for r in reader]
    for r in rows:
        other = {k: (r[k], spec[k]) for k in SETTINGS if r[k] != spec[k]}
        if other or r["depth"] not in spec["depths"] or r["seed"] not in spec["seeds"] or r["arm"] not in ARMS:
            raise ValueError(f"{path} holds a run from other settings ({r['arm']} depth {r['depth']} seed "
                             f"{r['seed']}; differing (CSV, now): {other}): move it away or choose another --out")
    return rows


def _parse(key: str, value: str) -> Any:
    if key in ("arm", "coef", "prox"):
        return value
    if key in ("depth", "seed", "width", "hidden", "batch", "steps", "diverged", "params", "coef_above_1"):
        return int(value)
    return float(value)


def run_grid(spec: Dict[str, Any], path: Path, workers: int, stop_after_min: float) -> List[Dict[str, Any]]:
    """Run every (seed, depth, arm) not yet in `path`, appending each row as it finishes; return all rows."""
    rows = read_rows(path, spec)
    done = {(r["depth"], r["arm"], r["seed"]) for r in rows}
    # seed-major: an interrupted grid keeps whole seeds; the deepest runs first so two workers finish together
    todo = [dict({k: spec[k] for k in SETTINGS}, depth=depth, arm=arm, seed=seed) for seed in spec["seeds"]
            for depth in sorted(spec["depths"], reverse=True) for arm in ARMS if (depth, arm, seed) not in done]
    total = len(done) + len(todo)
    if done:
        print(f"{path}: {len(done)} runs already done, {len(todo)} to go", flush=True)
    start = time.monotonic()
    for row in finished_runs(todo, workers, start + 60 * stop_after_min):
        with open(path, "a", newline="") as f:  # appended at once: an interruption loses only the runs in flight
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        rows.append(row)
        print(f"[{len(rows)}/{total}] {row['arm']} depth {row['depth']} "
              f"seed {row['seed']}: train CE {row['train_ce']:.4f}, test top-1 {row['test_top1']:.2f}%, "
              f"{row['cpu_s']:.0f} CPU s ({(time.monotonic() - start) / 60:.1f} min wall)", flush=True)
    return rows


# --- the analysis, from the CSV ----------------------------------------------------------------------------------

# metric -> (what d is, transform, better when d is: -1 lower, +1 higher, worst value of a diverged run)
PRIMARY = "train_ce"
METRICS: Dict[str, Tuple[str, Callable[[float], float], int]] = {
    "train_ce": ("ln CE − ln CE(gd), training set (primary)", math.log, -1),
    "test_ce": ("ln CE − ln CE(gd), test set", math.log, -1),
    "test_top1": ("top-1 − top-1(gd), test set, points", float, +1),
    "loss_auc": ("ln − ln(gd) of the mean minibatch loss over training", math.log, -1),
}


def with_divergences_worst(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Diverged runs get each metric's worst value of the grid (cross-entropies: at least ln 10, chance level)."""
    fixed = []
    for metric, (_, _, better) in METRICS.items():
        finite = [r[metric] for r in rows if not r["diverged"]]
        worst = min(finite + [10.0]) if better > 0 else max(finite + [math.log(10)])
        fixed.append((metric, worst))
    return [dict(r, **dict(fixed)) if r["diverged"] else r for r in rows]


def per_seed_slopes(d: Dict[Tuple, Dict[int, float]], arm: str, depths: Sequence[int]) -> Dict[int, float]:
    """Least-squares slope of d against log2 depth, per seed that ran every depth."""
    x = np.log2(depths)
    seeds = set.intersection(*(set(d[(arm, L)]) for L in depths))
    return {s: float(np.polyfit(x, [d[(arm, L)][s] for L in depths], 1)[0]) for s in sorted(seeds)}


def analyse(rows: List[Dict[str, Any]], spec: Dict[str, Any]) -> Dict[str, Any]:
    """Every test of the design: per metric, per (arm, depth) comparisons; the primary slopes; Holm; decisions."""
    rows = with_divergences_worst(rows)
    depths, arms = sorted(spec["depths"]), [a for a in ARMS if a != "gd"]
    out: Dict[str, Any] = dict(comparisons={}, slopes={}, decisions={})
    for metric, (_, transform, _) in METRICS.items():
        d = paired(rows, metric, transform, by=("depth",), arm="arm")
        out["comparisons"][metric] = {(a, L): compare(d[(a, L)]) for a in arms for L in depths}
        if metric == PRIMARY:
            out["d"] = d
            if len(depths) > 1:
                for a in arms:
                    s = per_seed_slopes(d, a, depths)
                    lo, hi = bootstrap_ci(list(s.values()))
                    out["slopes"][a] = dict(n=len(s), mean=statistics.fmean(s.values()), lo=lo, hi=hi,
                                            p=sign_flip_p(list(s.values())))
        # Holm: the primary family is its 9 comparisons and 3 slopes; each secondary metric is its own family
        family = list(out["comparisons"][metric].values()) + (list(out["slopes"].values()) if metric == PRIMARY else [])
        for test, p_holm in zip(family, holm([t["p"] for t in family])):
            test["p_holm"] = p_holm
    primary, deepest = out["comparisons"][PRIMARY], depths[-1]
    for a in arms:
        c, slope = primary[(a, deepest)], out["slopes"].get(a)
        helps = (c["p_holm"] < ALPHA and c["mean"] < 0 and c["signed_rank_sum"] < 0 and slope is not None
                 and slope["p_holm"] < ALPHA and slope["mean"] < 0)
        hurts = [L for L in depths if primary[(a, L)]["p_holm"] < ALPHA and primary[(a, L)]["mean"] > 0
                 and primary[(a, L)]["signed_rank_sum"] > 0]
        out["decisions"][a] = ("helps deep narrow networks" if helps else
                               f"hurts at depth {', '.join(map(str, hurts))}" if hurts else "no detectable difference")
    return out


def _ci(c: Dict[str, float], fmt: str = "+.3f") -> str:
    return f"{c['mean']:{fmt}} [{c['lo']:{fmt}}, {c['hi']:{fmt}}]"


def report(rows: List[Dict[str, Any]], spec: Dict[str, Any], stats: Dict[str, Any], command: str) -> str:
    """The Markdown of DIR/depth.md: settings, the primary table, the slopes, the decisions, then the secondary."""
    depths, arms = sorted(spec["depths"]), list(ARMS)
    mean_of = {(a, L, m): statistics.fmean(r[m] for r in rows if r["arm"] == a and r["depth"] == L)
               for a in arms for L in depths for m in ("train_ce", "test_top1", "cpu_s")}
    runs = {(a, L): [r for r in rows if r["arm"] == a and r["depth"] == L] for a in arms for L in depths}
    lines = [f"# Depth experiment: results\n\nGenerated from `{NAME}.csv` by `{command}`. Settings: "
             + ", ".join(f"{k} {spec[k]}" for k in SETTINGS) + f", seeds {', '.join(map(str, spec['seeds']))}, "
             f"{rows[0]['steps']} steps per run. d < 0: the arm's loss is below gd's. p: exact two-sided "
             "(Wilcoxon signed-rank for comparisons, sign-flip permutation for slopes); Holm p: Holm-adjusted within "
             "the table's family.", "",
             "## Primary: final training cross-entropy (all 60,000 training images, eval mode)", "",
             "| arm | depth | runs (diverged) | mean CE | mean top-1 % | mean d [95 % CI] | CE change | d < 0 in "
             "| signed-rank sum | p | Holm p | mean CPU s |", "|---|---:|---:|---:|---:|---|" + "---:|" * 6]
    for a in arms:
        for L in depths:
            c = stats["comparisons"][PRIMARY].get((a, L))
            tests = (f"{_ci(c)} | {math.expm1(c['mean']):+.1%} | {c['below']}/{c['n']} | {c['signed_rank_sum']:+g} "
                     f"| {c['p']:.4f} | {c['p_holm']:.4f}") if c else "(reference) | | | | | "
            lines.append(f"| {a} | {L} | {len(runs[(a, L)])} ({sum(r['diverged'] for r in runs[(a, L)])}) "
                         f"| {mean_of[(a, L, 'train_ce')]:.4f} | {mean_of[(a, L, 'test_top1')]:.2f} | {tests} "
                         f"| {mean_of[(a, L, 'cpu_s')]:.0f} |")
    if stats["slopes"]:
        lines += ["", "## Depth trend: slope of d against log2 depth (per doubling of depth), primary family", "",
                  "| arm | seeds | mean slope [95 % CI] | p | Holm p |", "|---|---:|---|---:|---:|"]
        lines += [f"| {a} | {s['n']} | {_ci(s, '+.4f')} | {s['p']:.4f} | {s['p_holm']:.4f} |"
                  for a, s in stats["slopes"].items()]
    lines += ["", "## Decision (the pre-registered rule)", ""]
    lines += [f"- **{a}**: {verdict}." for a, verdict in stats["decisions"].items()]
    for metric, (what, _, better) in METRICS.items():
        if metric == PRIMARY:
            continue
        lines += ["", f"## Secondary (exploratory): {what}", "",
                  "| arm | depth | mean d [95 % CI] | arm better in | p | Holm p (this metric) |",
                  "|---|---:|---|---:|---:|---:|"]
        for (a, L), c in stats["comparisons"][metric].items():
            wins = c["below"] if better < 0 else c["above"]
            lines.append(f"| {a} | {L} | {_ci(c)} | {wins}/{c['n']} | {c['p']:.4f} | {c['p_holm']:.4f} |")
    lines += ["", "## Learned coefficients (b_k, one between consecutive blocks) and prox gates", "",
              "| arm | depth | mean coefficient (first / middle / last block) | above 1 (of all, over seeds) "
              "| mean prox gate |", "|---|---:|---|---:|---:|"]
    for a in arms[1:]:
        for L in depths:
            coefs = np.array([[float(c) for c in r["coef"].split()] for r in runs[(a, L)]]).mean(axis=0)
            gates = [float(g) for r in runs[(a, L)] for g in r["prox"].split()]
            gate = f"{statistics.fmean(gates):.3f}" if gates else "–"
            above = sum(r["coef_above_1"] for r in runs[(a, L)])
            lines.append(f"| {a} | {L} | {coefs[0]:.3f} / {coefs[len(coefs) // 2]:.3f} / {coefs[-1]:.3f} "
                         f"| {above} of {coefs.size * len(runs[(a, L)])} | {gate} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], spec: Dict[str, Any], stats: Dict[str, Any]) -> plt.Figure:
    """d against depth with intervals; training CE against depth; the learned coefficients at the deepest depth."""
    depths, arms = sorted(spec["depths"]), list(ARMS)
    fig, (ax_d, ax_ce, ax_c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, a in enumerate(arms[1:]):
        x = np.log2(depths) + 0.12 * (i - 1)  # side by side, not on top of each other
        cs = [stats["comparisons"][PRIMARY][(a, L)] for L in depths]
        mean = np.array([c["mean"] for c in cs])
        err = np.array([[c["mean"] - c["lo"] for c in cs], [c["hi"] - c["mean"] for c in cs]])
        ax_d.errorbar(x, mean, yerr=err, fmt="o-", capsize=4, color=ARM_COLORS[a], label=a)
        for xi, L in zip(x, depths):
            ax_d.scatter([xi] * len(stats["d"][(a, L)]), list(stats["d"][(a, L)].values()), s=8, alpha=0.35,
                         color=ARM_COLORS[a])
    ax_d.axhline(0, color="k", lw=0.8)
    ax_d.set(xlabel="depth L", ylabel="d = ln CE − ln CE(gd), training set", title="arm against gd, paired by seed "
             "(mean, 95 % bootstrap CI, seeds)")
    for a in arms:
        ce = [[r["train_ce"] for r in rows if r["arm"] == a and r["depth"] == L] for L in depths]
        ax_ce.errorbar(np.log2(depths), [statistics.fmean(v) for v in ce], fmt="o-", color=ARM_COLORS[a], label=a,
                       yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in ce], capsize=3)
    ax_ce.set(yscale="log", xlabel="depth L", ylabel="final training cross-entropy", title="mean ± std over seeds")
    deepest = depths[-1]
    for a in arms[1:]:
        coefs = np.array([[float(c) for c in r["coef"].split()] for r in rows
                          if r["arm"] == a and r["depth"] == deepest])
        ax_c.plot(coefs.mean(axis=0), "o-", ms=2, color=ARM_COLORS[a], label=f"{a} (mean over seeds)")
    ax_c.axhline(1, color="k", ls=":", lw=0.8)
    ax_c.set(xlabel="block k", ylabel="learned coefficient (hb: m_k, apg2: b_k)", title=f"depth {deepest}")
    for ax in (ax_d, ax_ce):
        ax.set_xticks(np.log2(depths), [str(L) for L in depths])
    for ax in (ax_d, ax_ce, ax_c):
        ax.legend(fontsize=7)
    return fig


# --- the earlier experiments, re-read with the same statistics --------------------------------------------------

# CSV name -> (columns that identify a configuration, [(metric, what d is, transform, better: -1 lower / +1 higher)])
EARLIER = {
    "rings": ((), [("margin_q05", "5 % margin quantile, difference", float, +1),
                   ("test_acc", "test accuracy, difference", float, +1)]),
    "parity": ((), [("test_err", "ln test error ratio", math.log, -1)]),
    "sawtooth": ((), [("test_mse", "ln test MSE ratio", math.log, -1)]),
    "width_depth": (("setting", "width", "depth"), [("test_mse", "ln test MSE ratio", math.log, -1)]),
    "fmnist_schemes": ((), [("top1", "test top-1 difference, points", float, +1)]),
}


def reread(results: Path, command: str) -> str:
    """Every scheme against gd in the earlier experiments' CSVs, paired by seed, Holm over all the tests."""
    tests = []
    for name, (by, metrics) in EARLIER.items():
        with open(results / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for metric, what, transform, better in metrics:
            for (scheme, *group), d in paired(rows, metric, transform, by=by).items():
                c = compare(d)
                tests.append(dict(c, experiment=name, setting=" ".join(f"{k} {v}" for k, v in zip(by, group)) or "–",
                                  what=what, scheme=scheme, wins=c["below"] if better < 0 else c["above"]))
    for t, p_holm in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = p_holm
    lines = [f"# The earlier experiments, paired by seed\n\nGenerated from the CSVs in this folder by `{command}`: "
             f"each scheme against gd with the same seeds, {len(tests)} tests, exact two-sided Wilcoxon signed-rank "
             "p, Holm over all of them. With n seeds the smallest possible p is 2/2^n: 0.25 for 3 seeds, 0.0625 for "
             "5, 0.002 for 10.", "",
             "| experiment | setting | d | scheme | seeds | mean d [95 % CI] | scheme better in | p | Holm p |",
             "|---|---|---|---|---:|---|---:|---:|---:|"]
    lines += [f"| {t['experiment']} | {t['setting']} | {t['what']} | {t['scheme']} | {t['n']} | {_ci(t, '+.3g')} "
              f"| {t['wins']}/{t['n']} | {t['p']:.3f} | {t['p_holm']:.3f} |" for t in tests]
    return "\n".join(lines) + "\n"


# --- command line ------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seed 0, depth 4, 23 steps: the CI smoke run")
    p.add_argument("--out", type=Path, default=Path("results"), help=f"directory for {NAME}.csv, .md, .png")
    p.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each (1: in this process)")
    p.add_argument("--stop-after", type=float, default=math.inf, metavar="MIN",
                   help="start no run after MIN minutes (those running finish); rerun to continue")
    p.add_argument("--reread", action="store_true", help="only re-read the earlier experiments' CSVs in --out")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    command = " ".join(["python -m experiments." + NAME] + [f for f, on in (("--quick", args.quick),
                                                                          ("--reread", args.reread)) if on])
    if args.reread:
        (args.out / f"{NAME}_reread.md").write_text(text := reread(args.out, command))
        print(text)
        return []
    args.out.mkdir(parents=True, exist_ok=True)
    spec = QUICK if args.quick else FULL
    path = args.out / f"{NAME}.csv"
    run_grid(spec, path, args.workers, args.stop_after)
    rows = read_rows(path, spec)  # the analysis reads what the CSV holds, as a later rerun would
    expected = len(spec["depths"]) * len(ARMS) * len(spec["seeds"])
    if len(rows) < expected:
        sys.exit(f"{NAME}: {len(rows)} of {expected} runs in {path}; rerun the same command to continue (the "
                 "statistics are computed only on the complete grid)")
    stats = analyse(rows, spec)
    text = report(rows, spec, stats, command)
    (args.out / f"{NAME}.md").write_text(text)
    save_figure(plot(rows, spec, stats), args.out, NAME)
    print(text)
    return rows


if __name__ == "__main__":
    main()
