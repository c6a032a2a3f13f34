"""The trainer as users run it: real DeepSpeed processes (2 CPU ranks over gloo), real Fashion-MNIST betons.

One uninterrupted ZeRO-2 run (deepspeed launcher) is the reference; a 2-node torchrun run of the same recipe is
preempted with SIGTERM, its newest checkpoint damaged, and resumed with the deepspeed launcher from the intact one
before it: it must reproduce the reference losses step for step. Other runs check grad accumulation, ZeRO 0-3,
torch.compile, gradient checkpointing, bf16 and fp16, the non-finite-loss stop and a dead or hung rank; the checks
that need no training (recipes, the out_dir policy, damaged checkpoints, validation) run without starting one.

Random crops and flips are on: our FFCV decoder seeds them per (seed, epoch, sample), so a resumed run, or one with
another batch split (grad_accum), sees the same images; drop-path and the data order are random and seeded too.
"""
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from timm_optdnn.models.schemes import init_coefficients
from timm_optdnn.training.launch import free_port
from timm_optdnn.training.run_dir import RunDir

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = ["model.name=optdnn_apg2_convnext_iso_fm", "model.kwargs={dim: 32, depth: 3}", "model.num_classes=10",
        "model.drop_path=0.1", "model.ema=true", "model.ema_decay=0.9",
        "data.img_size=28", "data.crop_pct=1.0", "data.scale=[0.35,1.0]", "data.hflip=0.5", "data.batch_size=32",
        "data.val_batch_size=100", "data.num_workers=1",
        "optim.lr=2e-3", "optim.layer_decay=0.9", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
        "run.ckpt_every_steps=6", "run.keep_last=2", "run.log_every_steps=5", "run.resume=auto",
        "dist.threads=1", "dist.timeout_s=120"]
