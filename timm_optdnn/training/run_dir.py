"""A training run's directory: the one place that knows its layout and the checkpoint schema.

    <out_dir>/
      run.json              {"run_id": ...}: written when the run starts; its checkpoints carry the same id
      config.yaml           the effective recipe (sections, as `load_config` reads it)
      steps.csv             step, epoch, loss, lr of every optimizer step
      summary.csv           one row per finished epoch (timm's update_summary)
      result.json           how the run ended (see `Result` in trainer.py)
      curves.png, tb/       loss and top-1 curves, TensorBoard scalars
      checkpoints/
        latest              the tag of the newest complete checkpoint
        step00000036/       DeepSpeed's files, rng_rank<r>.pt per rank, manifest.json (written last)

A checkpoint is complete when its manifest exists: the trainer writes it after every rank has saved, recording each
file's size, the run's id and the world size. `check` compares a checkpoint with its manifest before it is used, so
a truncated, missing or foreign file is found by name before DeepSpeed reads it. Retention (`prune`) deletes only
checkpoints whose manifest names this run.

The trainer's client state (saved by DeepSpeed in the model-states file, read with `client_state`) holds the keys
of `ClientState`; DeepSpeed adds its own (`module`, `global_steps`, ...).

Readers (export, publish, the demo, the experiments) use `RunDir(path)`: `latest_intact()` names the checkpoint
to read, `client_state(tag)` its state, `recorded_config()` the recipe the run was started with.
"""
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, TypedDict, Union

import torch
import yaml

PathLike = Union[str, Path]
MANIFEST = "manifest.json"
LATEST = "latest"
TAG_PREFIX = "step"
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3


class ClientState(TypedDict):
    """What the trainer saves beside DeepSpeed's state in every checkpoint."""
    run_id: str
    epoch: int  # epochs finished
    batches_done: int  # micro-batches of the unfinished epoch already trained (resume skips them)
    history: List[Dict[str, Any]]  # one metrics dict per finished epoch
    model: str  # the timm model name
    model_kwargs: Dict[str, Any]  # its create_model kwargs (without num_classes)
    num_classes: int
    ema: Optional[Dict[str, torch.Tensor]]  # the EMA weights (fp32) or None


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> int:
    return int(tag[len(TAG_PREFIX):])


