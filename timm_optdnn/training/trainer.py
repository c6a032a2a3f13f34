"""The training loop: DeepSpeed engine around a timm model, FFCV loaders, per-step cosine schedule, EMA,
exact checkpoint/resume, distributed eval. Launcher-agnostic: reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR
(set by `deepspeed`, `torchrun`, or mapped from SLURM's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID).

    deepspeed --num_gpus 2 --module timm_optdnn.training --config configs/demo.yaml
    torchrun --nproc_per_node 8 -m timm_optdnn.training --config configs/optdnn_apg2_vit_s.yaml
"""
import csv
import dataclasses
import json
import os
import random
import resource
import shutil
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import TrainConfig, load_ds_config, save_config
from .launch import EXIT_PREEMPTED

STEP_LOG = "steps.csv"  # one row per optimizer step on rank 0: the record exact-resume is checked against


class NonFiniteLoss(RuntimeError):
    pass


def log0(*args: Any) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


# ------------------------------------------------------------------------------------------------- set-up

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_env() -> None:
    """Fill the torch.distributed env from SLURM (srun, one task per GPU) or for a plain single process."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ["SLURM_LOCALID"])
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed launch without {missing}: set them (the launch scripts in train/ do)")


def setup_distributed(cfg: TrainConfig) -> torch.device:
    import deepspeed
    setup_env()
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:  # ranks on one host share its cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or os.environ["WORLD_SIZE"])
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local))
    # the timeout bounds how long the survivors wait in a collective when a rank has died
    deepspeed.init_distributed(timeout=timedelta(seconds=cfg.dist_timeout_s))
    if not use_cuda:
        release_shm_segment()
    return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")


def release_shm_segment() -> None:
    """DeepSpeed's CPU allreduce gives every rank a 66 MiB /dev/shm segment and never unlinks it, so each run
    would leak that much RAM (tmpfs) until reboot. Once every rank has mapped every segment (init maps them; the
    barrier says all ranks are past it) the names can go: the memory is freed when the last rank exits, killed or not."""
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_"
            f"{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def set_group_timeouts(timeout: timedelta) -> None:
    """Give every process group the run's timeout. DeepSpeed creates its own groups (data parallel, ZeRO) without
    one, so they get torch's default (30 min on gloo, 10 on NCCL) and a hung rank would hold the others in ZeRO's
    collectives that long, whatever `dist_timeout_s` says."""
    for group in list(dist.distributed_c10d._world.pg_map):  # torch lists the groups only in this private map
        dist.set_timeout(timeout, group)


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


def create_model(cfg: TrainConfig) -> nn.Module:
    import timm
    import timm_optdnn  # noqa: F401
    return timm.create_model(cfg.model, num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path, **cfg.model_kwargs)


def data_config(cfg: TrainConfig, model: nn.Module):
    """The recipe's data section, with mean and std from the model's pretrained cfg where the recipe sets none."""
    from timm.data import resolve_data_config
    from timm_optdnn.data import DataConfig
    model_cfg = resolve_data_config({}, model=model)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DataConfig) if hasattr(cfg, f.name)}
    return DataConfig(**dict(fields, mean=cfg.mean or list(model_cfg["mean"]), std=cfg.std or list(model_cfg["std"])))


# ---------------------------------------------------------------------------------------------- checkpoints

class Checkpointer:
    """DeepSpeed checkpoints under out_dir/checkpoints/<tag>, plus one RNG file per rank.

    DeepSpeed's own 'latest' is not used: ours is written (tmp file + atomic rename) only after every rank has
    finished its part, so a save that dies half-way leaves the previous 'latest' in charge.
    """

    def __init__(self, root: Path, keep_last: int):
        self.root, self.keep_last = root, keep_last
        self.rank = dist.get_rank()

    def latest(self) -> Optional[str]:
        f = self.root / "latest"
        return f.read_text().strip() if f.is_file() else None

    def save(self, engine, client_state: Dict[str, Any]) -> str:
        tag = f"step{engine.global_steps:08d}"
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), self.root / tag / f"rng_rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / "latest")
            tags = sorted(p.name for p in self.root.glob("step*") if p.is_dir())
            for old in tags[:-self.keep_last]:
                shutil.rmtree(self.root / old, ignore_errors=True)
        dist.barrier()
        return tag

    def load(self, engine, path: Path, tag: Optional[str]) -> Dict[str, Any]:
        load_path, client_state = engine.load_checkpoint(str(path), tag=tag)
        if load_path is None:
            raise RuntimeError(f"could not load checkpoint {tag} from {path}")
        rng_file = path / tag / f"rng_rank{self.rank}.pt"
        if not rng_file.is_file():
            raise RuntimeError(f"{rng_file} missing: checkpoint was written by a different world size?")
        set_rng_state(torch.load(rng_file, weights_only=False))
        return client_state


# ------------------------------------------------------------------------------------------------- eval

@torch.no_grad()
def evaluate(model: nn.Module, loader, dtype: torch.dtype, device: torch.device, lockstep: bool) -> Dict[str, float]:
    """Top-1/top-5 over the val set: every sample is on exactly one rank, so the summed counts are exact.

    lockstep (ZeRO-3): every rank must run the same number of forwards (parameters are gathered collectively),
    so a rank whose shard has one batch fewer runs a throw-away forward.
    """
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, count, loss sum
    n_batches = 0
    for images, labels in loader:
        logits = model(images.to(dtype)).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == labels[:, None]
        stats += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(labels.numel(), device=device),
                              nn.functional.cross_entropy(logits, labels, reduction="sum")]).double()
        n_batches += 1
    if lockstep and dist.is_initialized():
        most = torch.tensor(n_batches, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        for _ in range(int(most) - n_batches):
            model(images[:1].to(dtype))
    if dist.is_initialized():
        dist.all_reduce(stats)
    model.train(was_training)
    c1, c5, n, loss = stats.tolist()
    return dict(top1=100 * c1 / n, top5=100 * c5 / n, loss=loss / n, count=int(n))


# --------------------------------------------------------------------------------------------------- train

def train(cfg: TrainConfig) -> Dict[str, Any]:
    import deepspeed
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3, update_summary
    from timm_optdnn.data import create_loaders, setup_process

    device = setup_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(cfg.out_dir)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_last)
    if rank == 0:
        ckpt.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    seed_all(cfg.seed)  # same init on every rank; DeepSpeed broadcasts rank 0's weights anyway

    # model, data, optimizer, schedule
    model = create_model(cfg)
    setup_process()
    train_loader, val_loader = create_loaders(data_config(cfg, model), num_classes=cfg.num_classes,
                                              distributed=world > 1, seed=cfg.seed, device=device)
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    # micro-batches left over after the last full accumulation are not read: their gradients would be added to the
    # next epoch's first step and shift DeepSpeed's accumulation boundary off ours
    micro_per_epoch = steps_per_epoch * cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_loader)} batches per epoch < grad_accum={cfg.grad_accum}: nothing to step")
    total_steps = steps_per_epoch * cfg.epochs
    global_batch = cfg.batch_size * cfg.grad_accum * world
    lr = cfg.lr * global_batch / cfg.lr_base_size if cfg.lr_base_size else cfg.lr
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay, momentum=cfg.momentum,
                                    **{k: v for k, v in dict(eps=cfg.opt_eps, betas=cfg.opt_betas).items() if v})
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=cfg.min_lr, warmup_lr_init=cfg.warmup_lr,
                                  warmup_t=int(cfg.warmup_epochs * steps_per_epoch), t_in_epochs=False)
    # the EMA copy is taken before DeepSpeed casts the module to bf16/fp16, so it averages in fp32
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=load_ds_config(cfg, world))
    set_group_timeouts(timedelta(seconds=cfg.dist_timeout_s))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    criterion = SoftTargetCrossEntropy() if train_loader.soft_targets else nn.CrossEntropyLoss()
    n_params = sum(p.numel() for p in model.parameters()) if cfg.zero_stage < 3 else \
        sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    log0(f"model {cfg.model}: {n_params / 1e6:.3f}M params | world {world} x batch {cfg.batch_size} x accum "
         f"{cfg.grad_accum} = {global_batch} | lr {lr:.3g} | {steps_per_epoch} steps/epoch, {total_steps} total | "
         f"ZeRO-{cfg.zero_stage} {cfg.precision} on {device}")

    # resume
    start_epoch, skip_batches, history = 0, 0, []
    resume_dir, resume_tag = (ckpt.root, ckpt.latest()) if cfg.resume == "auto" else \
        (None, None) if cfg.resume == "none" else (Path(cfg.resume).parent, Path(cfg.resume).name)
    if resume_tag is not None:
        state = ckpt.load(engine, resume_dir, resume_tag)
        start_epoch, skip_batches, history = state["epoch"], state["batches_done"], state["history"]
        if ema is not None:
            ema.load_state_dict(state["ema"])
        log0(f"resumed from {resume_dir / resume_tag}: epoch {start_epoch}, step {engine.global_steps}")
    scheduler.step_update(engine.global_steps)
    steps_file = out / STEP_LOG
    if rank == 0:  # drop rows of steps past the checkpoint: they are about to be redone
        rows = [r for r in csv.reader(steps_file.open())][1:] if steps_file.is_file() else []
        with steps_file.open("w") as f:
            csv.writer(f).writerows([["step", "epoch", "loss", "lr"]] +
                                    [r for r in rows if int(r[0]) <= engine.global_steps])
    tb = None
    if rank == 0 and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(out / "tb")

    # preemption: remember the signal, save and leave at the next step boundary (all ranks agree via all_reduce)
    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signal.Signals(signum).name))

    def client_state(epoch: int, batches_done: int) -> Dict[str, Any]:
        return dict(epoch=epoch, batches_done=batches_done, history=history, model=cfg.model,
                    model_kwargs=cfg.model_kwargs, num_classes=cfg.num_classes,
                    ema=ema.state_dict() if ema is not None else None)

    t_start, train_time, images_seen, status = time.time(), 0.0, 0, "finished"
    compute_dtype = None  # what the model's output really came out in: DeepSpeed, not the recipe, decides it
    max_steps = cfg.max_steps or total_steps
    for epoch in range(start_epoch, cfg.epochs):
        if engine.global_steps >= max_steps or status != "finished":
            break
        train_loader.set_epoch(epoch, skip=skip_batches)
        engine.train()
        t0, loss_sum, loss_n, batch_i, step_loss = time.time(), 0.0, 0, skip_batches, 0.0
        for images, targets in train_loader:
            logits = engine(images.to(dtype))
            compute_dtype = str(logits.dtype)
            loss = criterion(logits.float(), targets)
            flags = torch.stack([(~torch.isfinite(loss)).float(), torch.tensor(float(bool(stop_signal))),
                                 loss.detach().float()]).to(device)
            dist.all_reduce(flags)  # one tiny collective: NaN on any rank, a signal on any rank, the mean loss
            if flags[0] > 0:
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {engine.global_steps} (on "
                                    f"{int(flags[0])} rank(s)); last good checkpoint: {ckpt.latest()}")
            engine.backward(loss)
            engine.step()
            batch_i += 1
            images_seen += images.shape[0] * world
            loss_sum, loss_n = loss_sum + flags[2].item() / world, loss_n + 1
            step_loss += flags[2].item() / world / cfg.grad_accum  # the loss DeepSpeed's accumulated gradient is of
            if batch_i % cfg.grad_accum:
                continue
            step = engine.global_steps
            scheduler.step_update(step)
            if ema is not None:
                update_ema(ema, engine.module, step)
            lr_now = optimizer.param_groups[0]["lr"]
            if rank == 0:
                with steps_file.open("a") as f:
                    csv.writer(f).writerow([step, epoch, f"{step_loss:.8f}", f"{lr_now:.8g}"])
            if step % cfg.log_every_steps == 0:
                rate = (batch_i - skip_batches) * cfg.batch_size * world / (time.time() - t0)
                log0(f"epoch {epoch + 1}/{cfg.epochs} step {batch_i // cfg.grad_accum}/{steps_per_epoch} "
                     f"loss {loss_sum / loss_n:.4f} lr {lr_now:.3g} {rate:.0f} img/s")
                if tb:
                    tb.add_scalar("train/loss", loss_sum / loss_n, step)
                    tb.add_scalar("train/lr", lr_now, step)
                    tb.add_scalar("train/img_s", rate, step)
            step_loss = 0.0
            if flags[1] > 0 or (cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0 and
                                batch_i < micro_per_epoch):
                tag = ckpt.save(engine, client_state(epoch, batch_i))
                if flags[1] > 0:
                    log0(f"received {stop_signal or 'a stop signal on another rank'}: saved {tag}, exiting")
                    status = "preempted"
                    break
            if step >= max_steps:
                status = "max_steps" if step < total_steps else "finished"
                break
            if batch_i == micro_per_epoch:
                break
        epoch_time = time.time() - t0
        train_time += epoch_time
        if status == "preempted":
            break
        epoch_done = batch_i == micro_per_epoch
        metrics = dict(epoch=epoch + 1, step=engine.global_steps, loss=loss_sum / max(loss_n, 1),
                       img_s=((batch_i - skip_batches) * cfg.batch_size * world) / epoch_time, epoch_s=epoch_time)
        skip_batches = 0
        if epoch_done and ((epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs) or status != "finished":
            ev = evaluate(engine, val_loader, dtype, device, lockstep=cfg.zero_stage == 3)
            metrics.update(top1=ev["top1"], top5=ev["top5"], val_loss=ev["loss"], val_count=ev["count"])
            if ema is not None:
                ev = evaluate(ema.module, val_loader, torch.float32, device, lockstep=False)
                metrics.update(ema_top1=ev["top1"], ema_top5=ev["top5"])
        history.append(metrics)
        log0("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if rank == 0:
            summary = out / "summary.csv"
            update_summary(epoch + 1, {k: metrics[k] for k in ("loss", "img_s", "epoch_s")},
                           {k: v for k, v in metrics.items() if k not in ("epoch", "loss", "img_s", "epoch_s")},
                           str(summary), lr=optimizer.param_groups[0]["lr"], write_header=not summary.is_file())
            if tb:
                for k, v in metrics.items():
                    tb.add_scalar(f"epoch/{k}", v, engine.global_steps)
        ckpt.save(engine, client_state(epoch + 1 if epoch_done else epoch, 0 if epoch_done else batch_i))

    peak_mb = (torch.cuda.max_memory_allocated() if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    result = dict(status=status, model=cfg.model, step=engine.global_steps, params=n_params,
                  train_img_s=images_seen / max(train_time, 1e-9), train_s=train_time, wall_s=time.time() - t_start,
                  peak_mem_mb=peak_mb, compute_dtype=compute_dtype, last=history[-1] if history else None,
                  checkpoint=ckpt.latest(),
                  scheme_coefficients=[round(c, 4) for c in engine.module.scheme_coefficients()]
                  if cfg.zero_stage < 3 and hasattr(engine.module, "scheme_coefficients") else None)
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result, indent=1))
        if tb:
            tb.close()
        plot_curves(out)
        log0(f"done ({status}): step {result['step']}, {result['train_img_s']:.0f} train img/s, "
             f"peak rss/mem {peak_mb:.0f} MiB per rank, results in {out}")
    dist.barrier()
    return result


def update_ema(ema, module: nn.Module, step: int) -> None:
    """timm's EMA step; a bf16/fp16 module is averaged into the fp32 copy (timm's lerp needs equal dtypes)."""
    if next(module.parameters()).dtype == torch.float32:
        return ema.update(module, step=step)
    decay = ema.get_decay(step)
    with torch.no_grad():
        for e, m in zip(ema.module.state_dict().values(), module.state_dict().values()):
            e.lerp_(m.float(), 1 - decay) if e.is_floating_point() else e.copy_(m)


def plot_curves(out: Path) -> None:
    """curves.png: per-step training loss and per-epoch val top-1 (and EMA top-1) from the run's CSVs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = list(csv.DictReader((out / STEP_LOG).open()))
    summary = list(csv.DictReader((out / "summary.csv").open())) if (out / "summary.csv").is_file() else []
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
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def main(cfg: TrainConfig) -> int:
    try:
        result = train(cfg)
    except NonFiniteLoss as e:
        print(f"[rank {os.environ.get('RANK', 0)}] stopping: {e}", file=sys.stderr, flush=True)
        return 3
    if result["status"] == "preempted":
        return EXIT_PREEMPTED  # saved on a signal: the launch scripts (and SLURM's requeue) tell it from the end
    return 0 if result["status"] in ("finished", "max_steps") else 1
