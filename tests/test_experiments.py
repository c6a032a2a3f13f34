"""The toy universality experiments: each --quick mode end to end, and the MLP they are built on; the
Fashion-MNIST scheme comparison's --quick mode through the real trainer."""
import csv
import math
import subprocess
import sys

import matplotlib.image
import pytest
import torch

from experiments import common, fmnist_schemes, parity, rings, sawtooth, width_depth
from timm_optdnn.models.mlp import OptDNNMLP
from timm_optdnn.models.schemes import SCHEMES, SchemeBlocks, init_coefficients


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
        # one learned coefficient per block, none for gd; equal budgets up to those scalars
        assert len(r["coef"].split()) == (0 if r["scheme"] == "gd" else int(r["depth"]))
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
            assert len(coef) == len(model.blocks) and max(abs(a - b) for a, b in zip(coef, init.tolist())) > 1e-3

    png = matplotlib.image.imread(tmp_path / "fmnist_schemes.png")
    assert png.ndim == 3 and min(png.shape[:2]) > 200 and png[..., :3].std() > 0.05


def test_mlp_two_layer_branches_paired_init_apg2_at_t1_is_gd():
    gd, apg2 = (common.build(dict(seed=0, width=5, depth=4, hidden=7, scheme=s), 3, 2) for s in ("gd", "apg2"))
    for branch in gd.blocks:
        assert (branch.fc1.in_features, branch.fc1.out_features, branch.fc2.out_features) == (5, 7, 5)
    # same seed, same weights (apg2 only adds its t_k): the experiments' scheme comparisons are paired
    assert set(apg2.state_dict()) - set(gd.state_dict()) == {"blocks.coef"}
    assert all(torch.equal(v, apg2.state_dict()[k]) for k, v in gd.state_dict().items())
    x = torch.randn(16, 3)
    assert not torch.allclose(apg2(x), gd(x))  # t_k = 2/(k+2) differs from the baseline...
    with torch.no_grad():
        apg2.blocks.coef.fill_(1.0)
    torch.testing.assert_close(apg2(x), gd(x))  # ...and t_k = 1 is the baseline exactly
    assert "blocks.coef" in apg2.no_weight_decay() and len(apg2.scheme_coefficients()) == 4


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
