"""`python -m timm_optdnn.training --config R.yaml --plan [--measure]`: what a recipe costs on a cluster.

--plan starts no work. It counts world, batch and steps, the model states per GPU under the recipe's ZeRO stage,
the training compute (fvcore), and derives a wall time from an ASSUMED device rate (plan.peak_tflops x
plan.utilization), labelled as such. Activation memory is unknown without a measurement.

--plan --measure first trains the recipe's model for a few steps on this machine's device (its GPU, if it has one):
forward, backward and optimizer step (plus the EMA update) at the recipe's per-device batch, grad_accum,
precision (autocast), channels_last, grad_checkpointing and compile, on synthetic images at each resolution the
recipe trains at. Measured img/s and peak memory (activations included) then replace the assumptions, and the
cluster plan is extrapolated from them: data loading and inter-GPU communication are not part of the measurement.

FLOPs are fvcore's, as timm_optdnn.flops reports them: one multiply-add is one FLOP (the papers' convention);
training costs 3 x forward. A device's peak TFLOP/s counts a multiply-add as 2 FLOPs, hence the 2 where they meet.
"""
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional

import torch

from .config import TrainConfig

IMAGENET_TRAIN = 1281167
FLOPS_PER_MAC = 2  # device peaks count a multiply-add as two FLOPs; fvcore (and the papers) as one


class States(NamedTuple):
    """Bytes of the model states on one device, unsharded. The trainer keeps fp32 weights (bf16 / fp16 are autocast)
    and fp32 gradients; the optimizer's state is measured, or assumed to be two fp32 moments (Adam, AdamW, LAMB)."""
    params: int
    grads: int
    optimizer: int
    ema: int

    @classmethod
    def assumed(cls, params: int, ema: bool) -> "States":
        return cls(4 * params, 4 * params, 8 * params, 4 * params if ema else 0)

    def per_gpu(self, zero_stage: int, world: int, largest_layer: int) -> int:
        """Bytes on each of `world` GPUs under DeepSpeed's ZeRO: stages 1-2 add an fp32 copy of each rank's share of
        the weights and shard it with the optimizer state; stage 2 also shards the gradients; stage 3 also the
        weights, each layer gathered whole in turn (`largest_layer` parameters). Communication buckets not included."""
        if zero_stage == 0:
            return sum(self)
        sharded = self.params + self.optimizer + (self.grads if zero_stage >= 2 else 0) + \
            (self.params if zero_stage == 3 else 0)
        whole = (self.params if zero_stage < 3 else 4 * largest_layer) + (self.grads if zero_stage < 2 else 0)
        return int(whole + sharded / world + self.ema)


class Measured(NamedTuple):
    device: str  # what ran the steps, e.g. "NVIDIA H100 80GB HBM3 (cuda:0)" or "cpu, 2 torch threads"
    steps: int  # optimizer steps timed at each resolution (after warm-up steps, which include compilation)
    img_s: Dict[int, float]  # images per second on this one device, by resolution
    peak_bytes: int  # peak over all resolutions: CUDA max allocated, or (CPU) peak RSS growth + the tensors held before
    states: States  # the model states within that peak, counted from the tensors

    @property
    def activation_bytes(self) -> int:
        """Activations and workspace: the measured peak less the model states."""
        return max(self.peak_bytes - sum(self.states), 0)


