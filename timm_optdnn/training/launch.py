"""Where this process sits in a distributed run, read once from what its launcher set.

`deepspeed` and `torchrun` set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `srun` sets SLURM_PROCID /
SLURM_STEP_NUM_TASKS / SLURM_LOCALID / SLURM_STEP_TASKS_PER_NODE; a bare `python -m train` is one process.
`dist_env()` reads them and changes nothing. `distributed_environment(env)` sets, for the length of a run, the few
variables that torch.distributed and DeepSpeed still read from the environment themselves, and restores them after.

    env = dist_env()
    with distributed_environment(env):
        ...  # deepspeed.init_distributed(), deepspeed.initialize(), training
"""
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, Mapping, Optional

# The trainer's exit code after it saved a checkpoint on SIGTERM / SIGUSR1 and stopped: EX_TEMPFAIL, "try again".
# train/slurm.sbatch requeues the job on it; `resume=auto` continues from the checkpoint.
EXIT_PREEMPTED = 75

# What the launched processes read from os.environ themselves, even when given everything explicitly:
# torch.distributed's env:// rendezvous (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; under torchrun it reuses the
# agent's store only when MASTER_ADDR/PORT match), DeepSpeed's init_distributed (all five, else it tries MPI
# discovery), its engine (LOCAL_RANK picks the device and is asserted), its CPU accelerator and shared-memory
# allreduce (LOCAL_SIZE, MASTER_ADDR, MASTER_PORT, read in C at init). LOCAL_WORLD_SIZE is torchrun's name.
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """The environment describes a launch that cannot work; raised before any process waits for another."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # "env" (deepspeed, torchrun), "srun" or "single"

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size and 0 <= self.local_rank < self.local_world_size
                and self.local_world_size <= self.world_size):
            raise LaunchError(f"inconsistent launch: rank {self.rank} of {self.world_size}, local rank "
                              f"{self.local_rank} of {self.local_world_size} ({self.launcher})")
        if not 0 < self.master_port < 2 ** 16:
            raise LaunchError(f"MASTER_PORT={self.master_port} is not a TCP port")

    def variables(self) -> Dict[str, str]:
        """The environment a torch.distributed / DeepSpeed process of this rank expects (ENV_KEYS)."""
        return dict(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                    LOCAL_WORLD_SIZE=str(self.local_world_size), LOCAL_SIZE=str(self.local_world_size),
                    MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def free_port() -> int:
    """A TCP port free on this host now (for a single-process run's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """This process's place in the run, from `environ` (default os.environ), which is only read.

    Raises LaunchError naming the problem for a launch that would hang or misbehave: a partial torch.distributed
    environment, a multi-node srun step without MASTER_ADDR, or a process started without srun inside a SLURM
    allocation of several tasks (it would wait for ranks that are never started).
    """
    e = os.environ if environ is None else environ
    if "RANK" in e:  # deepspeed, torchrun (or anything that speaks torch.distributed's env:// convention)
        missing = [k for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in e]
        if "LOCAL_WORLD_SIZE" not in e and "LOCAL_SIZE" not in e:
            missing.append("LOCAL_WORLD_SIZE (or DeepSpeed's LOCAL_SIZE)")
        if missing:
            raise LaunchError(f"RANK is set but {', '.join(missing)} not: launch with deepspeed, torchrun or srun "
                              "(train/launch_*.sh, train/slurm.sbatch), which set them all")
        return DistEnv(_int(e, "RANK"), _int(e, "WORLD_SIZE"), _int(e, "LOCAL_RANK"),
                       _int(e, "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in e else "LOCAL_SIZE"),
                       e["MASTER_ADDR"], _int(e, "MASTER_PORT"), "env")
    if "SLURM_STEP_NUM_TASKS" in e:  # a task of an srun step: srun sets SLURM_STEP_*, a batch script has none
        world = _int(e, "SLURM_STEP_NUM_TASKS")
        local_world = tasks_on_node(e.get("SLURM_STEP_TASKS_PER_NODE", str(world)), _int(e, "SLURM_NODEID", 0))
        if "MASTER_ADDR" in e:
            addr = e["MASTER_ADDR"]
        elif local_world == world:
            addr = "127.0.0.1"
        else:
            raise LaunchError(f"an srun step over {e.get('SLURM_STEP_NUM_NODES', 'several')} nodes needs MASTER_ADDR"
                              ": export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) "
                              "before srun (train/slurm.sbatch does)")
        if "MASTER_PORT" in e:
            port = _int(e, "MASTER_PORT")
        elif world == 1:
            port = free_port()
        else:  # every task must pick the same port without talking: derive it from the job, below the ephemeral range
            port = 20000 + _int(e, "SLURM_JOB_ID", 0) % 10000
        return DistEnv(_int(e, "SLURM_PROCID"), world, _int(e, "SLURM_LOCALID"), local_world, addr, port, "srun")
    tasks = _int(e, "SLURM_NTASKS", 1)
    if "SLURM_JOB_ID" in e and tasks > 1:
        raise LaunchError(f"started without srun inside SLURM job {e['SLURM_JOB_ID']}, an allocation of {tasks} tasks "
                          f"(SLURM_NTASKS={tasks}): this process alone would wait for {tasks - 1} ranks that never "
                          "start. Run one process per task with `srun python -m train ...` (train/slurm.sbatch "
                          "does), or a launcher (train/launch_deepspeed.sh), or ask for one task (--ntasks=1)")
    port = _int(e, "MASTER_PORT") if "MASTER_PORT" in e else free_port()
    return DistEnv(master_addr=e.get("MASTER_ADDR", "127.0.0.1"), master_port=port)


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node `node` from SLURM's compressed per-node list, e.g. "4(x2),3" = [4, 4, 3]."""
    counts = []
    for part in tasks_per_node.split(","):
        n, _, reps = part.partition("(x")
        counts += [int(n)] * (int(reps.rstrip(")")) if reps else 1)
    if not 0 <= node < len(counts):
        raise LaunchError(f"SLURM_NODEID={node} is not a node of SLURM_STEP_TASKS_PER_NODE={tasks_per_node}")
    return counts[node]


@contextmanager
def distributed_environment(env: DistEnv) -> Iterator[None]:
    """Within the block, os.environ holds `env`'s ENV_KEYS (what torch.distributed and DeepSpeed read themselves);
    afterwards each key is back to its previous value or unset. Wrap the whole run: DeepSpeed reads LOCAL_RANK again
    in deepspeed.initialize and its CPU accelerator reads it whenever it is asked for the current device."""
    new = env.variables()
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _int(e: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    if key not in e:
        if default is None:
            raise LaunchError(f"{key} is not set")
        return default
    try:
        return int(e[key])
    except ValueError:
        raise LaunchError(f"{key}={e[key]!r} is not an integer") from None
