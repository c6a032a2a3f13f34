"""Training recipes: sections of plain values, loaded from YAML + `section.key=value` overrides, checked up front.

    model:    {name: optdnn_apg2_vit_s, drop_path: 0.1, ema: false}
    data:     {train_path: ..., batch_size: 128}        # timm_optdnn.data.DataConfig, as create_loaders takes it
    optim:    {opt: adamw, lr: 5.0e-4, lr_base_size: 512}
    schedule: {epochs: 300, warmup_epochs: 5}
    dist:     {precision: bf16, zero_stage: 1}
    run:      {out_dir: runs/optdnn_apg2_vit_s, resume: auto}

Every component reads its own section. An unknown section or key (with a "did you mean"), a value of the wrong type
or an impossible combination raises `ConfigError` naming it, on every rank, before the data or the model is touched.
"""
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from timm_optdnn.data import DataConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # a link to the repo's configs/, in a wheel a copy
AUTOCAST_DTYPES = dict(bf16="bfloat16", fp16="float16")  # dist.precision -> DeepSpeed torch_autocast dtype


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    name: str = "optdnn_apg2_convnext_iso_fm"  # a registered timm model
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (dim, depth, scheme, ...)
    num_classes: int = 10
    drop_path: float = 0.0
    ema: bool = False  # timm ModelEmaV3 of the weights, evaluated beside the model
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    compile: bool = False  # torch.compile of the model (timm's --torchcompile)
    grad_checkpointing: bool = False  # recompute each block's activations in backward (timm's --grad-checkpointing)


@dataclass
class OptimConfig:
    opt: str = "adamw"  # any timm optimizer (create_optimizer_v2)
    lr: float = 5e-4
    lr_base_size: int = 0  # > 0: lr scales linearly to lr * global_batch / lr_base_size (DeiT: 512)
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None
    coef_lr_scale: float = 1.0  # the scheme coefficients' lr = lr * coef_lr_scale (no weight decay, no layer decay)
    eps: Optional[float] = None
    betas: Optional[List[float]] = None
    momentum: float = 0.9
    clip_grad: float = 0.0  # max global grad norm, 0 = off
    grad_accum: int = 1  # micro-batches of data.batch_size per optimizer step


@dataclass
class ScheduleConfig:
    epochs: int = 300
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs); the schedule still spans `epochs`
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass
class DistConfig:
    precision: str = "fp32"  # fp32 | bf16 | fp16: see docs/training.md
    zero_stage: int = 0
    deepspeed_config: Optional[str] = None  # default configs/deepspeed/zero{zero_stage}.json
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch threads per rank on CPU (0 = cores / local ranks)
    timeout_s: int = 600  # a step, eval batch or collective waiting longer than this (a dead rank) ends the run


@dataclass
class RunConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    resume: str = "auto"  # auto (continue out_dir's run, if any) | none (out_dir must be new) | a checkpoint dir
    ckpt_every_steps: int = 0  # 0 = only at epoch ends
    keep_last: int = 3  # checkpoints of this run kept; older ones of this run are deleted
    eval_every_epochs: int = 1
    log_every_steps: int = 50  # also how often the ranks agree on a stop signal and check the loss is finite
    tensorboard: bool = True


@dataclass
class PlanConfig:  # --plan: the cluster it plans for and, unmeasured, the device's assumed throughput
    gpus_per_node: int = 8
    nodes: int = 1
    peak_tflops: float = 312.0  # A100 dense bf16 (H100 SXM: 989)
    utilization: float = 0.3


