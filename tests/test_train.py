"""The trainer as users run it: real DeepSpeed processes (2 CPU ranks over gloo), real Fashion-MNIST betons.

One uninterrupted ZeRO-2 run (deepspeed launcher) is the reference; a 2-node torchrun run of the same recipe is
preempted with SIGTERM and resumed with the deepspeed launcher, and must reproduce the reference losses step for
step; a ZeRO-1 run with an absurd lr must stop on the non-finite loss with its last checkpoint intact.

Random crops and flips are on: our FFCV decoder seeds them per (seed, epoch, sample), so a resumed run, or one with
another batch split (grad_accum), sees the same images; drop-path and the data order are random and seeded too.
"""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = ["model=optdnn_apg2_convnext_iso_fm", "model_kwargs={dim: 32, depth: 3}", "num_classes=10", "img_size=28",
        "crop_pct=1.0", "scale=[0.35,1.0]", "hflip=0.5", "batch_size=32", "val_batch_size=100", "num_workers=1", "epochs=2",
        "lr=2e-3", "warmup_epochs=0.5", "drop_path=0.1", "ema=true", "ema_decay=0.9", "layer_decay=0.9",
        "ckpt_every_steps=6", "keep_last=2", "log_every_steps=5", "threads=1", "dist_timeout_s=120"]


def _port() -> int:
    from timm_optdnn.training.trainer import _free_port
    return _free_port()


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def deepspeed_cmd(*args: str) -> list:
    return [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()),
            "--module", "train", *args]


def torchrun_cmd(node_rank: int, port: int, *args: str) -> list:
    """One of two torchrun agents, 2 "nodes" of one rank each on 127.0.0.1."""
    return [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "train", *args]


def wait_for_checkpoint(out: Path, agents: list, log: Callable[[], str], timeout: int = 420) -> None:
    """Until the run has a checkpoint down, with every agent still alive."""
    deadline = time.time() + timeout
    while not (out / "checkpoints" / "latest").is_file():
        assert time.time() < deadline and all(a.poll() is None for a in agents), log()[-3000:]
        time.sleep(0.05)


def run(cmd: list, timeout: int = 420) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    r.log = r.stdout + r.stderr
    return r