# fp32, no drop-path, no EMA: runs that differ only in how a step's batch is split into micro-batches (grad_accum),
# how the model is sharded (ZeRO stage), compiled or checkpointed compute the same steps up to float rounding.
# AdamW's update hardly depends on the gradient's scale, so a wrongly scaled accumulation would pass; with eps=1 >>
# |grad| the update is ~lr x grad, as SGD's (AdamW kept: the reference runs use the recipes' optimizer).
PLAIN = [*TINY, "model.drop_path=0", "model.ema=false", "optim.eps=1.0", "optim.lr=0.1", "schedule.warmup_epochs=0"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def deepspeed_cmd(*args: str) -> list:
    return [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
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


def files(path: Path) -> dict:
    """Every file under `path` and its sha256: what a refused run must leave untouched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_steps(a: list, b: list, rtol: float) -> None:
    """Same step numbers and lr at every step; losses equal up to float rounding."""
    assert [(s, lr) for s, _, lr in a] == [(s, lr) for s, _, lr in b]
    assert [float(x) for _, x, _ in a] == pytest.approx([float(x) for _, x, _ in b], rel=rtol)


@pytest.fixture(scope="module")
def reference(fmnist_betons, tmp_path_factory):
    """The uninterrupted ZeRO-2 run through the deepspeed launcher."""
    out = tmp_path_factory.mktemp("ref")
    cmd = deepspeed_cmd(*TINY, *fmnist_betons, "dist.zero_stage=2", f"run.out_dir={out}")
    r = run(cmd)
    assert r.returncode == 0, r.log[-3000:]
    return out, r.log, cmd[cmd.index("--master_port") + 1]


@pytest.fixture(scope="module")
def plain(fmnist_betons, tmp_path_factory):
    """PLAIN, ZeRO-1, batch 32, no accumulation: 2 epochs of 18 steps, evaluated after the 2nd only."""
    out = tmp_path_factory.mktemp("plain")
    r = run(deepspeed_cmd(*PLAIN, *fmnist_betons, "dist.zero_stage=1", "run.eval_every_epochs=2",
                          f"run.out_dir={out}"))
    assert r.returncode == 0, r.log[-3000:]
    return out


# --------------------------------------------------------------------------------------------- full runs

@pytest.mark.timeout(480)
def test_zero2_run_logs_evaluates_and_keeps_last_checkpoints(reference):
    out, log, port = reference
    run_dir = RunDir(out)
    result = json.loads(run_dir.result.read_text())
    assert result["status"] == "finished" and result["step"] == 2 * (1200 // 64)
    assert result["run_id"] == run_dir.run_id()
    assert result["last"]["val_count"] == 500  # each val sample counted exactly once over the 2 ranks
    assert 0 <= result["last"]["top1"] <= 100 and result["last"]["top1"] <= result["last"]["top5"]
    assert result["last"]["ema_top1"] is not None
    assert [int(r["epoch"]) for r in csv.DictReader(run_dir.summary.open())] == [1, 2]
    assert [int(s) for s, _, _ in steps(out)] == list(range(1, 37))
    assert run_dir.tags() == ["step00000030", "step00000036"]  # keep_last=2
    assert run_dir.latest() == result["checkpoint"] == "step00000036"
    assert run_dir.check("step00000036", world_size=2) is None
    assert run_dir.manifest("step00000036")["run_id"] == result["run_id"]
    assert run_dir.curves.stat().st_size > 0 and any(run_dir.tb.iterdir())
    assert run_dir.recorded_config()["model"]["kwargs"] == {"dim": 32, "depth": 3} and "epoch 2/2" in log
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # DeepSpeed's segments released
    # the learned APG2 coefficients moved away from the algorithm's schedule, and are logged each epoch
    init = init_coefficients("apg2", 3).tolist()
    assert max(abs(c - i) for c, i in zip(result["scheme_coefficients"], init)) > 1e-3
    assert result["coef_above_1"] == sum(c > 1 for c in result["scheme_coefficients"])
    assert log.count("scheme coefficients: ") == 2


def test_summary_keeps_its_columns_when_an_epoch_is_not_evaluated(plain):
    with RunDir(plain).summary.open() as f:
        header, *rows = list(csv.reader(f))
    assert len(rows) == 2 and all(len(r) == len(header) for r in rows)
    first, second = (dict(zip(header, r)) for r in rows)
    assert first["eval_top1"] == "" and 0 <= float(second["eval_top1"]) <= 100


@pytest.mark.timeout(120)
def test_export_reload_matches_training_eval(reference, fmnist_betons, tmp_path):
    import timm
    from conftest import make_loaders
    from timm_optdnn.training.export import export
    from timm_optdnn.training.trainer import evaluate
    out, *_ = reference
    last = json.loads((out / "result.json").read_text())["last"]
    train_path, val_path = (arg.split("=", 1)[1] for arg in fmnist_betons)
    _, val = make_loaders(train_path, val_path, num_classes=10, batch_size=32,
                          val_batch_size=100, num_workers=1, img_size=28, crop_pct=1.0,
                          mean=(0.286,) * 3, std=(0.353,) * 3)
    for ema, key in ((False, "top1"), (True, "ema_top1")):
        f = export(out, tmp_path / f"m_{ema}.safetensors", ema=ema)  # ZeRO-2 shards consolidated by DeepSpeed
        model = timm.create_model("optdnn_apg2_convnext_iso_fm", pretrained=True, dim=32, depth=3,
                                  pretrained_cfg_overlay=dict(file=str(f)))
        assert evaluate(model, val, torch.device("cpu"))["top1"] == pytest.approx(last[key], abs=1e-9)


@pytest.mark.timeout(900)
def test_torchrun_sigterm_then_resume_past_a_damaged_checkpoint_is_exact(reference, fmnist_betons, tmp_path):
    """Preempted by SIGTERM on 2 torchrun "nodes": it saves and exits. Then its newest checkpoint is truncated (a
    half-copied file) and `latest` is the only pointer to it: the resumed run names the damaged file, falls back to
    the checkpoint before, leaves another run's checkpoint in the directory alone, and ends with the reference's
    loss and lr at every one of the 36 steps."""
    ref_out, *_ = reference
    out = tmp_path / "run"
    port = free_port()
    agents = [subprocess.Popen(torchrun_cmd(rank, port, *TINY, *fmnist_betons, "dist.zero_stage=2",
                                            f"run.out_dir={out}"),
                               cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for rank in (0, 1)]
    wait_for_checkpoint(out, agents, lambda: agents[0].stdout.read())  # preempt once the first checkpoint is down
    for a in agents:
        a.send_signal(signal.SIGTERM)
    logs = [a.communicate(timeout=120)[0] for a in agents]
    assert "received ['SIGTERM']" in logs[0] + logs[1], logs[0][-3000:]
    run_dir = RunDir(out)
    stopped = json.loads(run_dir.result.read_text())
    assert stopped["status"] == "preempted" and 6 < stopped["step"] < 36
    newest, before = run_dir.tags()[-1], run_dir.tags()[-2]
    assert run_dir.latest() == newest == f"step{stopped['step']:08d}"

    damaged = run_dir.model_states(newest)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    foreign = run_dir.checkpoint("step00000001")  # another run's checkpoint (its own id): not this run's to delete
    shutil.copytree(run_dir.checkpoint(before), foreign)
    manifest = run_dir.manifest(before)
    (foreign / "manifest.json").write_text(json.dumps(dict(manifest, run_id="another run", step=1)))

    r = run(deepspeed_cmd(*TINY, *fmnist_betons, "dist.zero_stage=2", f"run.out_dir={out}"))
    assert r.returncode == 0, r.log[-3000:]
    assert f"passing over: {damaged} is " in r.log and "truncated" in r.log
    assert f"resumed from {run_dir.checkpoint(before)}:" in r.log
    assert steps(out) == steps(ref_out)  # same loss and lr at every one of the 36 steps
    assert run_dir.tags() == ["step00000001", "step00000030", "step00000036"]  # keep_last=2 of this run's own


@pytest.mark.timeout(900)
def test_grad_accum_2_equals_double_batch_and_resumes_mid_epoch(plain, fmnist_betons, tmp_path):
    # batch 16 x 2 micro-batches per step sees the same samples per step as batch 32: each rank's order is the
    # same shard of the same permutation, cut into 16s instead of 32s. With drop_last, 600 samples per rank give 37
    # batches of 16 (one left over, not read) and 18 of 32, so both runs have 18 steps per epoch over the same
    # 576 samples. The gradients agree only up to rounding (a mean of 32 vs the mean of two means of 16).
    out = tmp_path / "accum"
    ga = [*PLAIN, *fmnist_betons, "dist.zero_stage=1", "data.batch_size=16", "optim.grad_accum=2", f"run.out_dir={out}"]
    r = run(deepspeed_cmd(*ga, "schedule.max_steps=20"))  # stops 2 steps (4 micro-batches) into epoch 2
    assert r.returncode == 0, r.log[-3000:]
    assert "world 2 x batch 16 x accum 2 = 64" in r.log and "18 steps/epoch, 36 total" in r.log
    assert [int(s) for s, _, _ in steps(out)] == list(range(1, 21))  # one row per optimizer step
    assert RunDir(out).tags() == ["step00000018", "step00000020"]  # ckpt_every_steps and epoch ends count steps
    state = RunDir(out).client_state("step00000020")
    assert (state["epoch"], state["batches_done"], state["global_steps"]) == (1, 4, 20)  # skip counts micro-batches

    r = run(deepspeed_cmd(*ga))
    assert r.returncode == 0 and "resumed from" in r.log, r.log[-3000:]
    ref = steps(plain)
    assert len({lr for _, _, lr in ref}) == 36  # the lr changes at every step, so a scheduler off by a step shows
    # measured: the losses agree to 1.2e-7 at all 36 steps, while one update moves the loss by ~5 %
    assert_same_steps(steps(out), ref, rtol=1e-6)
    assert [int(r["epoch"]) for r in csv.DictReader(RunDir(out).summary.open())] == [1, 2]  # the partial row went


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", [["dist.zero_stage=0", "model.compile=true", "dist.timeout_s=600"],
                                     ["dist.zero_stage=3", "model.grad_checkpointing=true", "data.channels_last=true"]],
                         ids=["zero0-compiled", "zero3-grad-checkpointing-channels-last"])
def test_zero_stages_compile_and_checkpointing_step_like_zero1_eager(plain, fmnist_betons, tmp_path, variant):
    """Where the optimizer state and parameters live, torch.compile, recomputed activations and the memory format
    change how the steps are computed, not their arithmetic: ZeRO-1 eager's 4 steps to float rounding."""
    import timm
    from timm_optdnn.training.export import export_state_dict
    r = run(deepspeed_cmd(*PLAIN, *fmnist_betons, *variant, f"run.out_dir={tmp_path}", "schedule.max_steps=4"),
            timeout=540)
    assert r.returncode == 0, r.log[-3000:]
    assert_same_steps(steps(tmp_path), steps(plain)[:4], rtol=1e-5)
    state = export_state_dict(tmp_path)  # ZeRO-3: every rank's parameter shards consolidated by DeepSpeed
    model = timm.create_model("optdnn_apg2_convnext_iso_fm", num_classes=10, dim=32, depth=3)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(state)


@pytest.mark.timeout(300)
def test_compiled_backward_stays_channels_last_on_cpu():
    """The trainer's compile options on CPU: the depthwise convolutions' input gradients in inductor's backward graph
    are channels-last like the trunk (stride 1 over channels). Inductor's default makes them NCHW, which the second
    half checks: when a torch release lays them out channels-last by itself, the option has done its work."""
    import re
    import timm
    from torch._inductor.utils import run_and_get_code
    from timm_optdnn.training.trainer import compile_kwargs

    def conv_input_grad_strides(**kwargs) -> list:
        torch._dynamo.reset()
        model = timm.create_model("optdnn_apg2_convnext_iso_fm", dim=32, depth=2, num_classes=10, in_chans=1)
        step = torch.compile(model, **kwargs)
        _, code = run_and_get_code(lambda: step(torch.randn(2, 1, 28, 28)).sum().backward())
        return re.findall(r"assert_tensor_metadata\(buf\d+, \(2, 32, 7, 7\), \((\d+), (\d+), \d+, \d+\), "
                          r"torch.float32, 'torch.ops.aten.convolution_backward", "\n".join(code))

    grads = conv_input_grad_strides(**compile_kwargs(torch.device("cpu")))
    assert len(grads) == 2 and all(c == "1" for _, c in grads), grads  # both blocks' dwconv, channels-last
    assert all(c == "49" for _, c in conv_input_grad_strides()), "inductor's default is channels-last now"


@pytest.mark.timeout(480)
@pytest.mark.parametrize("precision, stage", [("bf16", 1), ("fp16", 0)])
def test_mixed_precision_autocasts_with_fp32_weights_coefficients_and_ema(plain, fmnist_betons, tmp_path, precision,
                                                                         stage):
    """bf16 / fp16 through autocast: the forward computes in 16 bits, while the module DeepSpeed holds (so its
    gradients, their accumulation and reduction), the scheme coefficients and the EMA copy stay fp32; the losses
    track fp32's closely without equalling them."""
    import timm
    run_dir = RunDir(tmp_path)
    r = run(deepspeed_cmd(*PLAIN, *fmnist_betons, f"dist.zero_stage={stage}", f"dist.precision={precision}",
                          "model.ema=true",
                          f"run.out_dir={tmp_path}", "schedule.max_steps=8"))
    assert r.returncode == 0, r.log[-3000:]
    assert f"ZeRO-{stage} {precision} on cpu" in r.log
    result = json.loads(run_dir.result.read_text())
    assert result["compute_dtype"] == f"torch.{dict(bf16='bfloat16', fp16='float16')[precision]}"
    losses, ref = [float(x) for _, x, _ in steps(tmp_path)], [float(x) for _, x, _ in steps(plain)[:8]]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) / 3 < losses[0] - 0.1
    assert losses == pytest.approx(ref, rel=3e-3) and losses != ref  # measured bf16: ~1e-4 apart
    state = run_dir.client_state()
    assert {v.dtype for v in state["module"].values()} == {v.dtype for v in state["ema"].values()} == {torch.float32}
    model = timm.create_model("optdnn_apg2_convnext_iso_fm", num_classes=10, dim=32, depth=3)
    model.load_state_dict(state["module"])  # the coefficients among the fp32 weights: the ones the run reported
    assert [round(c, 4) for c in model.scheme_coefficients()] == result["scheme_coefficients"]


@pytest.mark.timeout(480)
def test_nonfinite_loss_names_a_checkpoint_that_reloads_to_finite_logits(fmnist_betons, tmp_path):
    """SGD (any timm optimizer runs under ZeRO) with an lr that ramps to 1e4: training diverges within the epoch. The
    stop names the newest checkpoint whose weights gave a finite loss, points `latest` at it, and it reloads to
    finite logits; checkpoints saved after it do not."""
    import timm
    from timm_optdnn.training.export import export_state_dict
    run_dir = RunDir(tmp_path)
    r = run(deepspeed_cmd(*TINY, *fmnist_betons, "dist.zero_stage=2", "optim.opt=sgd", "optim.lr=1e4",
                          "model.ema=false",
                          "schedule.warmup_epochs=1", "schedule.warmup_lr=1e-3", "run.ckpt_every_steps=1",
                          "run.log_every_steps=1", "run.keep_last=30", f"run.out_dir={tmp_path}"))
    assert r.returncode == 3 and "non-finite loss at step" in r.log, r.log[-3000:]
    bad = int(r.log.split("non-finite loss at step ")[1].split(";")[0])
    losses = [float(x) for _, x, _ in steps(tmp_path)]
    assert len(losses) == bad and all(math.isfinite(x) for x in losses[:-1]) and not math.isfinite(losses[-1])
    good = run_dir.latest()
    assert f"{run_dir.checkpoint(good)} (now 'latest'" in r.log and good == f"step{bad - 2:08d}"
    assert json.loads(run_dir.result.read_text())["last_good_checkpoint"] == good
    x = torch.randn(8, 3, 28, 28)
    for tag, finite in ((good, True), (f"step{bad - 1:08d}", False)):
        model = timm.create_model("optdnn_apg2_convnext_iso_fm", num_classes=10, dim=32, depth=3)
        model.load_state_dict(export_state_dict(tmp_path, tag))
        with torch.no_grad():
            assert bool(torch.isfinite(model.eval()(x)).all()) == finite, tag


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
def test_dead_or_hung_rank_ends_the_run_within_dist_timeout(fmnist_betons, tmp_path, sig):
    """Two torchrun agents (2 "nodes" on 127.0.0.1, so neither launcher kills the other's rank): rank 1 is
    killed (its sockets close) or stopped (a hung node: its sockets stay open, only a timeout can tell)
    mid-training. Rank 0 must fail within dist.timeout_s, not hang, and `latest` must name a complete checkpoint."""
    from timm_optdnn.training.export import export_state_dict
    timeout_s, out, port = 20, tmp_path / "run", free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    agents = [subprocess.Popen(
        torchrun_cmd(rank, port, *TINY, *fmnist_betons, "dist.zero_stage=1", "run.ckpt_every_steps=1",
                     f"dist.timeout_s={timeout_s}", f"run.out_dir={out}"),
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
        if sig == signal.SIGSTOP:  # the step watchdog: DeepSpeed's groups keep torch's 30-min gloo timeout
            assert f"Timeout (0:00:{timeout_s})!" in log, log[-3000:]
    finally:
        if victim is not None and victim.is_running():  # the stopped rank: a cluster's scheduler would end it
            victim.kill()
        for a in agents:
            if a.poll() is None:
                a.kill()
            a.wait(timeout=60)
    assert agents[1].returncode != 0
    run_dir = RunDir(out)
    tag = run_dir.latest()
    assert run_dir.check(tag, world_size=2) is None
    assert run_dir.client_state(tag)["global_steps"] == int(tag[4:])
    assert export_state_dict(out)  # both ranks' ZeRO-1 shards are there


# ----------------------------------------------------------------------------------- checks without training

@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1e-3"], "unknown config key(s): optim.lrr (did you mean optim.lr?)"),
    (["optimm.lr=1e-3"], "unknown config key(s): optimm (did you mean optim?)"),
    (["lr=1e-3"], "override 'lr=1e-3': keys are section.key (did you mean optim.lr?)"),
    (["plan_nodes=2"], "override 'plan_nodes=2': keys are section.key (did you mean plan.nodes?)"),
    (["data.batch_size=12.5"], "data.batch_size=12.5 (float) is not a valid"),
    (["model.kwargs={dim: 32"], "override 'model.kwargs={dim: 32': the value is not YAML"),
    (["model.ema=true", "dist.zero_stage=3"], "model.ema=true needs dist.zero_stage <= 2"),
    (["dist.zero_stage=4"], "dist.zero_stage=4"),
    (["model.name=resnet_nope"], "model.name='resnet_nope' is not a registered timm model"),
    (["schedule.warmup_epochs=10", "schedule.epochs=5"], "schedule.warmup_epochs=10.0 must be < schedule.epochs=5"),
    (["data.res_schedule=[160,192]"], "data.res_schedule=[160, 192]"),
    (["dist.precision=fp16", "dist.zero_stage=1"], "dist.precision=fp16 needs dist.zero_stage=0"),
    (["data.repeated_aug=-1"], "data.repeated_aug=-1 must be >= 0"),
    (["schedule.epochs"], "override 'schedule.epochs' is not section.key=value"),
])
def test_config_errors_are_clear(overrides, message):
    from timm_optdnn.training.config import ConfigError, load_config
    with pytest.raises(ConfigError) as e:
        load_config(str(ROOT / "configs" / "demo.yaml"), overrides)
    assert message in str(e.value)


def test_recipes_load_with_their_bases():
    from timm_optdnn.training.config import CONFIG_DIR, load_config
    l = load_config(str(CONFIG_DIR / "optdnn_apg2_convnext_iso_l.yaml"))
    assert (l.model.name, l.model.drop_path, l.data.batch_size, l.optim.grad_accum) == \
        ("optdnn_apg2_convnext_iso_l", 0.5, 64, 2)
    assert l.model.ema and l.data.channels_last and l.optim.lr == 4e-3
    assert l.model.kwargs == {"layer_scale_init_value": 0}
    s = load_config(str(CONFIG_DIR / "optdnn_gd_vit_s.yaml"), ["optim.lr=1e-3"])
    assert (s.model.name, s.data.repeated_aug, s.optim.lr, s.dist.precision) == ("optdnn_gd_vit_s", 3, 1e-3, "bf16")


@pytest.mark.timeout(120)
def test_cli_rejects_a_bad_recipe_before_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: optdnn_apg2_vit_s}\ndata: {batch_sizee: 64}\n")
    r = run([PY, "-m", "train", "--config", str(bad)], timeout=60)
    assert r.returncode == 2 and "unknown config key(s): data.batch_sizee (did you mean data.batch_size?)" in r.stderr


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["model kwarg", "train_path", "classes", "batch", "out_dir", "resume path"])
def test_a_run_that_cannot_work_fails_before_start_up_with_one_message(fmnist_betons, reference, tmp_path, case):
    """Each is refused by one process in seconds (measured, quiet machine: ~5 s, most of it importing torch):
    exit code 2, one line, no traceback, DeepSpeed never started, and nothing written: no new out_dir, and an
    existing run's files unchanged (resume=none into it used to cut its steps.csv and delete its checkpoints)."""
    ref_out, *_ = reference
    out = tmp_path / "new_run"
    overrides, message = {
        "model kwarg": (["model.kwargs={dimm: 16}"], "model.kwargs={'dimm': 16}: "),
        "train_path": (["data.train_path=/no/such.beton"], "data.train_path=/no/such.beton: no such beton file"),
        "classes": (["model.num_classes=7"], "data.train_path: beton"),
        "batch": (["data.batch_size=2000"], "has 1200 images, fewer than one optimizer step takes"),
        "out_dir": ([f"run.out_dir={ref_out}", "run.resume=none"], f"run.out_dir={ref_out} already holds files"),
        "resume path": ([f"run.resume={ref_out / 'checkpoints' / 'step00000036'}"], "starts a new run from another"),
    }[case]
    if case == "resume path":  # a new run from another run's checkpoint needs a new or empty out_dir
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = files(ref_out)
    r = run([PY, "-m", "train", "--config", "configs/demo.yaml", *TINY, *fmnist_betons, f"run.out_dir={out}",
             *overrides],
            timeout=170)
    assert r.returncode == 2 and message in r.stderr, r.log[-3000:]
    assert "Traceback" not in r.log and "DeepSpeed" not in r.log
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")] == r.stderr.strip().splitlines()
    assert files(ref_out) == before
    assert (sorted(p.name for p in out.iterdir()) == ["notes.txt"]) if case == "resume path" else not out.exists()


