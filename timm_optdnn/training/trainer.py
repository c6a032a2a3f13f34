"""The trainer: a timm model in a DeepSpeed engine, FFCV loaders, a per-step cosine schedule, EMA, verified
checkpoints with exact resume, distributed evaluation. Launcher-agnostic: deepspeed, torchrun, srun or one process.

    deepspeed --num_gpus 2 --module timm_optdnn.training --config configs/demo.yaml
    torchrun --nproc_per_node 8 -m timm_optdnn.training --config configs/optdnn_apg2_vit_s.yaml

Read in order: `main` (checks, process settings, the run), `preflight` (everything checkable in seconds, before any
heavy start-up), `Trainer` (setup, fit, train_one_epoch, sync, evaluate, checkpoint).
"""
import csv
import dataclasses
import faulthandler
import json
import math
import os
import random
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import AUTOCAST_DTYPES, ConfigError, TrainConfig, load_ds_config, save_config
from .launch import EXIT_PREEMPTED, DistEnv, LaunchError, dist_env, distributed_environment
from .run_dir import CheckpointError, ClientState, RunDir, step_of, tag_for

EXIT_NONFINITE = 3  # the loss became NaN or inf: see the message for the checkpoint to resume from
EXIT_REFUSED = 2  # the recipe, the data, the out_dir or the checkpoint cannot work (refused before start)


class RunError(RuntimeError):
    """Found before the run starts: printed as one line, no traceback."""


class NonFiniteLoss(RuntimeError):
    pass


def main(cfg: TrainConfig) -> int:
    """Check everything cheap, then train with the process-wide settings in place; the process's exit code."""
    try:
        env = dist_env()
        start = preflight(cfg, env)
    except (RunError, ConfigError, LaunchError) as e:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one message per node, not one per rank
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    for w in start.warnings:
        if env.rank == 0:
            print(f"warning: {w}", file=sys.stderr, flush=True)
    with process_settings(cfg, env) as signals:
        trainer = Trainer(cfg, env, start, signals)
        try:
            trainer.setup()
            result = trainer.fit()
        except NonFiniteLoss as e:
            print(f"[rank {env.rank}] stopping: {e}", file=sys.stderr, flush=True)
            return EXIT_NONFINITE
        except (RunError, CheckpointError) as e:
            print(f"[rank {env.rank}] error: {e}", file=sys.stderr, flush=True)
            return EXIT_REFUSED
    return EXIT_PREEMPTED if result["status"] == "preempted" else 0


# ---------------------------------------------------------------------------------------------------- preflight

@dataclass
class Start:
    run: RunDir  # where this run writes
    resume: Optional[Tuple[RunDir, str]]  # the checkpoint to continue from (its run dir and tag), or None
    warnings: List[str]


def preflight(cfg: TrainConfig, env: DistEnv) -> Start:
    """What can fail without starting anything, in seconds: the data, the model's kwargs, the out_dir and the
    checkpoint to resume. Raises RunError naming the problem; writes nothing."""
    check_data_paths(cfg)
    load_ds_config(cfg, env.world_size)
    run = RunDir(cfg.run.out_dir)
    resume, warnings = resume_point(cfg, run, env.world_size)
    try:
        with torch.device("meta"):  # the builder sees the kwargs; no memory, no init cost
            create_model(cfg)
    except (TypeError, ValueError, AssertionError) as e:
        raise RunError(f"model {cfg.model.name} with model.kwargs={cfg.model.kwargs}: {e}") from None
    check_data(cfg, env.world_size)
    return Start(run, resume, warnings)


def check_data_paths(cfg: TrainConfig) -> None:
    d = cfg.data
    for key in ("train_path", "val_path"):
        path = getattr(d, key)
        if not path:
            raise RunError(f"data.{key} is not set")
        exists = Path(path).is_file() if d.backend == "ffcv" else Path(path).is_dir()
        if not exists:
            what = "beton file" if d.backend == "ffcv" else "ImageFolder directory"
            raise RunError(f"data.{key}={path}: no such {what}")


def check_data(cfg: TrainConfig, world_size: int) -> None:
    """The betons are complete, have the recipe's classes, and hold at least one optimizer step per rank."""
    if cfg.data.backend != "ffcv":
        return
    from timm_optdnn.data import check_beton
    metas = {}
    for key in ("train_path", "val_path"):
        try:
            metas[key] = check_beton(getattr(cfg.data, key), cfg.model.num_classes, checksum=False)
        except (OSError, ValueError) as e:
            raise RunError(f"data.{key}: {e}") from None
    per_step = cfg.data.batch_size * cfg.optim.grad_accum * world_size
    if metas["train_path"]["num_samples"] < per_step:
        raise RunError(f"data.train_path={cfg.data.train_path} has {metas['train_path']['num_samples']} images, "
                       f"fewer than one optimizer step takes ({cfg.data.batch_size} x accum "
                       f"{cfg.optim.grad_accum} x {world_size} ranks)")


