"""Launching: the distributed environment each launcher gives a rank, and the launch scripts run for real.

dist_env() is checked against the variables deepspeed, torchrun and srun set (as documented by each, and as a
SLURM batch script sees them without srun). The scripts in train/ run under real bash with real processes.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from timm_optdnn.training.launch import (EXIT_PREEMPTED, DistEnv, LaunchError, dist_env, distributed_environment,
                                         free_port, tasks_on_node)

# what the deepspeed launcher gives rank 1 of 2 on one node
DEEPSPEED = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT="29501", CROSS_RANK="0", CROSS_SIZE="1")
# torchrun, rank 5 of 2 nodes x 4
TORCHRUN = dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", MASTER_ADDR="node0",
                MASTER_PORT="29500", TORCHELASTIC_USE_AGENT_STORE="True")
# a SLURM batch script of `sbatch --nodes 2 --ntasks-per-node 4`: the job's variables, no step of its own
BATCH = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
             SLURM_NTASKS="8", SLURM_NPROCS="8", SLURM_NTASKS_PER_NODE="4", SLURM_TASKS_PER_NODE="4(x2)",
             SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
# task 6 of the srun step that batch script starts: srun adds the step's variables and the task's ids
SRUN = dict(BATCH, SLURM_STEP_ID="0", SLURM_STEPID="0", SLURM_STEP_NUM_TASKS="8", SLURM_STEP_NUM_NODES="2",
            SLURM_STEP_NODELIST="gpu[01-02]", SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_PROCID="6", SLURM_LOCALID="2",
            SLURM_NODEID="1")


def test_deepspeed_and_torchrun_environments():
    assert dist_env(DEEPSPEED) == DistEnv(1, 2, 1, 2, "127.0.0.1", 29501, "env")
    assert dist_env(TORCHRUN) == DistEnv(5, 8, 1, 4, "node0", 29500, "env")
    # the launcher's variables win over SLURM's: deepspeed / torchrun started inside an allocation
    assert dist_env(dict(BATCH, **TORCHRUN)) == dist_env(TORCHRUN)


def test_srun_task_environment():
    env = dist_env(dict(SRUN, MASTER_ADDR="gpu01", MASTER_PORT="29400"))
    assert env == DistEnv(6, 8, 2, 4, "gpu01", 29400, "srun")
    assert env.variables() == dict(RANK="6", WORLD_SIZE="8", LOCAL_RANK="2", LOCAL_WORLD_SIZE="4", LOCAL_SIZE="4",
                                   MASTER_ADDR="gpu01", MASTER_PORT="29400")
    # no MASTER_PORT: every task derives the same one from the job id, without talking to the others
    assert dist_env(dict(SRUN, MASTER_ADDR="gpu01")).master_port == dist_env(
        dict(SRUN, MASTER_ADDR="gpu01", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")).master_port
    # one node: rendezvous on the loopback; uneven nodes: tasks counted on this task's node
    one_node = dict(SRUN, SLURM_STEP_NUM_TASKS="4", SLURM_STEP_TASKS_PER_NODE="4", SLURM_PROCID="2", SLURM_NODEID="0")
    assert dist_env(one_node).master_addr == "127.0.0.1"
    assert dist_env(dict(SRUN, MASTER_ADDR="a", SLURM_STEP_NUM_TASKS="7",
                         SLURM_STEP_TASKS_PER_NODE="4,3")).local_world_size == 3


def test_srun_multi_node_without_master_addr_is_refused():
    with pytest.raises(LaunchError, match=r"srun step over 2 nodes needs MASTER_ADDR.*scontrol show hostnames"):
        dist_env(SRUN)


def test_batch_script_of_many_tasks_without_srun_is_refused():
    with pytest.raises(LaunchError) as e:
        dist_env(BATCH)
    msg = str(e.value)
    assert "without srun inside SLURM job 4242" in msg and "SLURM_NTASKS=8" in msg and "7 ranks" in msg
    assert "srun python -m train" in msg
    # a one-task allocation (or an interactive one-task step) is a plain single process
    single = dist_env(dict(BATCH, SLURM_NTASKS="1"))
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single")
    assert dist_env(dict(SRUN, SLURM_STEP_NUM_TASKS="1", SLURM_STEP_TASKS_PER_NODE="1", SLURM_PROCID="0",
                         SLURM_LOCALID="0", SLURM_NODEID="0")).world_size == 1


def test_single_process_defaults_and_free_port():
    env = dist_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.master_addr) == (0, 1, 0, 1,
                                                                                                "127.0.0.1")
    assert 0 < env.master_port < 2 ** 16 and 0 < free_port() < 2 ** 16
    assert dist_env(dict(MASTER_PORT="12345")).master_port == 12345


@pytest.mark.parametrize("environ, message", [
    (dict(RANK="0", WORLD_SIZE="2"), "RANK is set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT, LOCAL_WORLD_SIZE"),
    (dict(DEEPSPEED, RANK="2"), "rank 2 of 2"),
    (dict(DEEPSPEED, WORLD_SIZE="two"), "WORLD_SIZE='two' is not an integer"),
    (dict(DEEPSPEED, MASTER_PORT="70000"), "MASTER_PORT=70000 is not a TCP port"),
    (dict(SRUN, MASTER_ADDR="a", SLURM_NODEID="2"), "SLURM_NODEID=2 is not a node of"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_PROCID"} | dict(MASTER_ADDR="a"), "SLURM_PROCID is not set"),
])
def test_impossible_environments_are_named(environ, message):
    with pytest.raises(LaunchError, match=message.replace("(", r"\(")):
        dist_env(environ)


def test_dist_env_reads_only():
    before = dict(os.environ)
    dist_env(SRUN | dict(MASTER_ADDR="a"))
    dist_env()
    assert dict(os.environ) == before


def test_distributed_environment_sets_and_restores(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1111")
    monkeypatch.delenv("RANK", raising=False)
    env = DistEnv(1, 2, 1, 2, "10.0.0.1", 2222, "srun")
    with distributed_environment(env):
        assert {k: os.environ[k] for k in env.variables()} == env.variables()
    assert os.environ["MASTER_PORT"] == "1111" and "RANK" not in os.environ
    with pytest.raises(ZeroDivisionError), distributed_environment(env):
        1 / 0
    assert os.environ["MASTER_PORT"] == "1111" and "RANK" not in os.environ


def test_tasks_on_node():
    assert [tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]
    assert tasks_on_node("8", 0) == 8
    assert EXIT_PREEMPTED == 75


# ------------------------------------------------------------------------------------------ the launch scripts

ROOT = Path(__file__).resolve().parent.parent
RECORD_ARGS = '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n'  # a stand-in interpreter: notes its argv


def script(name: str, *args: str, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "train" / name), *args], env=env, capture_output=True, text=True,
                          timeout=60, **kw)


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_python(tmp_path):
    env = {k: v for k, v in clean_env().items() if k not in ("NNODES", "NODE_RANK")}
    return dict(env, PYTHON=str(executable(tmp_path / "python", RECORD_ARGS)), ARGS_FILE=str(tmp_path / "argv"))


def test_torchrun_script_needs_master_addr_and_node_rank_for_many_nodes(fake_python, tmp_path):
    for extra in (dict(NNODES="2"), dict(NNODES="2", MASTER_ADDR="node0"), dict(NNODES="2", NODE_RANK="1")):
        r = script("launch_torchrun.sh", "configs/demo.yaml", env=dict(fake_python, **extra))
        assert r.returncode == 2 and "NNODES=2 needs MASTER_ADDR" in r.stderr and "NODE_RANK" in r.stderr, r.stderr
        assert not (tmp_path / "argv").exists()  # refused before anything started
    r = script("launch_torchrun.sh", "configs/demo.yaml", "lr=1e-3",
               env=dict(fake_python, NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", GPUS="4"))
    argv = (tmp_path / "argv").read_text().split("\n")
    assert r.returncode == 0 and argv[:2] == ["-m", "torch.distributed.run"]
    assert " ".join(argv).startswith("-m torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 4 "
                                     "--master_addr node0 --master_port 29500 -m timm_optdnn.training "
                                     "--config configs/demo.yaml lr=1e-3")
    r = script("launch_torchrun.sh", "configs/demo.yaml", env=fake_python)  # one node: the loopback is right
    assert r.returncode == 0 and "--master_addr\n127.0.0.1\n" in (tmp_path / "argv").read_text()


# srun as the tasks see it: one process per task of the allocation on this host, each with its SLURM_PROCID /
# SLURM_LOCALID and the step's variables; signals to srun go to every task; --kill-on-bad-exit=1 kills the other
# tasks once one exits non-zero; the exit code is the highest task exit code, or 128 + signal (srun(1)).
FAKE_SRUN = '''#!{python}
import os, signal, subprocess, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write("srun " + " ".join(args) + "\\n")
opts = []
while args[0].startswith("--"):
    opts.append(args.pop(0))
n = int(os.environ["SLURM_NTASKS"])
step = dict(SLURM_STEP_ID="0", SLURM_STEPID="0", SLURM_STEP_NUM_TASKS=str(n), SLURM_STEP_NUM_NODES="1",
            SLURM_STEP_TASKS_PER_NODE=str(n), SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"], SLURM_NODEID="0")
tasks = []
def forward(sig, frame):
    for t in tasks:
        if t.poll() is None:
            t.send_signal(sig)
for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)
tasks += [subprocess.Popen(args, env=dict(os.environ, **step, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)))
          for i in range(n)]
while any(t.poll() is None for t in tasks):
    if "--kill-on-bad-exit=1" in opts and any(t.poll() for t in tasks):
        for t in tasks:
            if t.poll() is None:
                t.kill()
    time.sleep(0.05)
sys.exit(max(c if c >= 0 else 128 - c for c in (t.returncode for t in tasks)))
'''
FAKE_SCONTROL = '''#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; fi
'''
# a task that starts, then on USR1/TERM "saves" and exits 75. FAKE_TASK=finish: every task exits 0 at once;
# crash: task 0 exits 1 at once; slow: task 1 ignores the signal (still saving when --kill-on-bad-exit strikes)
FAKE_TASK = '''#!/usr/bin/env bash
[[ "$FAKE_TASK" == finish ]] && exit 0
[[ "$FAKE_TASK" == crash && "$SLURM_PROCID" == 0 ]] && exit 1
if [[ "$FAKE_TASK" == slow && "$SLURM_PROCID" == 1 ]]; then trap "" USR1 TERM
else trap 'echo "task $SLURM_PROCID got a signal, saved" >> "$FAKE_SLURM_LOG"; exit 75' USR1 TERM; fi
echo "task $SLURM_PROCID of $SLURM_STEP_NUM_TASKS started: $*" >> "$FAKE_SLURM_LOG"
while true; do sleep 0.05; done
'''


def clean_env(**extra: str) -> dict:
    """This process's environment without what a launcher or SLURM would have set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "LOCAL_RANK"))}
    return dict(env, **extra)