def measure(cfg: TrainConfig, steps: int = 5, warmup: int = 2) -> Measured:
    """Time `steps` real optimizer steps of the recipe's model per resolution on the local device: the trainer's model
    and optimizer (its parameter groups: weight decay, layer decay, the scheme coefficients' group)."""
    from timm.utils import ModelEmaV3
    from .trainer import compile_kwargs, create_model, create_optimizer, cuda_training_settings, use_cuda
    m, d, o, precision = cfg.model, cfg.data, cfg.optim, cfg.dist.precision
    on_cuda = use_cuda(cfg)
    if precision == "fp16" and not on_cuda:
        raise ValueError("precision=fp16 is measured on a GPU only (as it trains)")
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    name = f"{torch.cuda.get_device_name(device)} ({device})" if on_cuda else \
        f"cpu, {torch.get_num_threads()} torch threads"
    memory_format = torch.channels_last if d.channels_last else torch.contiguous_format
    model = create_model(cfg).to(device=device, memory_format=memory_format).train()
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = create_optimizer(model, cfg, o.lr)
    ema = ModelEmaV3(model, decay=m.ema_decay, device=device) if m.ema else None
    step_model = torch.compile(model, **compile_kwargs(device)) if m.compile else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def train_step(x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        for _ in range(o.grad_accum):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(step_model(x), y)
            scaler.scale(loss / o.grad_accum).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, step=step)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    def timed_steps(res: int) -> float:
        """img/s of `steps` optimizer steps at `res` px, after `warmup` (compilation, autotuning, optimizer state)."""
        x = torch.randn(d.batch_size, 3, res, res, device=device).contiguous(memory_format=memory_format)
        y = torch.randint(0, m.num_classes, (d.batch_size,), device=device)
        for i in range(warmup):
            train_step(x, y, i)
        sync()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for i in range(steps):
            train_step(x, y, warmup + i)
        sync()
        return steps * o.grad_accum * d.batch_size / (time.perf_counter() - t0)

    if not on_cuda:  # CPU: from before the first step (freed memory is not always handed back to the OS)
        rss0 = _reset_peak_rss()
    img_s, peak = {}, 0
    for res in sorted(set(resolutions(cfg))):
        with cuda_training_settings() if on_cuda else nullcontext():
            img_s[res] = timed_steps(res)
        if on_cuda:
            peak = max(peak, torch.cuda.max_memory_allocated(device))
    states = States(params=_bytes(model.parameters()),
                    grads=_bytes(p for p in model.parameters() if p.requires_grad),  # live at the peak, then freed
                    optimizer=_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
                    ema=_bytes(ema.module.state_dict().values()) if ema is not None else 0)
    if not on_cuda:  # what the steps added to the resident memory at its peak, plus the tensors held before
        peak = _proc_status("VmHWM") - rss0 + states.params + states.ema
    return Measured(name, steps, img_s, peak, states)


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _reset_peak_rss() -> int:
    """Linux: make the process's peak RSS (VmHWM) its current RSS, and return that."""
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status("VmHWM")