def steps(out: Path) -> list:
    return [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader((out / "steps.csv").open())]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from timm_optdnn.data import write_beton
    d = tmp_path_factory.mktemp("fm")
    write_beton("fashion-mnist", d / "train.beton", split="train", subset=0.02)  # 1200 images: 18 steps/epoch
    write_beton("fashion-mnist", d / "test.beton", split="test", subset=0.05)  # 500 images
    return [f"train_path={d / 'train.beton'}", f"val_path={d / 'test.beton'}"]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted ZeRO-2 run through the deepspeed launcher."""
    out = tmp_path_factory.mktemp("ref")
    cmd = deepspeed_cmd(*TINY, *data, "zero_stage=2", f"out_dir={out}")
    r = run(cmd)
    assert r.returncode == 0, r.log[-3000:]
    return out, r.log, cmd[cmd.index("--master_port") + 1]


@pytest.mark.timeout(480)
def test_zero2_run_logs_evaluates_and_keeps_last_checkpoints(reference):
    out, log, port = reference
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "finished" and result["step"] == 2 * (1200 // 64)
    assert result["last"]["val_count"] == 500  # each val sample counted exactly once over the 2 ranks
    assert 0 <= result["last"]["top1"] <= 100 and result["last"]["top1"] <= result["last"]["top5"]
    assert result["last"]["ema_top1"] is not None
    assert [int(r["epoch"]) for r in csv.DictReader((out / "summary.csv").open())] == [1, 2]
    assert [int(s) for s, _, _ in steps(out)] == list(range(1, 37))
    tags = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert tags == ["step00000030", "step00000036"]  # keep_last=2
    assert (out / "checkpoints" / "latest").read_text() == "step00000036"
    assert (out / "curves.png").stat().st_size > 0 and any((out / "tb").iterdir())
    assert (out / "config.yaml").is_file() and "epoch 2/2" in log
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # DeepSpeed's segments released
    # the learned APG2 coefficients moved away from their 2/(k+2) start
    assert result["scheme_coefficients"][0] != 1.0 or result["scheme_coefficients"][1] != round(2 / 3, 4)


@pytest.mark.timeout(120)
def test_export_reload_matches_training_eval(reference, data, tmp_path):
    import timm
    from conftest import make_loaders
    from timm_optdnn.training.export import export
    from timm_optdnn.training.trainer import evaluate
    out, *_ = reference
    last = json.loads((out / "result.json").read_text())["last"]
    _, val = make_loaders(data[0].split("=", 1)[1], data[1].split("=", 1)[1], num_classes=10, batch_size=32,
                            val_batch_size=100, num_workers=1, img_size=28, crop_pct=1.0,
                            mean=(0.286,) * 3, std=(0.353,) * 3)
    for ema, key in ((False, "top1"), (True, "ema_top1")):
        f = export(out, tmp_path / f"m_{ema}.safetensors", ema=ema)  # ZeRO-2 shards consolidated by DeepSpeed
        model = timm.create_model("optdnn_apg2_convnext_iso_fm", pretrained=True, dim=32, depth=3,
                                  pretrained_cfg_overlay=dict(file=str(f)))
        assert evaluate(model, val, torch.float32, torch.device("cpu"), lockstep=False)["top1"] == \
            pytest.approx(last[key], abs=1e-9)


@pytest.mark.timeout(900)
def test_torchrun_two_nodes_sigterm_then_exact_resume(reference, data, tmp_path):
    ref_out, *_ = reference
    out = tmp_path / "run"
    port = _port()
    agents = [subprocess.Popen(torchrun_cmd(rank, port, *TINY, *data, "zero_stage=2", f"out_dir={out}"), cwd=ROOT,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for rank in (0, 1)]
    wait_for_checkpoint(out, agents, lambda: agents[0].stdout.read())  # preempt once the first checkpoint is down
    for a in agents:
        a.send_signal(signal.SIGTERM)
    logs = [a.communicate(timeout=120)[0] for a in agents]
    assert "received ['SIGTERM']" in logs[0] + logs[1], logs[0][-3000:]
    stopped = json.loads((out / "result.json").read_text())
    assert stopped["status"] == "preempted" and 6 <= stopped["step"] < 36
    assert (out / "checkpoints" / "latest").read_text() == f"step{stopped['step']:08d}"

    r = run(deepspeed_cmd(*TINY, *data, "zero_stage=2", f"out_dir={out}", "resume=auto"))
    assert r.returncode == 0, r.log[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step'}" in r.log
    assert steps(out) == steps(ref_out)  # same loss and lr at every one of the 36 steps


# fp32, no drop-path, no EMA: runs that differ only in how a step's batch is split into micro-batches (grad_accum)
# or how the model is sharded (ZeRO stage) compute the same steps up to float rounding. AdamW's update hardly
# depends on the gradient's scale, so a wrongly scaled accumulation would pass; with eps=1 >> |grad| the update is
# ~lr x grad, as SGD's (AdamW kept: the reference runs use the recipes' optimizer).
PLAIN = [*TINY, "drop_path=0", "ema=false", "opt_eps=1.0", "lr=0.1", "warmup_epochs=0"]


@pytest.fixture(scope="module")
def plain(data, tmp_path_factory):
    """PLAIN, ZeRO-1, batch 32, no accumulation: 2 epochs of 18 steps."""
    out = tmp_path_factory.mktemp("plain")
    r = run(deepspeed_cmd(*PLAIN, *data, "zero_stage=1", f"out_dir={out}"))
    assert r.returncode == 0, r.log[-3000:]
    return out


def assert_same_steps(a: list, b: list, rtol: float) -> None:
    """Same step numbers and lr at every step; losses equal up to float rounding."""
    assert [(s, lr) for s, _, lr in a] == [(s, lr) for s, _, lr in b]
    assert [float(x) for _, x, _ in a] == pytest.approx([float(x) for _, x, _ in b], rel=rtol)


@pytest.mark.timeout(900)
def test_grad_accum_2_equals_double_batch_and_resumes_mid_epoch(plain, data, tmp_path):
    from timm_optdnn.training.export import client_state
    # batch 16 x 2 micro-batches per step sees the same samples per step as batch 32: each rank's order is the
    # same shard of the same permutation, cut into 16s instead of 32s. With drop_last, 600 samples per rank give 37
    # batches of 16 (one left over, not read) and 18 of 32, so both runs have 18 steps per epoch over the same
    # 576 samples. The gradients agree only up to rounding (a mean of 32 vs the mean of two means of 16).
    out = tmp_path / "accum"
    ga = [*PLAIN, *data, "zero_stage=1", "batch_size=16", "grad_accum=2", f"out_dir={out}"]
    r = run(deepspeed_cmd(*ga, "max_steps=20"))  # stops 2 steps (4 micro-batches) into epoch 2
    assert r.returncode == 0, r.log[-3000:]
    assert "world 2 x batch 16 x accum 2 = 64" in r.log and "18 steps/epoch, 36 total" in r.log
    assert [int(s) for s, _, _ in steps(out)] == list(range(1, 21))  # one row per optimizer step
    tags = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert tags == ["step00000018", "step00000020"]  # ckpt_every_steps=6 and the epoch end count optimizer steps
    state = client_state(out, "step00000020")
    assert (state["epoch"], state["batches_done"], state["global_steps"]) == (1, 4, 20)  # skip counts micro-batches

    r = run(deepspeed_cmd(*ga))
    assert r.returncode == 0 and "resumed from" in r.log, r.log[-3000:]
    ref = steps(plain)
    assert len({lr for _, _, lr in ref}) == 36  # the lr changes at every step, so a scheduler off by a step shows
    # measured: the losses agree to 1.2e-7 at all 36 steps, while one update moves the loss by ~5 %
    assert_same_steps(steps(out), ref, rtol=1e-6)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 3])
def test_zero0_and_zero3_step_like_zero1_and_export(plain, data, tmp_path, stage):
    import timm
    from timm_optdnn.training.export import export_state_dict
    r = run(deepspeed_cmd(*PLAIN, *data, f"zero_stage={stage}", f"out_dir={tmp_path}", "max_steps=4"))
    assert r.returncode == 0, r.log[-3000:]
    assert f"ZeRO-{stage} fp32" in r.log
    # where the optimizer state and parameters live changes, the arithmetic does not: ZeRO-1's 4 steps
    assert_same_steps(steps(tmp_path), steps(plain)[:4], rtol=1e-6)
    state = export_state_dict(tmp_path)  # ZeRO-3: every rank's parameter shards consolidated by DeepSpeed
    model = timm.create_model("optdnn_apg2_convnext_iso_fm", num_classes=10, dim=32, depth=3)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(state)


@pytest.mark.timeout(300)
def test_other_timm_optimizer_under_zero2(data, tmp_path):
    """DeepSpeed accepts only its own optimizer list under ZeRO unless told otherwise; the recipe's `opt` is any
    of timm's."""
    r = run(deepspeed_cmd(*TINY, *data, "zero_stage=2", "opt=sgd", "lr=0.05", f"out_dir={tmp_path}", "max_steps=6"))
    assert r.returncode == 0, r.log[-3000:]
    losses = [float(x) for _, x, _ in steps(tmp_path)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


@pytest.mark.timeout(300)
def test_bf16_zero1_on_cpu_computes_in_bf16_with_fp32_master_weights(plain, data, tmp_path):
    from timm_optdnn.training.export import client_state, export_state_dict
    r = run(deepspeed_cmd(*PLAIN, *data, "zero_stage=1", "precision=bf16", f"out_dir={tmp_path}", "max_steps=8"))
    assert r.returncode == 0, r.log[-3000:]
    assert "ZeRO-1 bf16 on cpu" in r.log
    assert json.loads((tmp_path / "result.json").read_text())["compute_dtype"] == "torch.bfloat16"
    losses, ref = [float(x) for _, x, _ in steps(tmp_path)], [float(x) for _, x, _ in steps(plain)[:8]]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) / 3 < losses[0] - 0.1
    assert losses == pytest.approx(ref, rel=2e-3) and losses != ref  # bf16: near fp32 (measured 1.6e-4), not equal
    module, master = client_state(tmp_path)["module"], export_state_dict(tmp_path)
    assert {v.dtype for v in module.values()} == {torch.bfloat16}
    assert {v.dtype for v in master.values()} == {torch.float32}
    assert all(torch.equal(master[k].bfloat16(), module[k]) for k in module)  # the module is the master, rounded
    assert any(not torch.equal(master[k], module[k].float()) for k in module)  # and the master keeps more bits