SECTIONS: Dict[str, type] = dict(model=ModelConfig, data=DataConfig, optim=OptimConfig, schedule=ScheduleConfig,
                                 dist=DistConfig, run=RunConfig, plan=PlanConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            _check_types(name, getattr(self, name), cls)
        self.validate()

    def validate(self) -> None:
        """Impossible values and combinations: everything here is knowable before the first process starts."""
        import timm
        import timm_optdnn  # noqa: F401  (registers the models)
        m, d, o, s, ds, r, p = self.model, self.data, self.optim, self.schedule, self.dist, self.run, self.plan
        need(timm.is_model(m.name), f"model.name={m.name!r} is not a registered timm model")
        need(ds.precision in ("fp32", "bf16", "fp16"), f"dist.precision={ds.precision!r}: use fp32, bf16 or fp16")
        need(ds.zero_stage in (0, 1, 2, 3), f"dist.zero_stage={ds.zero_stage}: DeepSpeed ZeRO stages are 0-3")
        need(ds.device in ("auto", "cpu", "cuda"), f"dist.device={ds.device!r}: use auto, cpu or cuda")
        need(d.backend in ("ffcv", "torchvision"), f"data.backend={d.backend!r}: use ffcv or torchvision")
        need(d.order in ("random", "quasi_random", "sequential"),
             f"data.order={d.order!r}: use random, quasi_random or sequential")
        need(r.resume in ("auto", "none") or Path(r.resume).is_dir(),
             f"run.resume={r.resume!r}: use auto, none or an existing checkpoint directory")
        positive = dict(model=("num_classes",), data=("batch_size", "img_size"), optim=("grad_accum",),
                        schedule=("epochs",), dist=("timeout_s",),
                        run=("keep_last", "eval_every_epochs", "log_every_steps"), plan=("gpus_per_node", "nodes"))
        non_negative = dict(model=("drop_path",), data=("num_workers", "repeated_aug", "re_prob", "mixup", "cutmix"),
                            optim=("lr_base_size", "weight_decay", "clip_grad"),
                            schedule=("max_steps", "warmup_epochs"), dist=("threads",), run=("ckpt_every_steps",))
        for section, keys in positive.items():
            for k in keys:
                value = getattr(getattr(self, section), k)
                need(value > 0, f"{section}.{k}={value} must be > 0")
        for section, keys in non_negative.items():
            for k in keys:
                value = getattr(getattr(self, section), k)
                need(value >= 0, f"{section}.{k}={value} must be >= 0")
        need(o.lr > 0 and o.coef_lr_scale >= 0, f"optim.lr={o.lr} must be > 0 and optim.coef_lr_scale >= 0")
        need(0 <= d.label_smoothing < 1, f"data.label_smoothing={d.label_smoothing} must be in [0, 1)")
        need(0 <= d.hflip <= 1, f"data.hflip={d.hflip} must be in [0, 1]")
        need(s.warmup_epochs < s.epochs,
             f"schedule.warmup_epochs={s.warmup_epochs} must be < schedule.epochs={s.epochs}")
        need(o.layer_decay is None or 0 < o.layer_decay <= 1, f"optim.layer_decay={o.layer_decay} must be in (0, 1]")
        need(0 < m.ema_decay < 1, f"model.ema_decay={m.ema_decay} must be in (0, 1)")
        need(0 < p.utilization <= 1, f"plan.utilization={p.utilization} must be in (0, 1]")
        need(len(d.scale) == 2 and 0 < d.scale[0] <= d.scale[1] <= 1,
             f"data.scale={d.scale}: need 0 < min <= max <= 1")
        need(len(d.ratio) == 2 and 0 < d.ratio[0] <= d.ratio[1], f"data.ratio={d.ratio}: need 0 < min <= max")
        need(d.res_schedule is None or len(d.res_schedule) == 4,
             f"data.res_schedule={d.res_schedule}: need [start_res, end_res, start_ramp_epoch, end_ramp_epoch]")
        if d.res_schedule is not None:
            need(d.backend == "ffcv", "data.res_schedule (progressive resizing) needs data.backend=ffcv")
            need(d.res_schedule[2] <= d.res_schedule[3] <= s.epochs,
                 f"data.res_schedule ramp epochs {d.res_schedule[2:]} must be ordered and <= epochs={s.epochs}")
        for k in ("mean", "std"):
            need(getattr(d, k) is None or len(getattr(d, k)) == 3, f"data.{k} needs 3 values (RGB)")
        need(o.betas is None or len(o.betas) == 2, f"optim.betas={o.betas} needs 2 values")
        # EMA keeps a full copy of the module on every rank; under ZeRO-3 a rank holds only a shard of each
        # parameter, so the copy would be of empty placeholders. Refuse rather than train a meaningless EMA.
        need(not (m.ema and ds.zero_stage == 3), "model.ema=true needs dist.zero_stage <= 2 (ZeRO-3 partitions "
             "the parameters, so a per-rank EMA copy would hold empty shards)")
        # DeepSpeed's ZeRO optimizers run torch's GradScaler once per parameter group (each group steps, skips and
        # moves the scale on its own) and clip before unscaling; without ZeRO it is one scaler, unscaled first.
        need(not (ds.precision == "fp16" and ds.zero_stage > 0), "dist.precision=fp16 needs dist.zero_stage=0: "
             "under ZeRO, DeepSpeed scales the loss per parameter group; use bf16 with ZeRO")
        if ds.deepspeed_config is not None:
            need(Path(ds.deepspeed_config).is_file(), f"dist.deepspeed_config={ds.deepspeed_config}: no such file")

    @property
    def ds_config_path(self) -> Path:
        return Path(self.dist.deepspeed_config) if self.dist.deepspeed_config else \
            CONFIG_DIR / "deepspeed" / f"zero{self.dist.zero_stage}.json"

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


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


def _check_types(name: str, section: Any, cls: type) -> None:
    """Each value against its field's type; YAML 1.1's `1e-3` (a string) and an int where a float goes are fixed."""
    need(isinstance(section, cls), f"{name} must be a mapping of {cls.__name__} keys, got {section!r}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(section):
        value, tp = getattr(section, f.name), hints[f.name]
        if isinstance(value, str) and _matches(1.0, tp):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool) and _matches(1.0, tp) \
                and int not in (tp, *typing.get_args(tp)):
            value = float(value)
        need(_matches(value, tp), f"{name}.{f.name}={value!r} ({type(value).__name__}) is not a valid {tp}")
        setattr(section, f.name, value)


def _did_you_mean(key: str, known: List[str]) -> str:
    close = difflib.get_close_matches(key, known, 1)
    return f"{key} (did you mean {close[0]}?)" if close else key


def _merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """Sections merge key by key; a key's value (also a dict, e.g. model.kwargs) is replaced whole."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in top.items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def from_dict(values: Dict[str, Any]) -> TrainConfig:
    """A TrainConfig from {section: {key: value}}, refusing unknown sections and keys by name."""
    unknown = [_did_you_mean(s, list(SECTIONS)) for s in values if s not in SECTIONS]
    for s, keys in values.items():
        if s in SECTIONS and isinstance(keys, dict):
            known = [f.name for f in dataclasses.fields(SECTIONS[s])]
            unknown += [_did_you_mean(f"{s}.{k}", [f"{s}.{n}" for n in known]) for k in keys if k not in known]
    need(not unknown, f"unknown config key(s): {', '.join(unknown)}")
    sections = {}
    for s, cls in SECTIONS.items():
        keys = values.get(s, {})
        need(isinstance(keys, dict), f"{s} must be a mapping of {cls.__name__} keys, got {keys!r}")
        sections[s] = cls(**keys)
    return TrainConfig(**sections)


def parse_overrides(overrides: List[str]) -> Dict[str, Dict[str, Any]]:
    """`section.key=value` pairs, values parsed as YAML (`optim.lr=1e-3`, `model.ema=true`, `data.scale=[0.35,1]`)."""
    out: Dict[str, Dict[str, Any]] = {}
    for item in overrides:
        need("=" in item, f"override {item!r} is not section.key=value")
        key, value = item.split("=", 1)
        section, dot, name = key.strip().partition(".")
        if not dot:  # a bare key (`lr`) or an underscored one (`plan_nodes`): name the section.key it may be
            keys = {f.name: f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
            close = difflib.get_close_matches(section.replace("_", "."), list(keys.values()), 1)
            guess = ", ".join(f"{section}.{f.name}" for f in dataclasses.fields(SECTIONS[section])) \
                if section in SECTIONS else keys.get(section) or (close[0] if close else None)
            hint = f" (did you mean {guess}?)" if guess else ""
            raise ConfigError(f"override {item!r}: keys are section.key{hint}")
        try:
            out.setdefault(section, {})[name] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not YAML ({str(e).splitlines()[0]})") from None
    return out


def read_recipe(path: Path) -> Dict[str, Any]:
    """A YAML recipe as {section: {key: value}}, with its `base: other.yaml` (a path relative to it) merged first."""
    need(path.is_file(), f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    need(isinstance(values, dict), f"{path}: a recipe is a mapping of sections, got {type(values).__name__}")
    base = values.pop("base", None)
    return _merge(read_recipe(path.parent / base), values) if base is not None else values


def load_config(path: Optional[str], overrides: Optional[List[str]] = None) -> TrainConfig:
    """A YAML recipe plus `section.key=value` overrides, checked."""
    values = read_recipe(Path(path)) if path else {}
    return from_dict(_merge(values, parse_overrides(overrides or [])))


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_ds_config(cfg: TrainConfig, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed JSON (ZeRO settings) completed with what the recipe decides: batch, precision, clipping.

    Mixed precision is DeepSpeed's `torch_autocast`: the module, its gradients, their accumulation and reduction stay
    fp32 (an empty lower-precision module list keeps every gradient's communication in fp32), the forward runs under
    torch.autocast, and fp16 adds torch's dynamic loss scaling."""
    ds = json.loads(cfg.ds_config_path.read_text())
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    need(stage == cfg.dist.zero_stage,
         f"{cfg.ds_config_path} has ZeRO stage {stage} but dist.zero_stage={cfg.dist.zero_stage}")
    for key in ("bf16", "fp16", "torch_autocast"):
        need(key not in ds, f"{cfg.ds_config_path}: remove its '{key}' section; dist.precision sets precision")
    batch, accum = cfg.data.batch_size, cfg.optim.grad_accum
    ds.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=accum,
              train_batch_size=batch * accum * world_size, gradient_clipping=cfg.optim.clip_grad,
              steps_per_print=10 ** 9, wall_clock_breakdown=False,
              # any timm optimizer is an ordinary torch optimizer whose state ZeRO shards like Adam's; without this
              # DeepSpeed refuses everything but its own Adam/Lamb list under ZeRO (opt=sgd, lars, ... would fail)
              zero_allow_untested_optimizer=True)
    if cfg.dist.precision != "fp32":
        ds["torch_autocast"] = dict(enabled=True, dtype=AUTOCAST_DTYPES[cfg.dist.precision],
                                    lower_precision_safe_modules=[])
    return ds