def _proc_status(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024  # kB


def resolutions(cfg: TrainConfig) -> List[int]:
    """The training resolution of each epoch (FFCV progressive resizing, or the fixed img_size)."""
    from timm_optdnn.data import resolution
    d = cfg.data
    return [resolution(e, *d.res_schedule) if d.res_schedule else d.img_size for e in range(cfg.schedule.epochs)]


def train_samples(cfg: TrainConfig) -> int:
    meta = Path(f"{cfg.data.train_path}.meta.json")
    return json.loads(meta.read_text())["num_samples"] if cfg.data.train_path and meta.is_file() else IMAGENET_TRAIN


def plan(cfg: TrainConfig, measured: Optional[Measured] = None) -> Dict[str, Any]:
    """The plan's numbers; wall time from `measured` if given, else from the assumed device rate."""
    from timm_optdnn.flops import count
    from .trainer import create_model, scaled_lr
    m, d, o, ds, pl = cfg.model, cfg.data, cfg.optim, cfg.dist, cfg.plan
    world = pl.gpus_per_node * pl.nodes
    global_batch = d.batch_size * o.grad_accum * world
    n = train_samples(cfg)
    steps_per_epoch = n // global_batch
    images_per_epoch = steps_per_epoch * global_batch
    model = create_model(cfg, device="meta")
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    res = resolutions(cfg)
    gflops = {s: count(m.name, img_size=s, num_classes=m.num_classes, **m.kwargs)[0] for s in set(res)}
    train_flops = sum(3 * gflops[s] * 1e9 * images_per_epoch for s in res)
    states = measured.states if measured else States.assumed(params, m.ema)
    per_gpu = states.per_gpu(ds.zero_stage, world, largest)
    p = dict(model=m.name, params_m=params / 1e6, gflops=gflops[res[-1]], img_size=res[-1], nodes=pl.nodes,
             gpus_per_node=pl.gpus_per_node, world=world, batch_per_gpu=d.batch_size, grad_accum=o.grad_accum,
             global_batch=global_batch, lr=scaled_lr(cfg, global_batch),
             train_samples=n, steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * cfg.schedule.epochs,
             epochs=cfg.schedule.epochs, resolutions=sorted(set(res)), zero_stage=ds.zero_stage,
             precision=ds.precision, model_state_gib=per_gpu / 2 ** 30, train_pflop=train_flops / 1e15,
             peak_tflops=pl.peak_tflops, utilization=pl.utilization, measured=measured is not None)
    if measured is None:
        seconds = train_flops * FLOPS_PER_MAC / (world * pl.peak_tflops * 1e12 * pl.utilization)
        p.update(memory_gib=None)
    else:
        seconds = sum(images_per_epoch / (world * measured.img_s[s]) for s in res)
        achieved = {s: measured.img_s[s] * 3 * gflops[s] * FLOPS_PER_MAC / 1e3 for s in measured.img_s}
        p.update(memory_gib=(measured.activation_bytes + per_gpu) / 2 ** 30, device=measured.device,
                 measured_steps=measured.steps, img_s=measured.img_s, achieved_tflops=achieved,
                 peak_gib=measured.peak_bytes / 2 ** 30, state_gib=sum(states) / 2 ** 30,
                 activation_gib=measured.activation_bytes / 2 ** 30)
    return dict(p, wall_h=seconds / 3600, gpu_h=seconds / 3600 * world)


def print_plan(cfg: TrainConfig, measure_steps: int = 0) -> Dict[str, Any]:
    """Print the plan (with `measure_steps` > 0: measured on this machine's device first) and return it."""
    mo, precision = cfg.model, cfg.dist.precision
    m = measure(cfg, steps=measure_steps) if measure_steps else None
    p = plan(cfg, m)
    rows = [
        ("model", f"{p['model']} ({p['params_m']:.4g}M params, {p['gflops']:.4g} GFLOPs/img forward at "
                  f"{p['img_size']} px)"),
        ("world", f"{p['nodes']} node(s) x {p['gpus_per_node']} GPUs = {p['world']} ranks"),
        ("batch", f"{p['batch_per_gpu']} per GPU x accum {p['grad_accum']} = {p['global_batch']} global, "
                  f"lr {p['lr']:.3g}"),
        ("steps", f"{p['steps_per_epoch']} / epoch ({p['train_samples']} images) x {p['epochs']} epochs = "
                  f"{p['total_steps']}"),
        ("resolution", ", ".join(map(str, p["resolutions"]))),
        ("training compute", f"{p['train_pflop']:.4g} PFLOP (3 x forward x images; 1 multiply-add = 1 FLOP)"),
        ("model states / GPU", f"{_gib(p['model_state_gib'])} (ZeRO-{p['zero_stage']} over {p['world']} ranks: fp32 "
                               f"weights and gradients, {'measured' if m else 'assumed Adam-like'} optimizer state"
                               f"{', fp32 EMA copy' if mo.ema else ''}{_autocast(precision)})"),
    ]
    if m is None:
        rows += [
            ("memory / GPU", "activations unknown: --measure runs a few steps to measure them"),
            ("ASSUMED device", f"{p['peak_tflops']:.0f} TFLOP/s peak x {p['utilization']:.0%} utilisation "
                               f"(plan.peak_tflops, plan.utilization; not measured: --measure on the target GPU)"),
        ]
    else:
        speed = ", ".join(f"{p['img_s'][s]:.1f} img/s at {s} px ({p['achieved_tflops'][s]:.3g} TFLOP/s, "
                          f"{p['achieved_tflops'][s] / p['peak_tflops']:.1%} of plan.peak_tflops)"
                          for s in sorted(p["img_s"]))
        rows += [
            ("measured on", f"{p['device']}: {p['measured_steps']} steps of {p['batch_per_gpu']} x {p['grad_accum']} "
                            f"synthetic images per resolution, {precision}"
                            f"{'' if precision == 'fp32' else ' autocast'}, "
                            f"channels_last {_on(cfg.data.channels_last)}, grad_checkpointing "
                            f"{_on(mo.grad_checkpointing)}, compile {_on(mo.compile)}, {cfg.optim.opt}"
                            f"{', EMA' if mo.ema else ''}"),
            ("measured speed", f"{speed} per device (device peaks count a multiply-add as 2 FLOPs)"),
            ("measured memory", f"{_gib(p['peak_gib'])} peak = {_gib(p['state_gib'])} model states + "
                                f"{_gib(p['activation_gib'])} activations and workspace"
                                f"{'' if 'cuda' in p['device'] else ' (CPU: growth of the peak RSS, approximate)'}"),
            ("memory / GPU", f"{_gib(p['memory_gib'])} = {_gib(p['activation_gib'])} activations (measured) + "
                             f"{_gib(p['model_state_gib'])} model states (above)"),
        ]
    basis = "measured img/s x ranks; data loading and communication not included" if m else "ASSUMED device rate"
    rows += [("wall time", f"{_duration(p['wall_h'] * 3600)} ({basis})"), ("GPU-hours", f"{p['gpu_h']:.4g}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return p


def _autocast(precision: str) -> str:
    return "" if precision == "fp32" else f"; {precision} by autocast"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _gib(x: float) -> str:
    return f"{x:.2f} GiB" if x >= 0.1 else f"{x * 1024:.1f} MiB"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.1f} min" if seconds >= 120 else \
        f"{seconds:.0f} s"