def resume_point(cfg: TrainConfig, run: RunDir, world_size: int) -> Tuple[Optional[Tuple[RunDir, str]], List[str]]:
    """The checkpoint this run continues from, by `run.resume`, and warnings about checkpoints passed over.

    none: out_dir must be new (or empty). auto: continue out_dir's run from `latest`, or, when that is damaged,
    from the newest intact checkpoint before it; a run with no checkpoint yet starts again. A path: that
    checkpoint, into its own run or into a new (empty) out_dir."""
    resume = cfg.run.resume
    if resume == "none":
        if not run.is_empty():
            raise RunError(f"run.out_dir={run.path} already holds files ({', '.join(_listing(run.path))}): continue "
                           f"that run with run.resume=auto, or choose a new run.out_dir")
        return None, []
    if resume == "auto":
        if run.is_empty():
            return None, []
        if not run.is_run():
            raise RunError(f"run.out_dir={run.path} holds files ({', '.join(_listing(run.path))}) but no training "
                           f"run ({run.run_json.name} is missing): choose a new run.out_dir")
        check_same_model(cfg, run)
        tag, problems = run.latest_intact(world_size)
        if tag is None and run.tags():
            raise RunError(f"{run.path} has checkpoints but none can be resumed: {'; '.join(problems)}. Resume one "
                           f"explicitly with run.resume=<checkpoint dir>, or choose a new run.out_dir")
        if tag is None:
            return None, [f"{run.path} holds a run without a checkpoint: it starts again from step 0"]
        return (run, tag), [f"passing over: {p}" for p in problems]
    path = Path(resume)
    source = RunDir(path.parent.parent)
    if source.path.resolve() != run.path.resolve() and not run.is_empty():
        raise RunError(f"run.resume={resume} starts a new run from another run's checkpoint, so run.out_dir="
                       f"{run.path} must be new or empty; it holds {', '.join(_listing(run.path))}")
    problem = source.check(path.name, world_size)
    if problem is not None:
        raise RunError(f"run.resume={resume}: {problem}")
    if source.is_run():
        check_same_model(cfg, source)
    return (source, path.name), []


def check_same_model(cfg: TrainConfig, run: RunDir) -> None:
    recorded = run.recorded_config().get("model", {})
    ours = dataclasses.asdict(cfg.model)
    diff = [f"{k} {recorded.get(k)!r} -> {ours[k]!r}" for k in ("name", "kwargs", "num_classes")
            if recorded.get(k) != ours[k]]
    if diff:
        raise RunError(f"{run.path} trained another network ({', '.join(diff)}): its checkpoints cannot be loaded; "
                       f"choose a new run.out_dir")


def _listing(path: Path, n: int = 4) -> List[str]:
    names = sorted(p.name for p in path.iterdir())
    return names[:n] + ([f"... {len(names) - n} more"] if len(names) > n else [])


def create_model(cfg: TrainConfig, **kwargs: Any) -> nn.Module:
    """The recipe's model; `kwargs` go to timm.create_model too (the plan builds it on device="meta")."""
    import timm
    import timm_optdnn  # noqa: F401  (registers the models)
    m = cfg.model
    return timm.create_model(m.name, num_classes=m.num_classes, drop_path_rate=m.drop_path, **m.kwargs, **kwargs)


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """optim.lr, scaled linearly to the global batch when optim.lr_base_size is set (DeiT's rule)."""
    o = cfg.optim
    return o.lr * global_batch / o.lr_base_size if o.lr_base_size else o.lr


# ----------------------------------------------------------------------------------------- process-wide settings

