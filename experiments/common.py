"""What every toy experiment shares: the command line, the training loop, the time budget, the CSV, and the
paired statistics over seeds.

An experiment is a list of configurations (each with a `scheme` and a `seed`) and a function that
trains one `OptDNNMLP` per configuration and returns its metrics. `run_grid` runs them all in a
fixed order, stops with a clear error when the (CPU) time budget runs out, writes one CSV row per run
and prints the mean +- std per configuration as a Markdown table (the tables in docs/results.md).

Every scheme of one seed starts from the same weights on the same data, so schemes are compared paired by seed:
`paired` turns a metric into per-seed differences against gd, and `compare` gives their mean with a paired
bootstrap interval and the exact Wilcoxon signed-rank p; `holm` corrects a family of p values.
"""
import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib
matplotlib.use("Agg")  # experiments only write PNGs; never open a window
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from timm_optdnn.models.mlp import OptDNNMLP
from timm_optdnn.models.schemes import SCHEMES

Config = Dict[str, Any]
Metrics = Dict[str, Any]

SEEDS = (0, 1, 2, 3, 4)  # the full experiments run these (width_depth the first 3); --quick the first only
COLORS = {"gd": "tab:gray", "hb": "tab:blue", "nag": "tab:green", "apg2": "tab:red"}


def experiment(name: str, doc: Optional[str], argv: Optional[Sequence[str]],
               configs: Callable[[bool], List[Config]], run: Callable[[Config], Tuple[Metrics, Any]],
               plot: Callable[[List[Config], List[Any], List[Dict[str, Any]]], plt.Figure],
               budget_s: Dict[str, float]) -> List[Dict[str, Any]]:
    """The command line of every experiment: configs(quick) -> run each -> <name>.csv, <name>.png."""
    args = parse_args(doc, name, argv)
    todo = configs(args.quick)
    rows, artefacts = run_grid(name, args.out, todo, run, budget_s["quick" if args.quick else "full"])
    save_figure(plot(todo, artefacts, rows), args.out, name)
    return rows


