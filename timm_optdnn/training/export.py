"""DeepSpeed checkpoint -> plain timm state dict in safetensors.

    python -m timm_optdnn.training.export runs/demo/optdnn_apg2_convnext_iso_fm model.safetensors [--tag stepN] [--ema]

Takes a run directory; the checkpoint is the newest intact one (`latest`, or the one before it if that is damaged)
unless --tag names one, and is checked against its manifest first. Below ZeRO-3 the checkpoint holds the whole
module, in fp32 (the trainer keeps the module fp32 in every precision): it is the state dict. ZeRO-3 shards are
consolidated to fp32 by DeepSpeed's own zero_to_fp32. The result loads with
    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="model.safetensors"))
"""
import argparse
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .run_dir import CheckpointError, RunDir

PathLike = Union[str, Path]


def checkpoint(source: PathLike, tag: Optional[str] = None) -> Tuple[RunDir, str]:
    """(the run, the checkpoint's tag): `tag` if given and intact, else the newest intact one."""
    run = RunDir(source)
    if tag is None:
        return run, run.require_intact()
    problem = run.check(tag)
    if problem is not None:
        raise CheckpointError(problem)
    return run, tag


def export_state_dict(source: PathLike, tag: Optional[str] = None, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The fp32 model (or its EMA) state dict of a run's checkpoint, with timm's key names."""
    run, tag = checkpoint(source, tag)
    if ema:
        state = run.client_state(tag).get("ema")
        if state is None:
            raise CheckpointError(f"{run.checkpoint(tag)} has no EMA weights (trained with model.ema=false)")
    elif run.sharded(tag):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(run.checkpoints), tag=tag)
    else:
        state = run.client_state(tag)["module"]
    return {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.contiguous().clone()
            for k, v in state.items()}


def export(source: PathLike, out: PathLike, tag: Optional[str] = None, ema: bool = False) -> Path:
    """Write the checkpoint's weights to `out` (.safetensors), with the model name in the file's metadata."""
    from safetensors.torch import save_file
    run, tag = checkpoint(source, tag)
    meta = run.client_state(tag)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(export_state_dict(run.path, tag, ema), str(out),
              metadata={"format": "pt", "model": str(meta["model"]), "ema": str(ema),
                        "global_steps": str(meta.get("global_steps"))})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run directory (the trainer's run.out_dir)")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--tag", help="checkpoint tag (default: the newest intact one)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    a = p.parse_args(argv)
    try:
        path = export(a.source, a.out, a.tag, a.ema)
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
