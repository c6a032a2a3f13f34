"""The toy universality experiments: each --quick mode end to end, and the MLP they are built on; the
Fashion-MNIST scheme comparison's --quick mode through the real trainer; the depth experiment's --quick mode, its
decision rule and the paired statistics."""
import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from experiments import common, depth, fmnist_schemes, parity, rings, sawtooth, width_depth
from timm_optdnn.models.mlp import OptDNNMLP
from timm_optdnn.models.schemes import SCHEMES, SchemeBlocks, init_coefficients

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.fixture
def built(monkeypatch):
    """Every OptDNNMLP the experiment constructs, in order."""
    models = []
    init = OptDNNMLP.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        models.append(self)

    monkeypatch.setattr(OptDNNMLP, "__init__", spy)
    return models


# per experiment: metric -> (low, high) that any sane run satisfies, even after the few quick steps
SANE = {
    rings: dict(test_acc=(0.5, 1.0), margin_q05=(-math.inf, math.inf)),  # rings: better than a coin
    parity: dict(train_err=(0.0, 0.5), test_err=(0.0, 1.0)),  # parity: the training set is being fitted
    sawtooth: dict(train_mse=(0.0, 1.0), test_mse=(0.0, 1.0), solved=(0.0, 1.0)),  # targets lie in [0, 1]
    width_depth: dict(test_mse=(0.0, 1.0)),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("experiment", list(SANE), ids=lambda m: m.NAME)
def test_quick_mode(experiment, tmp_path, built):
    rows = experiment.main(["--quick", "--out", str(tmp_path)])

    with open(tmp_path / f"{experiment.NAME}.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) > 0
    assert {r["scheme"] for r in table} == set(SCHEMES)
    for r in table:
        for key, (lo, hi) in SANE[experiment].items():
            assert lo <= float(r[key]) <= hi, f"{experiment.NAME} {r['scheme']}: {key}={r[key]}"
        # one learned momentum between consecutive blocks, none for gd; equal budgets up to those scalars
        assert len(r["coef"].split()) == (0 if r["scheme"] == "gd" else int(r["depth"]) - 1)
        twin = next(t for t in table if t["scheme"] == "gd" and t["depth"] == r["depth"] and t["width"] == r["width"])
        assert int(r["params"]) - int(twin["params"]) == len(r["coef"].split())

    png = matplotlib.image.imread(tmp_path / f"{experiment.NAME}.png")
    assert png.ndim == 3 and min(png.shape[:2]) > 200 and png[..., :3].std() > 0.05  # a real, non-blank figure

    # the networks trained are the scheme driver's, one per CSV row, with the row's scheme and depth
    assert len(built) == len(table)
    for model, r in zip(built, table):
        assert isinstance(model.blocks, SchemeBlocks)
        assert (model.blocks.scheme, len(model.blocks), model.width) == (r["scheme"], int(r["depth"]), int(r["width"]))


@pytest.mark.timeout(240)
def test_fmnist_schemes_quick_trains_each_scheme_through_the_driver(tmp_path):
    from timm_optdnn.training.export import export_state_dict
    from timm_optdnn.training.config import load_config
    from timm_optdnn.training.trainer import create_model
    # a child process, as CI runs the command: its in-process training leaves distributed state behind
    r = subprocess.run([sys.executable, "-m", "experiments.fmnist_schemes", "--quick", "--out",
                        str(tmp_path), "--runs", str(tmp_path / "runs")], capture_output=True, text=True, timeout=230)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    with open(tmp_path / "fmnist_schemes.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["scheme"] for t in table] == list(SCHEMES)
    assert len({t["gflops"] for t in table}) == 1  # the same multiply-adds for every scheme
    for t in table:
        assert 20 < float(t["top1"]) <= 100, t  # chance is 10 %; 9 steps on 1,200 images reach ~45 %
        coef = [float(c) for c in t["coef"].split()]
        assert int(t["params"]) - int(table[0]["params"]) == len(coef)  # gd first: equal up to the coefficients
        # the network the trainer built from the run's saved config, holding the run's trained weights (strict)
        run = fmnist_schemes.run_dir(tmp_path / "runs", t["scheme"], int(t["seed"]))
        model = create_model(load_config(str(run / "config.yaml")))
        model.load_state_dict(export_state_dict(run))
        assert isinstance(model.blocks, SchemeBlocks) and model.blocks.scheme == t["scheme"]
        assert model.scheme_coefficients() == pytest.approx(coef, abs=6e-4)
        if coef:  # learned: trained away from the algorithm's schedule
            init = init_coefficients(t["scheme"], len(model.blocks))
            assert len(coef) == len(model.blocks) - 1 and max(abs(a - b) for a, b in zip(coef, init.tolist())) > 1e-3

    png = matplotlib.image.imread(tmp_path / "fmnist_schemes.png")
    assert png.ndim == 3 and min(png.shape[:2]) > 200 and png[..., :3].std() > 0.05


def test_mlp_two_layer_branches_paired_init_apg2_at_b0_is_gd():
    gd, apg2 = (common.build(dict(seed=0, width=5, depth=4, hidden=7, scheme=s), 3, 2) for s in ("gd", "apg2"))
    for branch in gd.blocks:
        assert (branch.fc1.in_features, branch.fc1.out_features, branch.fc2.out_features) == (5, 7, 5)
    # same seed, same weights (apg2 only adds its b_k): the experiments' scheme comparisons are paired
    assert set(apg2.state_dict()) - set(gd.state_dict()) == {"blocks.coef"}
    assert all(torch.equal(v, apg2.state_dict()[k]) for k, v in gd.state_dict().items())
    x = torch.randn(16, 3)
    assert not torch.allclose(apg2(x), gd(x))  # b_k = k/(k+3) differs from the baseline...
    with torch.no_grad():
        apg2.blocks.coef.zero_()
    torch.testing.assert_close(apg2(x), gd(x), rtol=0, atol=0)  # ...and b = 0 is the baseline exactly
    assert "blocks.coef" in apg2.no_weight_decay() and len(apg2.scheme_coefficients()) == 3


@pytest.mark.parametrize("kwargs, message", [(dict(width=0), "width"), (dict(hidden=2.5), "hidden"),
                                             (dict(scheme="adam"), "unknown scheme")])
def test_mlp_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptDNNMLP(**dict(dict(in_dim=2, out_dim=1, width=2, depth=2, hidden=4), **kwargs))


def test_bad_command_line_and_budget(tmp_path, capsys):
    with pytest.raises(SystemExit):
        rings.main(["--threads", "0", "--out", str(tmp_path)])
    assert "--threads must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bits"):
        parity.parity(0, seed=0)
    configs = common.grid(dict(width=2), seeds=(0,))
    with pytest.raises(SystemExit, match="time budget of 0 CPU s used up after 0/4 runs"):
        common.run_grid("over", tmp_path, configs, lambda cfg: ({}, None), budget_s=0)
    assert (tmp_path / "over.csv").exists()


# --- the depth experiment and the paired statistics --------------------------------------------------------------

@pytest.mark.timeout(120)
def test_depth_quick_mode_trains_every_arm_resumes_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    models = []
    init = depth.PreNormMLP.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        models.append(self)

    monkeypatch.setattr(depth.PreNormMLP, "__init__", spy)
    rows = depth.main(["--quick", "--out", str(tmp_path), "--workers", "1"])

    assert [(r["arm"], r["depth"], r["seed"]) for r in rows] == [(a, 4, 0) for a in depth.ARMS]
    gd = rows[0]
    for r, model in zip(rows, models):
        assert isinstance(model.blocks, SchemeBlocks) and len(model.blocks) == r["depth"] == 4
        assert r["diverged"] == 0 and r["steps"] == 23
        assert 0.3 < r["train_ce"] < math.log(10) and 0.3 < r["test_ce"] < math.log(10)  # learning, from chance
        assert 40 < r["test_top1"] < 100
        # the arms differ by their scheme scalars only: a momentum between blocks, the prox's gate per block
        coef, gates = r["coef"].split(), r["prox"].split()
        assert len(coef) == (0 if r["arm"] == "gd" else 3) and len(gates) == (4 if r["arm"] == "apg2_prox" else 0)
        assert model.blocks.scheme == depth.ARMS[r["arm"]]["scheme"] and model.blocks.prox == ("norm" if gates else "")
        assert r["params"] - gd["params"] == len(coef) + len(gates)
    text = (tmp_path / "depth.md").read_text()
    assert "## Decision (the pre-registered rule)" in text and all(f"**{a}**" in text for a in list(depth.ARMS)[1:])
    png = matplotlib.image.imread(tmp_path / "depth.png")
    assert png.ndim == 3 and min(png.shape[:2]) > 200 and png[..., :3].std() > 0.05

    # a rerun finds every run done: nothing is trained again, the CSV is unchanged, the report is rewritten
    before = (tmp_path / "depth.csv").read_text()
    models.clear()
    assert depth.main(["--quick", "--out", str(tmp_path), "--workers", "1"]) == depth.read_rows(
        tmp_path / "depth.csv", depth.QUICK)
    assert models == [] and (tmp_path / "depth.csv").read_text() == before
    # the full grid's settings differ: the quick CSV is refused by name, and left as it was
    with pytest.raises(ValueError, match="other settings.*epochs"):
        depth.main(["--out", str(tmp_path), "--workers", "1"])
    assert (tmp_path / "depth.csv").read_text() == before


def test_depth_arms_start_from_the_same_weights_and_prox_starts_as_apg2():
    torch.manual_seed(0)
    x = torch.randn(8, 784)
    nets = {}
    for arm in depth.ARMS:
        torch.manual_seed(3)
        nets[arm] = depth.PreNormMLP(5, arm, width=8, hidden=16)
    shared = nets["gd"].state_dict()
    for arm, net in nets.items():
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in shared.items()), arm
    torch.testing.assert_close(nets["apg2_prox"](x), nets["apg2"](x), rtol=0, atol=0)  # gated: exactly apg2 at init


def test_depth_divergence_counts_as_worst_and_the_decision_rule_can_go_either_way():
    def rows(effect):  # a complete synthetic grid: train_ce = gd's * exp(effect(arm, depth, seed))
        out = []
        for seed in range(10):
            for L in (4, 16, 64):
                for arm in depth.ARMS:
                    ce = 0.3 * math.exp(effect(arm, L, seed))
                    out.append(dict(arm=arm, depth=L, seed=seed, train_ce=ce, test_ce=ce, test_top1=90.0,
                                    loss_auc=ce, diverged=0))
        return out

    noise = [0.01 * (-1) ** s * (s + 1) for s in range(10)]  # symmetric: no effect
    grid = rows(lambda arm, L, s: {"gd": 0, "hb": noise[s], "apg2": -0.05 * math.log2(L) * (1 + s / 10),
                                   "apg2_prox": 0.2 + 0.001 * s}[arm])
    stats = depth.analyse(grid, depth.FULL)
    assert stats["decisions"] == {"hb": "no detectable difference", "apg2": "helps deep narrow networks",
                                  "apg2_prox": "hurts at depth 4, 16, 64"}
    c = stats["comparisons"]["train_ce"][("apg2", 64)]
    assert c["below"] == 10 and c["p"] == pytest.approx(2 / 1024) and c["lo"] < c["mean"] < c["hi"] < 0
    assert stats["slopes"]["apg2"]["mean"] < 0 and stats["slopes"]["apg2"]["p"] == pytest.approx(2 / 1024)
    # the same effect at every depth is no depth trend: the claim needs both parts
    flat = depth.analyse(rows(lambda arm, L, s: -0.1 - 0.01 * s if arm == "apg2" else 0.0), depth.FULL)
    assert flat["decisions"]["apg2"] == "no detectable difference"
    assert flat["comparisons"]["train_ce"][("apg2", 64)]["p_holm"] < 0.05

    # a diverged run is worse than every finite one (at least chance level), whatever it recorded
    grid[0] = dict(grid[0], arm="gd", train_ce=float("nan"), test_ce=float("inf"), test_top1=0.0, diverged=1)
    fixed = depth.with_divergences_worst(grid)
    assert fixed[0]["train_ce"] == max(math.log(10), max(r["train_ce"] for r in grid[1:]))
    assert fixed[0]["test_top1"] == min(10.0, min(r["test_top1"] for r in grid[1:]))
    assert depth.analyse(grid, depth.FULL)["comparisons"]["train_ce"][("apg2", 64)]["n"] == 10


def test_paired_statistics():
    # exact Wilcoxon: all signs agree -> 2 of 2^n patterns reach |T|; ties share ranks and stay exact
    assert common.wilcoxon([-0.1, -0.2, -0.3]) == (-6.0, 0.25)
    assert common.wilcoxon([1.0, 1.0, -1.0, 0.0]) == (2.0, 1.0)  # zero dropped; ranks 2, 2, 2
    assert common.wilcoxon([0.5, 0.5, 0.5, -0.1]) == (8.0, 0.25)  # ranks 3, 3, 3, 1: |T| >= 8 in 4 of 16
    assert common.sign_flip_p([1.0, 2.0, 4.0]) == 0.25 and common.sign_flip_p([0.0]) == 1.0
    with pytest.raises(ValueError, match="finite"):
        common.wilcoxon([1.0, float("inf")])
    # Holm: step-down, monotone, capped at 1
    assert common.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    lo, hi = common.bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert 1.0 <= lo < 2.5 < hi <= 4.0 and common.bootstrap_ci([2.0] * 5) == (2.0, 2.0)
    rows = [dict(scheme=s, seed=seed, m=v) for s, vals in (("gd", (1, 2)), ("apg2", (3, 1)))
            for seed, v in enumerate(vals)]
    assert common.paired(rows, "m", float) == {("apg2",): {0: 2.0, 1: -1.0}}
    with pytest.raises(ValueError, match="one run per seed"):
        common.paired(rows + rows[:1], "m", float)


def test_wilcoxon_matches_scipy_without_ties():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    for n in (4, 7, 10):
        for _ in range(20):
            d = (torch.randn(n, generator=gen) + 0.4).tolist()
            assert common.wilcoxon(d)[1] == pytest.approx(stats.wilcoxon(d, method="exact").pvalue, abs=1e-12)


def test_reread_of_the_earlier_experiments(tmp_path):
    for name in depth.EARLIER:
        shutil.copy(RESULTS / f"{name}.csv", tmp_path)
    assert depth.main(["--reread", "--out", str(tmp_path)]) == []
    table = [line.split(" | ") for line in (tmp_path / "depth_reread.md").read_text().splitlines()
             if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == 36  # 12 comparisons against gd: rings 2 metrics, parity, sawtooth, fmnist; width_depth 7
    rings_hb = next(t for t in table if t[0] == "| rings" and t[2].startswith("5 %") and t[3] == "hb")
    assert rings_hb[6:] == ["5/5", "0.062", "1.000 |"]  # 5 of 5 seeds: the smallest p 5 seeds can give