@contextmanager
def process_settings(cfg: TrainConfig, env: DistEnv) -> Iterator[List[str]]:
    """Every process-wide change the run makes, undone on exit: the torch.distributed variables DeepSpeed reads from
    the environment, SIGTERM/SIGUSR1 handlers (each signal's name is appended to the yielded list), torch's CPU
    threads, cuDNN autotuning and TF32 matmuls on CUDA, the step watchdog."""
    received: List[str] = []
    handlers = {s: signal.signal(s, lambda n, _: received.append(signal.Signals(n).name))
                for s in (signal.SIGTERM, signal.SIGUSR1)}
    threads = torch.get_num_threads()
    if not use_cuda(cfg):  # ranks on one host share its cores
        torch.set_num_threads(cfg.dist.threads or max(1, (os.cpu_count() or 1) // env.local_world_size))
    try:
        with distributed_environment(env), cuda_training_settings() if use_cuda(cfg) else nullcontext():
            yield received
    finally:
        faulthandler.cancel_dump_traceback_later()
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)


@contextmanager
def cuda_training_settings() -> Iterator[None]:
    """cuDNN autotuning (fixed shapes per resolution: it picks its fastest kernels once) and TF32 for fp32 matmuls
    and convolutions, within the block; the previous settings after it."""
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=True):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


def compile_kwargs(device: torch.device) -> Dict[str, Any]:
    """torch.compile's keyword arguments for training on `device`. On CPU inductor lays the forward graph out
    channels-last (its rule for mkldnn convolutions) but not the backward graph, which has no convolution node for
    the rule to see: the gradients then run NCHW against NHWC activations, and every elementwise kernel between them
    transposes tiles (pytorch/pytorch#189239). Forcing the layout optimisation makes the backward channels-last too
    (measured on CPU, isotropic ConvNeXt-S at 224 px, both ways in one process: compiled train step 1.11-1.12x
    faster for gd and apg2; ViT unchanged). CUDA keeps inductor's own choice: not measured there."""
    return dict(options=dict(force_layout_optimization=True)) if device.type == "cpu" else {}


def use_cuda(cfg: TrainConfig) -> bool:
    return cfg.dist.device == "cuda" or (cfg.dist.device == "auto" and torch.cuda.is_available())


class Watchdog:
    """Ends this process, printing every thread's traceback, when a guarded block (a training step, an eval batch, a
    checkpoint save) runs longer than `timeout_s`. A dead or hung rank leaves the others blocked in a collective,
    and the process groups DeepSpeed creates keep torch's default timeout (30 min on gloo) whatever the run's is.
    Armed after the run's first step, which may compile the model or autotune kernels for minutes."""

    def __init__(self, timeout_s: int):
        self.timeout_s, self.armed = timeout_s, False

    @contextmanager
    def guard(self) -> Iterator[None]:
        if not self.armed:
            yield
            return
        faulthandler.dump_traceback_later(self.timeout_s, exit=True)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()


# ----------------------------------------------------------------------------------------------------- trainer

