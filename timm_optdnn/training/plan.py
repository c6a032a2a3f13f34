"""`python -m timm_optdnn.training --config ... --plan`: what a recipe costs on a cluster, without starting any work.

Memory: DeepSpeed's own ZeRO model-state estimators (no offload) for the configured stage; activations are not
included (they depend on batch, resolution and checkpointing). Time: training FLOPs per image = 3 x forward
(backward ~ 2 x forward) x 2 FLOPs per multiply-add, forward multiply-adds counted by fvcore
(timm_optdnn.flops) at each epoch's resolution, divided by world x plan_peak_tflops x plan_utilization.
"""
import json
from pathlib import Path
from typing import Any, Dict

from .config import TrainConfig

IMAGENET_TRAIN = 1281167


def train_samples(cfg: TrainConfig) -> int:
    meta = Path(f"{cfg.data.train_path}.meta.json")
    return json.loads(meta.read_text())["num_samples"] if cfg.data.train_path and meta.is_file() else IMAGENET_TRAIN


def model_state_bytes(cfg: TrainConfig, params: int, largest_layer: int, world: int) -> int:
    """Per-GPU bytes of params + grads + Adam states: DeepSpeed's estimator for stages 1-3 (the stage-2 estimator
    is DeepSpeed's closest for stage 1, which shards less: it is a lower bound there); stage 0 is plain data
    parallel mixed precision, 2 + 2 + 12 bytes per parameter (the same accounting DeepSpeed uses)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    if cfg.dist.zero_stage == 0:
        return 16 * params
    if cfg.dist.zero_stage in (1, 2):
        return estimate_zero2_model_states_mem_needs(params, cfg.plan.gpus_per_node, cfg.plan.nodes,
                                                     cpu_offload=False)[1]
    return estimate_zero3_model_states_mem_needs(params, largest_layer, cfg.plan.gpus_per_node, cfg.plan.nodes,
                                                 cpu_offload=False, cpu_offload_params=False)[1]


def plan(cfg: TrainConfig) -> Dict[str, Any]:
    import timm
    import timm_optdnn  # noqa: F401
    from timm_optdnn.data import resolution
    from timm_optdnn.flops import count
    world = cfg.plan.gpus_per_node * cfg.plan.nodes
    global_batch = cfg.data.batch_size * cfg.optim.grad_accum * world
    n = train_samples(cfg)
    steps_per_epoch = n // global_batch
    model = timm.create_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.kwargs)
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    res = [resolution(e, *cfg.data.res_schedule) if cfg.data.res_schedule else cfg.data.img_size
           for e in range(cfg.schedule.epochs)]
    gmacs = {r: count(cfg.model.name, img_size=r, num_classes=cfg.model.num_classes, **cfg.model.kwargs)[0]
             for r in set(res)}
    train_flops = sum(6 * gmacs[r] * 1e9 * steps_per_epoch * global_batch for r in res)
    device_flops = cfg.plan.peak_tflops * 1e12 * cfg.plan.utilization
    hours = train_flops / (world * device_flops) / 3600
    lr = cfg.optim.lr * global_batch / cfg.optim.lr_base_size if cfg.optim.lr_base_size else cfg.optim.lr
    return dict(model=cfg.model.name, params_m=params / 1e6,
                gmacs=gmacs[cfg.data.img_size] if cfg.data.img_size in gmacs else gmacs[res[-1]],
                nodes=cfg.plan.nodes, gpus_per_node=cfg.plan.gpus_per_node, world=world,
                batch_per_gpu=cfg.data.batch_size, grad_accum=cfg.optim.grad_accum, global_batch=global_batch, lr=lr,
                train_samples=n, steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * cfg.schedule.epochs,
                epochs=cfg.schedule.epochs, resolutions=sorted(set(res)), zero_stage=cfg.dist.zero_stage,
                precision=cfg.dist.precision,
                model_state_gib=model_state_bytes(cfg, params, largest, world) / 2 ** 30,
                train_pflop=train_flops / 1e15, peak_tflops=cfg.plan.peak_tflops, utilization=cfg.plan.utilization,
                wall_h=hours, gpu_h=hours * world)


def print_plan(cfg: TrainConfig) -> Dict[str, Any]:
    p = plan(cfg)
    rows = [
        ("model", f"{p['model']} ({p['params_m']:.2f}M params, {p['gmacs']:.2f} GMACs/img fwd at "
                  f"{cfg.data.img_size} px)"),
        ("world", f"{p['nodes']} node(s) x {p['gpus_per_node']} GPUs = {p['world']} ranks"),
        ("batch", f"{p['batch_per_gpu']} per GPU x accum {p['grad_accum']} = {p['global_batch']} global, lr {p['lr']:.3g}"),
        ("steps", f"{p['steps_per_epoch']} / epoch ({p['train_samples']} images) x {p['epochs']} epochs = "
                  f"{p['total_steps']}"),
        ("resolution", ", ".join(map(str, p["resolutions"]))),
        ("model states / GPU", f"{p['model_state_gib']:.2f} GiB (ZeRO-{p['zero_stage']}, {p['precision']}; "
                               f"DeepSpeed estimator, activations not included)"),
        ("training compute", f"{p['train_pflop']:.0f} PFLOP (6 x fwd MACs x images)"),
        ("assumed device", f"{p['peak_tflops']:.0f} TFLOP/s peak x {p['utilization']:.0%} utilisation "
                           f"(plan.peak_tflops=, plan.utilization=)"),
        ("wall time", f"{p['wall_h']:.1f} h"),
        ("GPU-hours", f"{p['gpu_h']:.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return p
