"""Training recipes: one flat dataclass, loaded from YAML + `key=value` overrides and validated before any work.

Every field below is a recipe key. An unknown key, a value of the wrong type or an impossible combination
raises `ConfigError` naming the problem, on every rank, before the data or the model is touched.
"""
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # a link to the repo's configs/, in a wheel a copy


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # model
    model: str = "optdnn_apg2_convnext_iso_fm"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (dim, depth, ...)
    num_classes: int = 10
    drop_path: float = 0.0
    # data (timm_optdnn.data.create_loaders)
    train_path: str = ""
    val_path: str = ""
    backend: str = "ffcv"
    img_size: int = 224
    val_img_size: Optional[int] = None
    crop_pct: float = 0.875
    res_schedule: Optional[List[int]] = None  # [start_res, end_res, start_ramp_epoch, end_ramp_epoch]
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    mean: Optional[List[float]] = None  # None = the model's pretrained cfg
    std: Optional[List[float]] = None
    rand_augment: Optional[str] = None
    re_prob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    repeated_aug: int = 0  # DeiT's repeated augmentation (timm --aug-repeats): each sample N times per epoch; 0 = off
    num_workers: int = 2
    channels_last: bool = False
    order: str = "random"
    os_cache: bool = True
    # batch and schedule
    batch_size: int = 128  # per device, per micro step
    val_batch_size: Optional[int] = None
    grad_accum: int = 1
    epochs: int = 300
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs); the schedule still spans `epochs`
    # optimizer (timm create_optimizer_v2) and lr schedule (timm CosineLRScheduler, stepped per optimizer step)
    opt: str = "adamw"
    lr: float = 5e-4
    lr_base_size: int = 0  # > 0: lr is scaled linearly to lr * global_batch / lr_base_size (DeiT: 512)
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None
    opt_eps: Optional[float] = None
    opt_betas: Optional[List[float]] = None
    momentum: float = 0.9
    clip_grad: float = 0.0  # max global grad norm, 0 = off
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    # EMA of weights (timm ModelEmaV3)
    ema: bool = False
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    # DeepSpeed
    precision: str = "fp32"  # fp32 | bf16 | fp16 (dynamic loss scaling)
    zero_stage: int = 0
    deepspeed_config: Optional[str] = None  # default configs/deepspeed/zero{zero_stage}.json
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch threads per rank on CPU (0 = cores / local ranks)
    dist_timeout_s: int = 600  # a collective waiting longer than this (a dead rank) aborts the run
    # run, checkpoints, logging
    seed: int = 0
    out_dir: str = "runs/default"
    resume: str = "auto"  # auto (latest in out_dir, if any) | none | path of a checkpoint dir
    ckpt_every_steps: int = 0  # 0 = only at epoch ends
    keep_last: int = 3
    eval_every_epochs: int = 1
    log_every_steps: int = 50
    tensorboard: bool = True
    # --plan only: assumed device throughput for the wall-time estimate
    plan_gpus_per_node: int = 8
    plan_nodes: int = 1
    plan_peak_tflops: float = 312.0  # A100 dense bf16 (H100 SXM: 989)
    plan_utilization: float = 0.3

    def __post_init__(self) -> None:
        _check_types(self)
        self.validate()

    def validate(self) -> None:
        """Impossible combinations: everything here is knowable before the first process starts."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)
        import timm
        import timm_optdnn  # noqa: F401  (registers the models)
        need(timm.is_model(self.model), f"model={self.model!r} is not a registered timm model")
        need(self.precision in ("fp32", "bf16", "fp16"), f"precision={self.precision!r}: use fp32, bf16 or fp16")
        need(self.zero_stage in (0, 1, 2, 3), f"zero_stage={self.zero_stage}: DeepSpeed ZeRO stages are 0-3")
        need(self.backend in ("ffcv", "torchvision"), f"backend={self.backend!r}: use ffcv or torchvision")
        need(self.device in ("auto", "cpu", "cuda"), f"device={self.device!r}: use auto, cpu or cuda")
        need(self.resume in ("auto", "none") or Path(self.resume).is_dir(),
             f"resume={self.resume!r}: use auto, none or an existing checkpoint directory")
        need(self.order in ("random", "quasi_random", "sequential"), f"order={self.order!r}: random|quasi_random|sequential")
        for k in ("num_classes", "batch_size", "grad_accum", "epochs", "keep_last", "eval_every_epochs",
                  "log_every_steps", "img_size", "plan_gpus_per_node", "plan_nodes", "dist_timeout_s"):
            need(getattr(self, k) > 0, f"{k}={getattr(self, k)} must be > 0")
        for k in ("max_steps", "ckpt_every_steps", "num_workers", "threads", "lr_base_size", "clip_grad",
                  "repeated_aug", "warmup_epochs", "weight_decay", "drop_path", "re_prob", "mixup", "cutmix"):
            need(getattr(self, k) >= 0, f"{k}={getattr(self, k)} must be >= 0")
        need(self.lr > 0, f"lr={self.lr} must be > 0")
        need(0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        need(0 <= self.hflip <= 1, f"hflip={self.hflip} must be in [0, 1]")
        need(self.warmup_epochs < self.epochs, f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        need(self.layer_decay is None or 0 < self.layer_decay <= 1, f"layer_decay={self.layer_decay} must be in (0, 1]")
        need(0 < self.ema_decay < 1, f"ema_decay={self.ema_decay} must be in (0, 1)")
        need(0 < self.plan_utilization <= 1, f"plan_utilization={self.plan_utilization} must be in (0, 1]")
        need(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1, f"scale={self.scale}: need 0 < min <= max <= 1")
        need(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], f"ratio={self.ratio}: need 0 < min <= max")
        need(self.res_schedule is None or len(self.res_schedule) == 4,
             f"res_schedule={self.res_schedule}: need [start_res, end_res, start_ramp_epoch, end_ramp_epoch]")
        if self.res_schedule is not None:
            need(self.backend == "ffcv", "res_schedule (progressive resizing) needs backend=ffcv")
            need(self.res_schedule[2] <= self.res_schedule[3] <= self.epochs,
                 f"res_schedule ramp epochs {self.res_schedule[2:]} must be ordered and <= epochs={self.epochs}")
        for k in ("mean", "std"):
            need(getattr(self, k) is None or len(getattr(self, k)) == 3, f"{k} needs 3 values (RGB)")
        need(self.opt_betas is None or len(self.opt_betas) == 2, f"opt_betas={self.opt_betas} needs 2 values")
        # EMA keeps a full copy of the module on every rank; under ZeRO-3 a rank holds only a shard of each
        # parameter, so the copy would be of empty placeholders. Refuse rather than train a meaningless EMA.
        need(not (self.ema and self.zero_stage == 3), "ema=true needs zero_stage <= 2 (ZeRO-3 partitions the "
             "parameters, so a per-rank EMA copy would hold empty shards)")
        need(not (self.device == "cpu" and self.precision == "fp16"),
             "precision=fp16 needs a GPU (DeepSpeed's CPU accelerator supports fp32 and bf16)")
        if self.deepspeed_config is not None:
            need(Path(self.deepspeed_config).is_file(), f"deepspeed_config={self.deepspeed_config}: no such file")

    @property
    def ds_config_path(self) -> Path:
        return Path(self.deepspeed_config) if self.deepspeed_config else CONFIG_DIR / "deepspeed" / f"zero{self.zero_stage}.json"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _matches(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, List):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict)
    return isinstance(value, tp)


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str) and _matches(1.0, hints[f.name]):  # YAML 1.1 reads `1e-3` as a string
            try:
                value = float(value)
                setattr(cfg, f.name, value)
            except ValueError:
                pass
        if not _matches(value, hints[f.name]):
            raise ConfigError(f"{f.name}={value!r} ({type(value).__name__}) is not a valid {hints[f.name]}")
        if hints[f.name] is float or float in typing.get_args(hints[f.name]):
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(cfg, f.name, float(value))


def parse_overrides(overrides: List[str]) -> Dict[str, Any]:
    """`key=value` pairs; values are parsed as YAML (so `lr=1e-3`, `ema=true`, `scale=[0.35,1]` work)."""
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value != "" else None
    return out


def load_config(path: Optional[str], overrides: Optional[List[str]] = None) -> TrainConfig:
    """A YAML recipe (optionally `base: other.yaml`, merged first) plus `key=value` overrides, validated."""
    values = _read_yaml(Path(path)) if path else {}
    values.update(parse_overrides(overrides or []))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib
        hints = [f"{k} (did you mean {difflib.get_close_matches(k, known, 1)[0]}?)"
                 if difflib.get_close_matches(k, known, 1) else k for k in unknown]
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}")
    return TrainConfig(**values)


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of key: value, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is not None:
        values = {**_read_yaml(path.parent / base), **values}
    return values


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_ds_config(cfg: TrainConfig, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed JSON (ZeRO settings) completed with what the recipe decides: batch, precision, clipping."""
    ds = json.loads(cfg.ds_config_path.read_text())
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != cfg.zero_stage:
        raise ConfigError(f"{cfg.ds_config_path} has ZeRO stage {stage} but zero_stage={cfg.zero_stage}")
    ds.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
              train_batch_size=cfg.batch_size * cfg.grad_accum * world_size, gradient_clipping=cfg.clip_grad,
              steps_per_print=10 ** 9, wall_clock_breakdown=False,
              # any timm optimizer is an ordinary torch optimizer whose state ZeRO shards like Adam's; without this
              # DeepSpeed refuses everything but its own Adam/Lamb list under ZeRO (opt=sgd, lars, ... would fail)
              zero_allow_untested_optimizer=True)
    ds["bf16"] = {"enabled": cfg.precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.precision == "fp16"}
    return ds