def slurm_job(tmp_path: Path, python: str, job_id: int = 4242, base: Optional[dict] = None) -> dict:
    """The environment of the batch script of a one-node, 2-task job, fake srun / scontrol first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    executable(bin_dir / "srun", FAKE_SRUN.format(python=sys.executable))
    executable(bin_dir / "scontrol", FAKE_SCONTROL)
    env = base or clean_env()
    return dict(env, PATH=f"{bin_dir}:{env['PATH']}", PYTHON=python, FAKE_SLURM_LOG=str(tmp_path / "slurm.log"),
                SLURM_JOB_ID=str(job_id), SLURM_JOBID=str(job_id), SLURM_JOB_NODELIST="node1",
                SLURM_NODELIST="node1", SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1", SLURM_NTASKS="2",
                SLURM_NTASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="2", SLURM_CPUS_PER_TASK="1",
                SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_SUBMIT_DIR=str(ROOT))


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def sbatch(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(ROOT / "train" / "slurm.sbatch"), *args], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, text: str, count: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not (path.is_file() and path.read_text().count(text) >= count):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("task, signal_to_script, exit_codes, requeued", [
    # time limit: every task saves and exits 75; one that is slower than the others may be killed by srun's
    # --kill-on-bad-exit once the first has exited (srun then reports 128 + SIGKILL): requeued either way
    ("save", signal.SIGUSR1, {EXIT_PREEMPTED, 128 + 9}, True),
    ("slow", signal.SIGUSR1, {128 + 9}, True),
    ("save", signal.SIGTERM, {EXIT_PREEMPTED, 128 + 9}, False),  # scancel / preemption: saved, not requeued here
    ("finish", None, {0}, False),
    ("crash", None, {128 + 9}, False),  # task 0 failed, srun killed task 1
], ids=["usr1", "usr1-kill-on-bad-exit", "term", "finished", "crashed"])
def test_slurm_script_requeues_only_after_a_time_limit_save(tmp_path, task, signal_to_script, exit_codes, requeued):
    env = dict(slurm_job(tmp_path, str(executable(tmp_path / "python", FAKE_TASK))), FAKE_TASK=task)
    log = tmp_path / "slurm.log"
    job = sbatch(env, "configs/demo.yaml", "schedule.epochs=1")
    if signal_to_script is not None:
        wait_for(log, "started", 2, job, timeout=30)
        job.send_signal(signal_to_script)
    out = job.communicate(timeout=30)[0]
    assert job.returncode in exit_codes, out
    calls = log.read_text()
    # every task got the job's rendezvous (scontrol's first host, a port from the job id) and the interpreter
    assert "scontrol show hostnames node1" in calls and "rendezvous 127.0.0.1:24242" in out
    assert f"srun --kill-on-bad-exit=1 {env['PYTHON']} -m timm_optdnn.training --config configs/demo.yaml " \
           "run.resume=auto schedule.epochs=1" in calls
    if task in ("save", "slow") and signal_to_script in (signal.SIGUSR1, signal.SIGTERM):
        assert "task 0 got a signal, saved" in calls
    assert ("scontrol requeue 4242" in calls) == requeued, calls


def test_slurm_script_outside_a_job_is_refused(tmp_path):
    r = script("slurm.sbatch", "configs/demo.yaml", env=clean_env())
    assert r.returncode != 0 and "not in a SLURM job: submit this script with sbatch" in r.stderr


# ------------------------------------------------------------------------ real runs: 2 CPU ranks, the real trainer

# the demo recipe at tiny width: 2 epochs of 18 steps, a checkpoint every 2 steps
TINY = ["model.kwargs={dim: 32, depth: 3}", "data.img_size=28", "data.crop_pct=1.0", "data.batch_size=32",
        "data.val_batch_size=100", "data.num_workers=1", "schedule.epochs=2", "schedule.warmup_epochs=0.1",
        "run.ckpt_every_steps=2", "run.keep_last=2", "run.log_every_steps=6", "dist.threads=1", "dist.timeout_s=300",
        "run.tensorboard=false"]


def run_env(**extra: str) -> dict:
    # the interpreter's bin first on PATH, as in an activated venv: DeepSpeed's JIT-built comm op is rebuilt when a
    # run finds other build tools than the ones that built it
    return clean_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(ROOT),
                     OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)


def ranks_of(launcher: subprocess.Popen) -> list:
    import psutil
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if "timm_optdnn.training" in p.cmdline() and "deepspeed.launcher.runner" not in p.cmdline()
            and "deepspeed.launcher.launch" not in " ".join(p.cmdline())]


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not (out / "checkpoints" / "latest").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)


def stop(procs: list) -> None:
    """End what a failed test left running (each process by its id)."""
    for p in procs:
        if p.is_running():
            p.kill()


@pytest.mark.timeout(600)
def test_sigterm_to_deepspeed_launch_script_saves_on_every_rank(fmnist_betons, tmp_path):
    """SIGTERM to the script's pid alone: every rank saves at the same step and exits, the script exits 75."""
    import psutil
    out = tmp_path / "run"
    launcher = subprocess.Popen(["bash", str(ROOT / "train" / "launch_deepspeed.sh"), "configs/demo.yaml", *TINY,
                                 *fmnist_betons, f"run.out_dir={out}"], cwd=ROOT,
                                env=run_env(GPUS="2", MASTER_PORT=str(free_port())),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree = []
    try:
        wait_for_checkpoint(out, launcher)
        ranks = ranks_of(launcher)
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
        assert len(ranks) == 2
        launcher.send_signal(signal.SIGTERM)
        log = launcher.communicate(timeout=120)[0]
    finally:
        stop(tree)
    assert launcher.returncode == EXIT_PREEMPTED, log[-3000:]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)  # no rank runs on orphaned
    assert "received ['SIGTERM']" in log, log[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "preempted" and 2 <= result["step"] < 36
    tag = (out / "checkpoints" / "latest").read_text()
    assert tag == f"step{result['step']:08d}"  # the save at the signal, with both ranks' parts
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in (out / "checkpoints" / tag).iterdir()}