def parse_args(doc: Optional[str], name: str, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, few steps: the CI smoke run (< 1 min)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="directory for <name>.csv and <name>.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny nets: 1 is fastest)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, steps: int, lr: float,
          batch_size: int, seed: int, weight_decay: float = 0.0) -> None:
    """AdamW with cosine decay on minibatches drawn with `seed`; scheme coefficients are never decayed."""
    gen = torch.Generator().manual_seed(seed)
    opt = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def logistic_loss(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on a logit f for labels y = +-1."""
    return F.softplus(-y * f).mean()


def build(cfg: Config, in_dim: int, out_dim: int) -> OptDNNMLP:
    """The network of one run: seeded init, so every scheme starts from the same weights."""
    torch.manual_seed(cfg["seed"])
    return OptDNNMLP(in_dim, out_dim, width=cfg["width"], depth=cfg["depth"], hidden=cfg["hidden"],
                     scheme=cfg["scheme"])


def model_info(model: OptDNNMLP) -> Metrics:
    """Size and learned coefficients, so the CSV shows equal budgets and what each scheme learned."""
    return dict(params=sum(p.numel() for p in model.parameters()),
                coef=" ".join(f"{c:.3f}" for c in model.scheme_coefficients()))


def grid(base: Config, seeds: Sequence[int], **sweep: Sequence[Any]) -> List[Config]:
    """Every scheme x seed (x each swept value), seed innermost so a budget stop keeps whole groups."""
    configs = [dict(base, scheme=s, seed=seed) for s in SCHEMES for seed in seeds]
    for key, values in sweep.items():
        configs = [dict(c, **{key: v}) for v in values for c in configs]
    return configs


def seeded_grids(quick: Config, full: Config, seeds: Sequence[int]) -> Callable[[bool], List[Config]]:
    """The `configs` of `experiment` for a fixed base: one seed in --quick mode, every seed otherwise."""
    return lambda is_quick: grid(quick, seeds[:1]) if is_quick else grid(full, seeds)


def describe(cfg: Config) -> str:
    """'width W, depth D (seed S)': the size a plot title names."""
    return f"width {cfg['width']}, depth {cfg['depth']} (seed {cfg['seed']})"


def run_grid(name: str, out: Path, configs: List[Config], run: Callable[[Config], Tuple[Metrics, Any]],
             budget_s: float) -> Tuple[List[Dict[str, Any]], List[Any]]:
    """Run each config; write <out>/<name>.csv; print the summary. Returns the rows and run artefacts."""
    # the budget counts this process's CPU seconds: equal to wall time on an idle machine with one
    # thread, and unaffected by other jobs sharing the cores (wall time is printed as well)
    start, cpu_start = time.perf_counter(), time.process_time()
    rows: List[Dict[str, Any]] = []
    artefacts: List[Any] = []
    path = out / f"{name}.csv"
    for i, cfg in enumerate(configs):
        used = time.process_time() - cpu_start
        if used > budget_s:  # checked between runs: a run in progress always finishes
            write_csv(path, rows)
            sys.exit(f"{name}: time budget of {budget_s:.0f} CPU s used up after {i}/{len(configs)} runs "
                     f"({used:.0f} CPU s); partial results in {path}")
        t0 = time.process_time()
        metrics, artefact = run(cfg)
        rows.append(dict(cfg, **metrics, cpu_s=round(time.process_time() - t0, 2)))
        artefacts.append(artefact)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if k != "coef")
        print(f"[{i + 1}/{len(configs)}] {_cfg_str(cfg)}: {shown}", flush=True)
    write_csv(path, rows)
    print(f"\n{name}: {len(rows)} runs, {time.process_time() - cpu_start:.0f} CPU s, "
          f"{time.perf_counter() - start:.0f} s wall, wrote {path}\n")
    print(summary_table(rows, metric_keys=[k for k in rows[0] if k not in configs[0]]))
    return rows, artefacts


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def summary_table(rows: List[Dict[str, Any]], metric_keys: List[str]) -> str:
    """Markdown: one line per configuration (seeds pooled), mean +- std of each numeric metric.

    Settings shared by every row are stated once above the table, so it shows only what varies.
    """
    metric_keys = [k for k in metric_keys if isinstance(rows[0][k], (int, float)) and k != "params"]
    cfg_keys = [k for k in rows[0] if k not in metric_keys and k not in ("seed", "coef")]
    fixed = [k for k in cfg_keys if len({r[k] for r in rows}) == 1 and k != "scheme"]
    cfg_keys = [k for k in cfg_keys if k not in fixed]
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in cfg_keys), []).append(r)
    lines = ["all runs: " + ", ".join(f"{k}={rows[0][k]}" for k in fixed), "",
             "| " + " | ".join(cfg_keys + ["seeds"] + metric_keys) + " |",
             "|" + "---|" * (len(cfg_keys) + 1 + len(metric_keys))]
    for key, rs in groups.items():
        stats = []
        for m in metric_keys:
            vals = [r[m] for r in rs]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            stats.append(f"{_fmt(statistics.fmean(vals))} ± {_fmt(std)}")
        lines.append("| " + " | ".join([str(v) for v in key] + [str(len(rs))] + stats) + " |")
    return "\n".join(lines)


def save_figure(fig: plt.Figure, out: Path, name: str) -> None:
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=90)
    plt.close(fig)
    print(f"wrote {out / f'{name}.png'}")


def first_seed(configs: List[Config], artefacts: List[Any]) -> Dict[str, Any]:
    """The artefact of each scheme's first-seed run (what the plots show)."""
    seed = configs[0]["seed"]
    return {c["scheme"]: a for c, a in zip(configs, artefacts) if c["seed"] == seed}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 or not math.isfinite(v) else f"{v:.2e}"
    return str(v)


def _cfg_str(cfg: Config) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


# --- paired statistics over seeds ------------------------------------------------------------------------------

def sign_flip_p(x: Sequence[float]) -> float:
    """Exact two-sided p of sum(x) when each term's sign is a fair coin: the share of all 2^n sign patterns whose
    |sum| reaches the observed one. On signed ranks it is the exact Wilcoxon test; on per-seed slopes, a sign-flip
    permutation test."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) > 20:
        raise ValueError(f"sign_flip_p enumerates 2^n patterns: n = {len(x)} is too many (at most 20)")
    signs = 1 - 2 * ((np.arange(2 ** len(x))[:, None] >> np.arange(len(x))) & 1)
    observed = abs(x.sum())
    # sums of the same terms in another order may round differently: compare with a relative tolerance
    return float(np.mean(np.abs(signs @ x) >= observed * (1 - 1e-9)))


def wilcoxon(d: Sequence[float]) -> Tuple[float, float]:
    """Exact two-sided Wilcoxon signed-rank test of paired differences d: (signed-rank sum, p).

    Zero differences are dropped (Wilcoxon's rule), tied |d| share their average rank, and p comes from the exact
    null over the sign patterns of the observed ranks, so it stays exact with ties (scipy's exact mode assumes none).
    """
    d = np.asarray([v for v in d if v != 0], dtype=np.float64)
    if not np.isfinite(d).all():
        raise ValueError(f"wilcoxon: differences must be finite, got {d.tolist()}")
    a = np.abs(d)
    ranks = np.array([(np.sum(a < v) + 1 + np.sum(a <= v)) / 2 for v in a])  # average rank of each |d|
    signed = np.sign(d) * ranks
    return float(signed.sum()), sign_flip_p(signed)


def bootstrap_ci(values: Sequence[float], resamples: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling the values (one per seed: paired) with replacement."""
    v = np.asarray(values, dtype=np.float64)
    means = v[np.random.default_rng(seed).integers(len(v), size=(resamples, len(v)))].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p values (same order as given): reject where adjusted p < alpha."""
    m = len(pvalues)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def paired(rows: List[Dict[str, Any]], metric: str, transform: Callable[[float], float], by: Sequence[str] = (),
           arm: str = "scheme", reference: str = "gd") -> Dict[Tuple, Dict[int, float]]:
    """Per (arm, *by) other than the reference: {seed: transform(metric) - transform(reference's metric)}, over the
    seeds both ran. Raises if a (seed, arm, *by) appears twice: pairs must be unique."""
    values: Dict[Tuple, float] = {}
    for r in rows:
        key = (r[arm], *(r[k] for k in by), int(r["seed"]))
        if key in values:
            raise ValueError(f"two rows for {arm}={key[0]} {dict(zip(by, key[1:-1]))} seed {key[-1]}: "
                             "a paired comparison needs one run per seed")
        values[key] = transform(float(r[metric]))
    diffs: Dict[Tuple, Dict[int, float]] = {}
    for (name, *group, seed), v in values.items():
        ref = values.get((reference, *group, seed))
        if name != reference and ref is not None:
            diffs.setdefault((name, *group), {})[seed] = v - ref
    return diffs


def compare(d: Dict[int, float]) -> Dict[str, float]:
    """Paired summary of per-seed differences: n, mean, bootstrap 95 % interval, signed-rank sum, exact p."""
    values = [d[s] for s in sorted(d)]
    lo, hi = bootstrap_ci(values)
    signed_rank_sum, p = wilcoxon(values)
    return dict(n=len(values), mean=statistics.fmean(values), lo=lo, hi=hi, signed_rank_sum=signed_rank_sum,
                below=sum(v < 0 for v in values), above=sum(v > 0 for v in values), p=p)