class Trainer:
    """One run. `setup()` builds everything (and resumes); `fit()` trains to the end, a stop signal or max_steps.

    Host syncs: the step loop reads nothing from the device except in `sync`, at log steps, checkpoint steps and
    the epoch end; losses wait on the device until then.
    """

    def __init__(self, cfg: TrainConfig, env: DistEnv, start: Start, signals: List[str]):
        self.cfg, self.env, self.start, self.signals = cfg, env, start, signals
        self.run = start.run
        self.rank, self.world = env.rank, env.world_size
        self.watchdog = Watchdog(cfg.dist.timeout_s)
        self.history: List[Dict[str, Any]] = []
        self.pending: List[torch.Tensor] = []  # this sync period's micro-batch losses, on the device
        self.rows: List[List[Any]] = []  # and its optimizer steps: [step, epoch, lr]
        self.window_loss, self.window_n = 0.0, 0  # since the last log line
        self.epoch_loss, self.epoch_n = 0.0, 0
        self.images_seen, self.train_time, self.compute_dtype = 0, 0.0, None
        self.t_log, self.seen_at_log = time.time(), 0

    def log(self, *args: Any) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    # ------------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        import deepspeed
        from timm.loss import SoftTargetCrossEntropy
        from timm.scheduler import CosineLRScheduler
        from timm.utils import ModelEmaV3
        from timm_optdnn.data import setup_process
        cfg, m = self.cfg, self.cfg.model
        self.t_start = time.time()
        self.device = torch.device("cuda", self.env.local_rank) if use_cuda(cfg) else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # a collective waiting longer than this (a dead rank) fails; DeepSpeed's own groups are the watchdog's
        deepspeed.init_distributed(timeout=timedelta(seconds=cfg.dist.timeout_s))
        if self.device.type == "cpu":
            release_shm_segment(self.env)
        self.run_id = self.start_run_files()
        seed_all(cfg.run.seed)  # the same initial weights on every rank (DeepSpeed broadcasts rank 0's anyway)

        model = create_model(cfg)
        if m.grad_checkpointing:
            model.set_grad_checkpointing(True)
        setup_process()
        self.train_loader, self.val_loader = create_loaders_for(cfg, model, distributed=self.world > 1,
                                                                seed=cfg.run.seed, device=self.device)
        self.steps_per_epoch = len(self.train_loader) // cfg.optim.grad_accum
        # micro-batches left over after the last full accumulation are not read: their gradients would be added to
        # the next epoch's first step and shift DeepSpeed's accumulation boundary off ours
        self.micro_per_epoch = self.steps_per_epoch * cfg.optim.grad_accum
        if self.steps_per_epoch == 0:
            raise RunError(f"{len(self.train_loader)} batches per epoch < optim.grad_accum={cfg.optim.grad_accum}")
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        self.max_steps = cfg.schedule.max_steps or self.total_steps
        global_batch = cfg.data.batch_size * cfg.optim.grad_accum * self.world
        self.lr = scaled_lr(cfg, global_batch)
        optimizer = create_optimizer(model, cfg, self.lr)
        self.optimizer = optimizer
        s = cfg.schedule
        self.scheduler = CosineLRScheduler(optimizer, t_initial=self.total_steps, lr_min=s.min_lr,
                                           warmup_lr_init=s.warmup_lr,
                                           warmup_t=int(s.warmup_epochs * self.steps_per_epoch), t_in_epochs=False)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=load_ds_config(cfg, self.world))
        self.coef_params = scheme_coefficient_params(self.engine.module)
        # after initialize: a full fp32 copy on the engine's device, of the weights DeepSpeed broadcast
        self.ema = ModelEmaV3(self.engine.module, decay=m.ema_decay, use_warmup=m.ema_warmup) if m.ema else None
        if m.compile:
            # the module compiles in place (state-dict keys unchanged); the EMA copy stays eager
            self.engine.compile(compile_kwargs=compile_kwargs(self.device))
        self.autocast = getattr(torch, AUTOCAST_DTYPES[cfg.dist.precision]) if cfg.dist.precision != "fp32" else None
        self.criterion = SoftTargetCrossEntropy() if self.train_loader.soft_targets else nn.CrossEntropyLoss()
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        self.log(f"model {m.name}: {self.n_params / 1e6:.3f}M params | world {self.world} x batch "
                 f"{cfg.data.batch_size} x accum {cfg.optim.grad_accum} = {global_batch} | lr {self.lr:.3g} | "
                 f"{self.steps_per_epoch} steps/epoch, {self.total_steps} total | ZeRO-{cfg.dist.zero_stage} "
                 f"{cfg.dist.precision} on {self.device}")

        self.epoch, self.batches_done = 0, 0
        if self.start.resume is not None:
            self.load(*self.start.resume)
        self.scheduler.step_update(self.engine.global_steps)
        if self.rank == 0:
            self.truncate_logs()
        self.tb = None
        if self.rank == 0 and cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(self.run.tb)
        dist.barrier()

    def start_run_files(self) -> str:
        """run.json (a new run) and config.yaml, on rank 0; every rank gets the run's id."""
        continuing = self.start.resume is not None and self.start.resume[0].path.resolve() == self.run.path.resolve()
        ids = [None]
        if self.rank == 0:
            ids[0] = self.run.run_id() if continuing or self.run.is_run() else self.run.create()
            save_config(self.cfg, self.run.config)
        dist.broadcast_object_list(ids, src=0)
        return ids[0]

    def load(self, source: RunDir, tag: str) -> None:
        """Continue from `tag`: weights, optimizer and loss scale (DeepSpeed), RNG, EMA, epoch position, history."""
        try:
            path, state = self.engine.load_checkpoint(str(source.checkpoints), tag=tag)
        except Exception as e:  # noqa: BLE001  DeepSpeed and torch raise assorted errors on bad files
            raise CheckpointError(f"loading {source.checkpoint(tag)} failed: {e}") from e
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint at {source.checkpoint(tag)}")
        set_rng_state(torch.load(source.checkpoint(tag) / f"rng_rank{self.rank}.pt", weights_only=False))
        self.epoch, self.batches_done, self.history = state["epoch"], state["batches_done"], state["history"]
        if self.ema is not None:
            if state["ema"] is None:
                raise CheckpointError(f"{source.checkpoint(tag)} has no EMA weights (trained with model.ema=false)")
            self.ema.load_state_dict(state["ema"])
        self.log(f"resumed from {source.checkpoint(tag)}: epoch {self.epoch}, step {self.engine.global_steps}")

    def truncate_logs(self) -> None:
        """steps.csv and summary.csv keep only what the resumed checkpoint had done: the rest is about to be redone."""
        step = self.engine.global_steps
        rows = list(csv.reader(self.run.steps.open()))[1:] if self.run.steps.is_file() else []
        with self.run.steps.open("w", newline="") as f:
            csv.writer(f).writerows([["step", "epoch", "loss", "lr"]] + [r for r in rows if int(r[0]) <= step])
        if self.run.summary.is_file():
            rows = list(csv.DictReader(self.run.summary.open()))
            keep = [r for r in rows if int(r["epoch"]) <= self.epoch]
            if keep:
                with self.run.summary.open("w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(keep)
            else:
                self.run.summary.unlink()

    # --------------------------------------------------------------------------------------------------- fit

    def fit(self) -> Dict[str, Any]:
        """Epochs until done, max_steps or a stop signal; writes result.json and returns it."""
        while self.epoch < self.cfg.schedule.epochs and self.engine.global_steps < self.max_steps:
            t0 = time.time()
            end = self.train_one_epoch(self.epoch, self.batches_done)
            epoch_s = time.time() - t0
            self.train_time += epoch_s
            if end == "preempted":
                return self.finish(end)
            self.end_epoch(epoch_s, epoch_done=end == "epoch")
        return self.finish("finished" if self.engine.global_steps >= self.total_steps else "max_steps")

    def train_one_epoch(self, epoch: int, skip: int) -> str:
        """Micro-batches `skip`.. of `epoch`: 'epoch' at its end, 'max_steps', or 'preempted' (saved)."""
        cfg = self.cfg
        accum = cfg.optim.grad_accum
        self.train_loader.set_epoch(epoch, skip=skip)
        self.engine.train()
        self.t_log, self.seen_at_log = time.time(), self.images_seen
        self.epoch_loss, self.epoch_n = 0.0, 0
        batch_i = skip
        if skip == self.micro_per_epoch:  # stopped after the epoch's last step, before its end was recorded
            return "epoch"
        for images, targets in self.train_loader:
            with self.watchdog.guard():
                logits = self.engine(images)
                self.compute_dtype = str(logits.dtype)
                loss = self.criterion(logits.float(), targets)
                self.engine.backward(loss)
                self.engine.step()
                self.pending.append(loss.detach())
                self.watchdog.armed = True
                batch_i += 1
                self.images_seen += images.shape[0] * self.world
                if batch_i % accum:
                    continue
                step = self.engine.global_steps
                self.scheduler.step_update(step)
                if self.ema is not None:
                    self.ema.update(self.engine.module, step=step)
                self.rows.append([step, epoch, self.optimizer.param_groups[0]["lr"]])
                last = batch_i == self.micro_per_epoch
                # the epoch's end (and a max_steps stop) save in end_epoch
                save = bool(cfg.run.ckpt_every_steps) and step % cfg.run.ckpt_every_steps == 0 and not last \
                    and step < self.max_steps
                if step % cfg.run.log_every_steps == 0 or save or last or step >= self.max_steps:
                    stop = self.sync(epoch, step)
                    if save or stop:
                        self.checkpoint(epoch, batch_i)
                    if stop:
                        self.log(f"received {self.signals or 'a stop signal on another rank'}: saved "
                                 f"{tag_for(step)}, exiting")
                        return "preempted"
                if step >= self.max_steps and not last:
                    self.batches_done = batch_i
                    return "max_steps"
                if last:
                    return "epoch"
        raise RuntimeError(f"the train loader ended after {batch_i} of {self.micro_per_epoch} micro-batches")

    def sync(self, epoch: int, step: int) -> bool:
        """The step loop's one host sync: the pending losses and every rank's stop flag, summed over ranks.
        Writes their steps to steps.csv, logs, stops the run on a non-finite loss; True if any rank was signalled."""
        n = len(self.pending)
        flag = torch.tensor([float(bool(self.signals))], device=self.device)
        stats = torch.cat([torch.stack(self.pending).float(), flag])
        dist.all_reduce(stats)
        values = stats.tolist()
        micro = [v / self.world for v in values[:n]]
        accum = self.cfg.optim.grad_accum
        for row, i in zip(self.rows, range(0, n, accum)):
            row.insert(2, sum(micro[i:i + accum]) / accum)  # the loss of the step's accumulated gradient
        rows, self.pending, self.rows = self.rows, [], []
        if self.rank == 0:
            with self.run.steps.open("a", newline="") as f:
                csv.writer(f).writerows([[s, e, f"{loss:.8f}", f"{lr:.8g}"] for s, e, loss, lr in rows])
        bad = next((r[0] for r in rows if not math.isfinite(r[2])), None)
        if bad is not None:
            self.stop_nonfinite(bad)
        self.window_loss, self.window_n = self.window_loss + sum(micro), self.window_n + n
        self.epoch_loss, self.epoch_n = self.epoch_loss + sum(micro), self.epoch_n + n
        if step % self.cfg.run.log_every_steps == 0:
            rate = (self.images_seen - self.seen_at_log) / (time.time() - self.t_log)
            lr = rows[-1][3]
            self.log(f"epoch {epoch + 1}/{self.cfg.schedule.epochs} step {step - epoch * self.steps_per_epoch}/"
                     f"{self.steps_per_epoch} loss {self.window_loss / self.window_n:.4f} lr {lr:.3g} {rate:.0f} img/s")
            if self.tb:
                for k, v in dict(loss=self.window_loss / self.window_n, lr=lr, img_s=rate).items():
                    self.tb.add_scalar(f"train/{k}", v, step)
            self.t_log, self.seen_at_log, self.window_loss, self.window_n = time.time(), self.images_seen, 0.0, 0
        return values[-1] > 0

    def stop_nonfinite(self, step: int) -> None:
        """The loss of `step` is not finite. The weights of checkpoint t gave step t+1's loss, so only checkpoints
        before step - 1 are known good: point `latest` at the newest of them and stop."""
        good = [t for t in self.run.tags() if step_of(t) <= step - 2 and self.run.check(t) is None]
        last_good = good[-1] if good else None
        if self.rank == 0:
            if last_good is not None:
                self.run.set_latest(last_good)
            self.write_result("nonfinite", None, last_good_checkpoint=last_good)
        dist.barrier()  # a launcher ends the other ranks when one exits: not before rank 0 has written this
        where = (f"the last checkpoint whose weights gave a finite loss is {self.run.checkpoint(last_good)} (now "
                 f"'latest': lower optim.lr and continue it with run.resume=auto)" if last_good else
                 "no checkpoint of this run has weights known to give a finite loss")
        raise NonFiniteLoss(f"non-finite loss at step {step}; {where}")

    def end_epoch(self, epoch_s: float, epoch_done: bool) -> None:
        """Evaluate when due, record the epoch (history, summary.csv, TensorBoard), save a checkpoint."""
        from timm.utils import update_summary
        cfg = self.cfg
        epoch = self.epoch + 1  # 1-based, as logged
        metrics: Dict[str, Any] = dict(epoch=epoch, step=self.engine.global_steps,
                                       loss=self.epoch_loss / self.epoch_n if self.epoch_n else math.nan,
                                       img_s=self.epoch_n * cfg.data.batch_size * self.world / epoch_s, epoch_s=epoch_s)
        if not epoch_done or epoch % cfg.run.eval_every_epochs == 0 or epoch == cfg.schedule.epochs:
            ev = self.evaluate(self.engine)
            metrics.update(top1=ev["top1"], top5=ev["top5"], val_loss=ev["loss"], val_count=ev["count"])
            if self.ema is not None:
                ev = self.evaluate(self.ema.module, autocast=self.autocast)
                metrics.update(ema_top1=ev["top1"], ema_top5=ev["top5"])
        coefs = self.scheme_coefficients()
        if coefs:
            metrics.update(coef_above_1=sum(c > 1 for c in coefs))
        self.history.append(metrics)
        self.log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if coefs:
            self.log(f"scheme coefficients: {' '.join(f'{c:.4f}' for c in coefs)}")
        if self.rank == 0:
            # the same columns every epoch (blank where an epoch was not evaluated): the header is written once
            train_keys = ("loss", "img_s", "epoch_s")
            eval_keys = ("top1", "top5", "val_loss", "val_count")
            eval_keys += ("ema_top1", "ema_top5") if self.ema is not None else ()
            other = [k for k in metrics if k not in ("epoch", *train_keys, *eval_keys)]
            update_summary(epoch, {k: metrics[k] for k in train_keys},
                           {k: metrics.get(k, "") for k in (*other, *eval_keys)}, str(self.run.summary),
                           lr=self.optimizer.param_groups[0]["lr"], write_header=not self.run.summary.is_file())
            if self.tb:
                for k, v in metrics.items():
                    self.tb.add_scalar(f"epoch/{k}", v, self.engine.global_steps)
        self.epoch, self.batches_done = (epoch, 0) if epoch_done else (self.epoch, self.batches_done)
        self.checkpoint(self.epoch, self.batches_done)

    def finish(self, status: str) -> Dict[str, Any]:
        coefs = self.scheme_coefficients()  # a collective under ZeRO-3: every rank
        result = self.write_result(status, coefs) if self.rank == 0 else {}
        if self.rank == 0:
            if self.tb:
                self.tb.close()
            plot_curves(self.run)
            self.log(f"done ({status}): step {self.engine.global_steps}, {result['train_img_s']:.0f} train img/s, "
                     f"peak rss/mem {result['peak_mem_mb']:.0f} MiB per rank, results in {self.run.path}")
        dist.barrier()
        return dict(result, status=status)

    def write_result(self, status: str, coefs: Optional[List[float]], **extra: Any) -> Dict[str, Any]:
        """result.json (rank 0): how the run ended, throughput, memory, the last metrics, the checkpoint to use,
        the learned scheme coefficients and how many exceed 1."""
        cuda = self.device.type == "cuda"
        peak_mb = (torch.cuda.max_memory_allocated() if cuda else
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
        result = dict(status=status, run_id=self.run_id, model=self.cfg.model.name, step=self.engine.global_steps,
                      params=self.n_params, train_img_s=self.images_seen / max(self.train_time, 1e-9),
                      train_s=self.train_time, wall_s=time.time() - self.t_start, peak_mem_mb=peak_mb,
                      compute_dtype=self.compute_dtype, last=self.history[-1] if self.history else None,
                      checkpoint=self.run.latest(),
                      scheme_coefficients=None if coefs is None else [round(c, 4) for c in coefs],
                      coef_above_1=None if coefs is None else sum(c > 1 for c in coefs), **extra)
        self.run.result.write_text(json.dumps(result, indent=1))
        return result

    def scheme_coefficients(self) -> List[float]:
        """The model's learned scheme coefficients (ZeRO-3: gathered from their shards, on every rank)."""
        import deepspeed
        if not self.coef_params:
            return []
        with deepspeed.zero.GatheredParameters(self.coef_params, enabled=self.cfg.dist.zero_stage == 3):
            return self.engine.module.scheme_coefficients()

    # ------------------------------------------------------------------------------------------- evaluate

    def evaluate(self, model: nn.Module, autocast: Optional[torch.dtype] = None) -> Dict[str, float]:
        """`evaluate` over this run's val loader, each batch guarded by the watchdog."""
        return evaluate(model, self.val_loader, self.device, lockstep=self.cfg.dist.zero_stage == 3,
                        autocast=autocast, guard=self.watchdog.guard)

    # ----------------------------------------------------------------------------------------- checkpoint

    def checkpoint(self, epoch: int, batches_done: int) -> str:
        """Save step<N>: DeepSpeed's files, every rank's RNG, then (after all ranks are done) the manifest and
        `latest`; older checkpoints of this run beyond keep_last go."""
        tag = tag_for(self.engine.global_steps)
        state: ClientState = dict(run_id=self.run_id, epoch=epoch, batches_done=batches_done, history=self.history,
                                  model=self.cfg.model.name, model_kwargs=self.cfg.model.kwargs,
                                  num_classes=self.cfg.model.num_classes,
                                  ema=self.ema.state_dict() if self.ema is not None else None)
        with self.watchdog.guard():
            if self.rank == 0:
                self.run.begin_checkpoint(tag)
            self.engine.save_checkpoint(str(self.run.checkpoints), tag=tag, client_state=state, save_latest=False)
            self.run.checkpoint(tag).mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), self.run.checkpoint(tag) / f"rng_rank{self.rank}.pt")
            dist.barrier()
            if self.rank == 0:
                self.run.commit_checkpoint(tag, self.run_id, self.world)
                self.run.prune(self.run_id, self.cfg.run.keep_last)
            dist.barrier()
        return tag