class RunDir:
    """One run's files. Reading needs nothing but the directory; writing is the trainer's (rank 0)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.run_json = self.path / "run.json"
        self.config = self.path / "config.yaml"
        self.steps = self.path / "steps.csv"
        self.summary = self.path / "summary.csv"
        self.result = self.path / "result.json"
        self.curves = self.path / "curves.png"
        self.tb = self.path / "tb"
        self.checkpoints = self.path / "checkpoints"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------------ reading

    def is_run(self) -> bool:
        return self.run_json.is_file()

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def run_id(self) -> str:
        return json.loads(self.run_json.read_text())["run_id"]

    def recorded_config(self) -> Dict[str, Any]:
        """The recipe the run was started with, as {section: {key: value}} (`config.from_dict` builds it)."""
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.config} is missing: {self.path} is not a training run")
        return yaml.safe_load(self.config.read_text())

    def checkpoint(self, tag: str) -> Path:
        return self.checkpoints / tag

    def tags(self) -> List[str]:
        """Every step<N> directory under checkpoints/, complete or not, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted((p.name for p in self.checkpoints.iterdir()
                       if p.is_dir() and p.name.startswith(TAG_PREFIX) and p.name[len(TAG_PREFIX):].isdigit()),
                      key=step_of)

    def latest(self) -> Optional[str]:
        """What `latest` says (None when it is missing), unchecked."""
        f = self.checkpoints / LATEST
        return f.read_text(errors="replace").strip() if f.is_file() else None

    def manifest(self, tag: str) -> Dict[str, Any]:
        return json.loads((self.checkpoint(tag) / MANIFEST).read_text())

    def check(self, tag: str, world_size: Optional[int] = None) -> Optional[str]:
        """None if checkpoint `tag` is complete and undamaged (and written by `world_size` ranks, if given), else
        what is wrong with it, naming the file."""
        ckpt = self.checkpoint(tag)
        if not ckpt.is_dir():
            return f"{ckpt} does not exist"
        try:
            manifest = self.manifest(tag)
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{ckpt / MANIFEST} is missing or unreadable: the save did not finish"
        for name, size in files.items():
            f = ckpt / name
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != size:
                return f"{f} is {f.stat().st_size} bytes, {size} when saved: truncated or overwritten"
            if f.suffix == ".pt" and not zipfile.is_zipfile(f):  # torch.save writes a zip; a damaged end is not one
                return f"{f} is damaged (not a readable torch file)"
        if world_size is not None and manifest["world_size"] != world_size:
            return (f"{ckpt} was saved by {manifest['world_size']} ranks, this run has {world_size}: resume with "
                    f"the same number of ranks (or export its weights and start a new run from them)")
        return None

    def latest_intact(self, world_size: Optional[int] = None) -> Tuple[Optional[str], List[str]]:
        """(the checkpoint to continue from, what was wrong with each one passed over): the one `latest` names if it
        is intact, else the newest intact one before it; without a usable `latest`, the newest intact one."""
        tags, latest, problems = self.tags(), self.latest(), []
        if latest in tags:
            candidates = [t for t in tags if step_of(t) <= step_of(latest)]
        else:
            if tags:
                problems.append(f"{self.checkpoints / LATEST} is missing" if latest is None else
                                f"{self.checkpoints / LATEST} names {latest[:40]!r}, which is not a checkpoint here")
            candidates = tags
        for tag in reversed(candidates):
            problem = self.check(tag, world_size)
            if problem is None:
                return tag, problems
            problems.append(problem)
        return None, problems

    def model_states(self, tag: str) -> Path:
        """Rank 0's model-states file, which holds the client state (and, below ZeRO-3, the whole module)."""
        for name in MODEL_STATES:
            if (self.checkpoint(tag) / name).is_file():
                return self.checkpoint(tag) / name
        raise CheckpointError(f"{self.checkpoint(tag)} is not a DeepSpeed checkpoint (no {' or '.join(MODEL_STATES)})")

    def sharded(self, tag: str) -> bool:
        """ZeRO-3: every rank saved a shard of each parameter (DeepSpeed's zero_to_fp32 consolidates them); below
        it, rank 0's model-states file holds the whole module."""
        return self.model_states(tag).name == MODEL_STATES[1]

    def client_state(self, tag: Optional[str] = None) -> Dict[str, Any]:
        """The state saved with checkpoint `tag` (default: the newest intact one): `ClientState` + DeepSpeed's keys."""
        tag = tag or self.require_intact()
        f = self.model_states(tag)
        try:
            return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001  torch raises assorted errors on damaged files
            raise CheckpointError(f"{f} cannot be read: {e}") from e

    def require_intact(self) -> str:
        """The newest intact checkpoint's tag, or an error saying why there is none."""
        tag, problems = self.latest_intact()
        if tag is None:
            why = "; ".join(problems) if problems else "none was saved"
            raise CheckpointError(f"{self.path} has no intact checkpoint ({why})")
        return tag

    # ------------------------------------------------------------------------------------------------ writing

    def create(self) -> str:
        """Start a new run here: the directory (if needed) and run.json with a fresh id."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex
        _write_atomic(self.run_json, json.dumps(dict(run_id=run_id)))
        return run_id

    def begin_checkpoint(self, tag: str) -> None:
        """Before a save into `tag`: a manifest left from an earlier save there would vouch for half-written files."""
        (self.checkpoint(tag) / MANIFEST).unlink(missing_ok=True)

    def commit_checkpoint(self, tag: str, run_id: str, world_size: int) -> None:
        """After every rank has saved into `tag`: record its files, then point `latest` at it."""
        ckpt = self.checkpoint(tag)
        files = {p.name: p.stat().st_size for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != MANIFEST}
        _write_atomic(ckpt / MANIFEST, json.dumps(dict(run_id=run_id, step=step_of(tag), world_size=world_size,
                                                       files=files), indent=1))
        self.set_latest(tag)

    def set_latest(self, tag: str) -> None:
        _write_atomic(self.checkpoints / LATEST, tag)

    def prune(self, run_id: str, keep_last: int) -> List[str]:
        """Delete this run's checkpoints but the newest `keep_last` and the one `latest` names; return their tags.
        Checkpoints of another run, or without a manifest, are not this run's to delete."""
        ours = []
        for tag in self.tags():
            try:
                if self.manifest(tag)["run_id"] == run_id:
                    ours.append(tag)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        latest = self.latest()
        doomed = [t for t in ours[:-keep_last] if t != latest]
        for tag in doomed:
            shutil.rmtree(self.checkpoint(tag))
        return doomed


def _write_atomic(path: Path, text: str) -> None:
    """Through a temporary file and a rename, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
