"""The model benchmark (`python -m timm_optdnn.training.benchmark`): smoke runs at toy size; its numbers are for
docs/models.md, not for tests."""
import functools
import json

import pytest
import torch

from timm_optdnn.training.benchmark import MB, main, peak_live_bytes, ratio, rows

pytestmark = pytest.mark.timeout(600)
TOY = ["convnext_iso_fm", "--img-size", "28", "--batch-size", "2", "--repeats", "2", "--steps", "1"]


def test_eager_and_compiled_side_by_side(capsys, monkeypatch):
    # the benchmark's mechanics, not inductor (tests/test_models.py compiles): AOT autograd's graphs, run eagerly
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    main(TOY + ["--format", "json"])
    runs = json.loads(capsys.readouterr().out)["convnext_iso_fm"]
    assert set(runs) == {"eager", "compiled"}
    for mode in runs.values():
        assert set(mode) == {"gd", "apg2"}
        assert all(len(r["img_s"]) == 2 and min(r["img_s"]) > 0 and r["peak_mb"] > 0 for r in mode.values())
    table = rows("convnext_iso_fm", runs).splitlines()
    assert [line.split(" | ")[1] for line in table] == ["gd", "apg2", "**apg2 / gd**"]
    paired = [a / g for a, g in zip(runs["compiled"]["apg2"]["img_s"], runs["compiled"]["gd"]["img_s"])]
    assert f"**{sorted(paired)[0] + (sorted(paired)[1] - sorted(paired)[0]) / 2:.3f}**" in table[2].split(" | ")[3]
    assert table[2].split(" | ")[5] == f"{runs['eager']['apg2']['peak_mb'] / runs['eager']['gd']['peak_mb']:.3f}"


def test_table_starts_with_the_command(capsys):
    main(TOY + ["--modes", "eager"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("`python -m timm_optdnn.training.benchmark convnext_iso_fm --img-size 28")
    assert out[2].startswith("| size | scheme | eager train img/s | compiled train img/s |")
    assert out[4].startswith("| convnext_iso_fm | gd |") and out[4].endswith("| - |")  # no compiled run: '-'
    assert out[6].startswith("| convnext_iso_fm | **apg2 / gd** | **")


def test_ratio_is_the_median_of_the_rounds_ratios():
    assert ratio([2.0, 3.0, 10.0], [1.0, 3.0, 2.0]) == "**2.000** (1.00-5.00)"


def test_peak_live_bytes_is_the_most_alive_at_once():
    def one_at_a_time():
        for _ in range(3):
            torch.ones(MB // 4)  # 1 MiB, freed before the next

    def all_at_once():
        return [torch.ones(MB // 4) for _ in range(3)]

    assert (peak_live_bytes(one_at_a_time), peak_live_bytes(all_at_once)) == (MB, 3 * MB)


@pytest.mark.parametrize("args, message", [(["vit_xl"], "unknown model size(s) ['vit_xl']"),
                                           (["--batch-size", "0"], "--batch-size must be >= 1"),
                                           (["--repeats", "0"], "--repeats must be >= 1"),
                                           (["--device", "mps"], "--device mps: cpu or cuda"),
                                           (["--device", "tpu"], "--device 'tpu': Expected one of"),
                                           (["--device", "cuda:0"], "this torch sees no CUDA device")])
def test_bad_inputs(capsys, args, message):
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