@pytest.mark.timeout(900)
def test_slurm_script_saves_requeues_and_resumes(fmnist_betons, tmp_path):
    """The batch script with 2 tasks under fake srun / scontrol: the time-limit signal saves and requeues, the
    requeued job resumes from that checkpoint and finishes."""
    port = next(p for p in range(24000, 30000) if bindable(p))  # the script derives it from the job id
    env = slurm_job(tmp_path, sys.executable, job_id=5_000_000 + port - 20000, base=run_env())
    args = ("configs/demo.yaml", *TINY, *fmnist_betons, f"run.out_dir={tmp_path / 'run'}")
    job = sbatch(env, *args)
    wait_for_checkpoint(tmp_path / "run", job)
    job.send_signal(signal.SIGUSR1)
    log = job.communicate(timeout=180)[0]
    assert job.returncode in (EXIT_PREEMPTED, 128 + 9), log[-3000:]
    assert f"rendezvous 127.0.0.1:{port}" in log and "received ['SIGUSR1']" in log, log[-3000:]
    assert f"scontrol requeue {env['SLURM_JOB_ID']}" in (tmp_path / "slurm.log").read_text()
    stopped = json.loads((tmp_path / "run" / "result.json").read_text())
    assert stopped["status"] == "preempted" and stopped["step"] < 36

    job = sbatch(dict(env, SLURM_RESTART_COUNT="1"), *args)  # what SLURM runs after the requeue
    log = job.communicate(timeout=400)[0]
    assert job.returncode == 0, log[-3000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoints'}/step{stopped['step']:08d}" in log, log[-3000:]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "finished"
    steps = [int(line.split(",")[0]) for line in (tmp_path / "run" / "steps.csv").read_text().split()[1:]]
    assert steps == list(range(1, 37))  # every step once, across the two jobs
    assert (tmp_path / "slurm.log").read_text().count("scontrol requeue") == 1