# ----------------------------------------------------------------------------------------------------- helpers

def create_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer over timm's parameter groups (weight decay off for 1-d parameters and the model's
    no_weight_decay(), layer decay if set), plus one group for the scheme coefficients: no weight decay, lr scaled
    by optim.coef_lr_scale, outside layer decay. timm's schedulers apply each group's lr_scale."""
    from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
    o = cfg.optim
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if o.layer_decay is not None:
        groups = param_groups_layer_decay(model, o.weight_decay, no_decay, layer_decay=o.layer_decay)
    else:
        groups = param_groups_weight_decay(model, o.weight_decay, no_weight_decay_list=no_decay)
    coefs = scheme_coefficient_params(model)
    ids = {id(p) for p in coefs}
    groups = [dict(g, params=[p for p in g["params"] if id(p) not in ids]) for g in groups]
    groups = [g for g in groups if g["params"]]
    if coefs:
        groups.append(dict(params=coefs, weight_decay=0.0, lr_scale=o.coef_lr_scale))
    extra = {k: v for k, v in dict(eps=o.eps, betas=o.betas).items() if v is not None}
    return create_optimizer_v2(groups, opt=o.opt, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, **extra)


def scheme_coefficient_params(model: nn.Module) -> List[nn.Parameter]:
    """The learnable scheme coefficients: the direct parameters of every SchemeBlocks."""
    from timm_optdnn.models.schemes import SchemeBlocks
    return [p for m in model.modules() if isinstance(m, SchemeBlocks) for p in m.parameters(recurse=False)]


def create_loaders_for(cfg: TrainConfig, model: nn.Module, *, distributed: bool = False, seed: int = 0,
                       device: torch.device = torch.device("cpu")):
    """(train, val) loaders of the recipe's data section, normalised with the model's pretrained cfg's mean and std
    where the recipe sets none."""
    from timm.data import resolve_data_config
    from timm_optdnn.data import create_loaders
    model_cfg = resolve_data_config({}, model=model)
    data = dataclasses.replace(cfg.data, mean=cfg.data.mean or list(model_cfg["mean"]),
                               std=cfg.data.std or list(model_cfg["std"]))
    return create_loaders(data, num_classes=cfg.model.num_classes, distributed=distributed, seed=seed, device=device)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, lockstep: bool = False,
             autocast: Optional[torch.dtype] = None, guard=None) -> Dict[str, float]:
    """Top-1/top-5/loss over the val set, summed over ranks: every sample is on exactly one rank, so counts are exact.

    autocast: run the forward under torch.autocast in this dtype (a DeepSpeed engine applies its own).
    lockstep (ZeRO-3): every rank runs the same number of forwards (parameters are gathered collectively), so a
    rank whose shard has one batch fewer runs a throw-away forward. guard: a context for each batch (the watchdog).
    """
    guard = guard or nullcontext
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, count, loss sum
    n_batches = 0
    for images, labels in loader:
        with guard(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(images).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5 == labels[:, None]
            stats[0] += hit[:, 0].sum()
            stats[1] += hit.any(1).sum()
            stats[2] += labels.numel()
            stats[3] += nn.functional.cross_entropy(logits, labels, reduction="sum")
        n_batches += 1
    if lockstep and dist.is_initialized():
        most = torch.tensor(n_batches, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        for _ in range(int(most) - n_batches):
            model(images[:1])
    if dist.is_initialized():
        dist.all_reduce(stats)
    model.train(was_training)
    c1, c5, n, loss = stats.tolist()
    return dict(top1=100 * c1 / n, top5=100 * c5 / n, loss=loss / n, count=int(n))


def release_shm_segment(env: DistEnv) -> None:
    """DeepSpeed's CPU allreduce gives every rank a 66 MiB /dev/shm segment and never unlinks it, so each run
    would leak that much RAM (tmpfs) until reboot. Once every rank has mapped every segment (init maps them; the
    barrier says all ranks are past it) the names can go: the memory is freed when the last rank exits, killed or
    not."""
    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.master_addr}_{env.master_port}_{env.rank}"
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def plot_curves(run: RunDir) -> None:
    """curves.png: per-step training loss and per-epoch val top-1 (and EMA top-1) from the run's CSVs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = list(csv.DictReader(run.steps.open()))
    summary = list(csv.DictReader(run.summary.open())) if run.summary.is_file() else []
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([int(r["step"]) for r in steps], [float(r["loss"]) for r in steps], lw=0.7)
    a.set(xlabel="step", ylabel="train loss", yscale="log")
    for key in ("eval_top1", "eval_ema_top1"):
        pts = [(int(r["epoch"]), float(r[key])) for r in summary if r.get(key)]
        if pts:
            b.plot(*zip(*pts), marker="o", label=key.replace("eval_", ""))
    b.set(xlabel="epoch", ylabel="val top-1 (%)")
    b.legend()
    fig.tight_layout()
    fig.savefig(run.curves, dpi=100)
    plt.close(fig)