@pytest.mark.timeout(480)
def test_zero1_nonfinite_loss_stops_with_last_checkpoint_intact(data, tmp_path):
    from timm_optdnn.training.export import export_state_dict
    r = run(deepspeed_cmd(*TINY, *data, "zero_stage=1", f"out_dir={tmp_path}", "lr=1e12", "warmup_epochs=0",
                          "ckpt_every_steps=1"))
    assert r.returncode != 0 and "non-finite loss" in r.log, r.log[-3000:]
    tag = (tmp_path / "checkpoints" / "latest").read_text()
    assert tag.startswith("step") and int(tag[4:]) >= 1
    assert export_state_dict(tmp_path)  # ZeRO-1 shards of the last good step consolidate


def _worker(agent: subprocess.Popen):
    """The training process a torchrun agent started (one per agent here)."""
    import psutil
    deadline = time.time() + 60
    while True:
        procs = [p for p in psutil.Process(agent.pid).children(recursive=True) if "train" in p.cmdline()]
        if procs or time.time() > deadline:
            assert len(procs) == 1, procs
            return procs[0]
        time.sleep(0.5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_dead_or_hung_rank_ends_the_run_within_dist_timeout(data, tmp_path, sig):
    """Two torchrun agents (2 "nodes" on 127.0.0.1, so neither launcher kills the other's rank): rank 1 is
    killed (its sockets close) or stopped (a hung node: its sockets stay open, only the timeout can tell)
    mid-training. Rank 0 must fail within dist_timeout_s, not hang, and `latest` must name a complete checkpoint."""
    from timm_optdnn.training.export import client_state, export_state_dict
    timeout_s, out, port = 20, tmp_path / "run", _port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    agents = [subprocess.Popen(
        torchrun_cmd(rank, port, *TINY, *data, "zero_stage=1", "ckpt_every_steps=1", f"dist_timeout_s={timeout_s}",
                     f"out_dir={out}"),
        cwd=ROOT, env=_env(), stdout=logs[rank].open("w"), stderr=subprocess.STDOUT) for rank in (0, 1)]
    victim = None
    try:
        survivor, victim = _worker(agents[0]), _worker(agents[1])
        wait_for_checkpoint(out, agents, logs[0].read_text)  # training, with a checkpoint down
        victim.send_signal(sig)
        t0 = time.time()
        agents[0].wait(timeout=timeout_s + 100)
        elapsed = time.time() - t0
        log = logs[0].read_text()
        assert agents[0].returncode != 0 and not survivor.is_running(), log[-3000:]
        assert elapsed < timeout_s + 60, f"rank 0 needed {elapsed:.0f} s to give up"
        if sig == signal.SIGSTOP:  # gloo's timeout; DeepSpeed's groups had torch's 30 min before set_group_timeouts
            assert f"Timed out waiting {timeout_s * 1000}ms" in log, log[-3000:]
    finally:
        if victim is not None and victim.is_running():  # the stopped rank: a cluster's scheduler would end it
            victim.kill()
        for a in agents:
            if a.poll() is None:
                a.kill()
            a.wait(timeout=60)
    assert agents[1].returncode != 0
    root = out / "checkpoints"
    tag = (root / "latest").read_text()
    assert {p.name for p in (root / tag).iterdir()} >= {"mp_rank_00_model_states.pt", "rng_rank0.pt", "rng_rank1.pt"}
    assert client_state(out)["global_steps"] == int(tag[4:])
    assert export_state_dict(out)  # both ranks' ZeRO-1 shards are there


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides, message", [
    (["lrr=1e-3"], "unknown config key(s): lrr (did you mean lr?)"),
    (["batch_size=12.5"], "batch_size=12.5 (float) is not a valid"),
    (["ema=true", "zero_stage=3"], "ema=true needs zero_stage <= 2"),
    (["zero_stage=4"], "zero_stage=4"),
    (["model=resnet_nope"], "model='resnet_nope' is not a registered timm model"),
    (["warmup_epochs=10", "epochs=5"], "warmup_epochs=10.0 must be < epochs=5"),
    (["res_schedule=[160,192]"], "res_schedule=[160, 192]"),
    (["precision=fp16", "device=cpu"], "precision=fp16 needs a GPU"),
    (["repeated_aug=-1"], "repeated_aug=-1 must be >= 0"),
    (["epochs"], "override 'epochs' is not key=value"),
])
def test_config_errors_are_clear(overrides, message):
    from timm_optdnn.training.config import ConfigError, load_config
    with pytest.raises(ConfigError) as e:
        load_config(str(ROOT / "configs" / "demo.yaml"), overrides)
    assert message in str(e.value)


@pytest.mark.timeout(120)
def test_cli_rejects_bad_config_before_work_and_plans(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: optdnn_apg2_vit_s\nbatch_sizee: 64\n")
    r = run([PY, "-m", "train", "--config", str(bad)], timeout=60)
    assert r.returncode == 2 and "unknown config key(s): batch_sizee (did you mean batch_size?)" in r.stderr
    r = run([PY, "-m", "train", "--config", "configs/optdnn_apg2_vit_s.yaml", "--plan", "plan_nodes=4"], timeout=90)
    assert r.returncode == 0, r.log[-2000:]
    assert "4 node(s) x 8 GPUs = 32 ranks" in r.stdout and "128 per GPU x accum 1 = 4096 global" in r.stdout
    assert "312 / epoch (1281167 images)" in r.stdout and "GPU-hours" in r.stdout
