"""Launching: the distributed environment each launcher gives a rank, and the launch scripts run for real.

dist_env() is checked against the variables deepspeed, torchrun and srun set (as documented by each, and as a
SLURM batch script sees them without srun). The scripts in train/ run under real bash with real processes.
"""
import os

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