def _fake_checkpoint(run_dir: RunDir, step: int, run_id: str = "me", world_size: int = 2) -> str:
    tag = f"step{step:08d}"
    run_dir.checkpoint(tag).mkdir(parents=True)
    torch.save(dict(module={}, epoch=0), run_dir.checkpoint(tag) / "mp_rank_00_model_states.pt")
    run_dir.commit_checkpoint(tag, run_id, world_size)
    return tag


def test_resume_choice_survives_a_damaged_garbage_or_missing_latest(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.create()
    tags = [_fake_checkpoint(run_dir, s) for s in (6, 12, 18)]
    assert run_dir.latest_intact(2) == (tags[2], [])

    (run_dir.checkpoint(tags[2]) / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    tag, problems = run_dir.latest_intact(2)
    assert tag == tags[1] and "mp_rank_00_model_states.pt is 11 bytes" in problems[0] and tags[2] in problems[0]
    (run_dir.checkpoints / "latest").write_text("\x00garbage\n")
    tag, problems = run_dir.latest_intact(2)
    assert tag == tags[1] and "names '\\x00garbage'" in problems[0]
    (run_dir.checkpoints / "latest").unlink()
    tag, problems = run_dir.latest_intact(2)
    assert tag == tags[1] and problems[0].endswith("latest is missing")
    (run_dir.checkpoint(tags[1]) / "manifest.json").unlink()  # a save that never finished
    run_dir.set_latest(tags[1])
    tag, problems = run_dir.latest_intact(2)
    assert tag == tags[0] and "manifest.json is missing" in problems[0]
    tag, problems = run_dir.latest_intact(4)
    assert tag is None and "saved by 2 ranks, this run has 4" in problems[-1]


def test_resume_auto_never_restarts_silently(tmp_path):
    from timm_optdnn.training.config import load_config
    from timm_optdnn.training.trainer import RunError, resume_point
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), [f"run.out_dir={tmp_path}", "run.resume=auto"])
    run_dir = RunDir(tmp_path)
    assert resume_point(cfg, run_dir, 2) == (None, [])  # a new out_dir: a new run
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="no training run"):
        resume_point(cfg, run_dir, 2)
    run_dir.create()
    from timm_optdnn.training.config import save_config
    save_config(cfg, run_dir.config)
    assert "starts again from step 0" in resume_point(cfg, run_dir, 2)[1][0]  # nothing saved yet: nothing lost
    tag = _fake_checkpoint(run_dir, 6, run_id=run_dir.run_id())
    (run_dir.checkpoints / "latest").unlink()
    point, warnings = resume_point(cfg, run_dir, 2)
    assert point == (run_dir, tag) and warnings[0].endswith("latest is missing")
    (run_dir.checkpoint(tag) / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(RunError, match="has checkpoints but none can be resumed: .*0 bytes"):
        resume_point(cfg, run_dir, 2)
    other = load_config(str(ROOT / "configs" / "demo.yaml"), [f"run.out_dir={tmp_path}", "run.resume=auto",
                                                              "model.kwargs={dim: 8}"])
    with pytest.raises(RunError, match=r"trained another network \(kwargs \{\} -> \{'dim': 8\}\)"):
        resume_point(other, run_dir, 2)


def test_retention_deletes_only_this_runs_checkpoints(tmp_path):
    run_dir = RunDir(tmp_path)
    mine = [_fake_checkpoint(run_dir, s, "me") for s in (1, 2, 3, 4)]
    theirs = _fake_checkpoint(run_dir, 5, "them")
    unknown = run_dir.checkpoint("step00000000")
    unknown.mkdir()
    run_dir.set_latest(mine[1])  # e.g. pointed back at a good checkpoint after a non-finite loss
    assert run_dir.prune("me", keep_last=1) == [mine[0], mine[2]]
    assert run_dir.tags() == ["step00000000", mine[1], mine[3], theirs]
