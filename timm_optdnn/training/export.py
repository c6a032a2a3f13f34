"""DeepSpeed checkpoint -> plain timm state dict in safetensors.

    python -m timm_optdnn.training.export runs/demo/optdnn_apg2_convnext_iso_fm model.safetensors [--tag stepN] [--ema]

Accepts a run directory (uses <run>/checkpoints/latest) or a checkpoints directory. ZeRO 1-3 shards are
consolidated to fp32 by DeepSpeed's own zero_to_fp32; a ZeRO-0 checkpoint holds the full module already.
The result loads with
    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file="model.safetensors"))
"""
import argparse
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

PathLike = Union[str, Path]


def checkpoint_dir(source: PathLike, tag: Optional[str] = None) -> Tuple[Path, str]:
    """(checkpoints dir, tag) for a run dir or a checkpoints dir; tag defaults to the one named in 'latest'."""
    source = Path(source)
    root = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{source}: no 'latest' file, so no complete checkpoint (pass --tag to pick one)")
        tag = latest.read_text().strip()
    _model_states(root / tag)
    return root, tag


def _model_states(ckpt: Path) -> Path:
    """Rank 0's model-states file (with the client state): ZeRO-3 writes one per rank, the other stages one."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (ckpt / name).is_file():
            return ckpt / name
    raise FileNotFoundError(f"{ckpt} is not a DeepSpeed checkpoint (no mp_rank_00_model_states.pt, nor ZeRO-3's "
                            f"zero_pp_rank_0_mp_rank_00_model_states.pt)")


def client_state(source: PathLike, tag: Optional[str] = None) -> dict:
    """The trainer's client state saved with the checkpoint (epoch, model name and kwargs, EMA, history)."""
    root, tag = checkpoint_dir(source, tag)
    return torch.load(_model_states(root / tag), map_location="cpu", weights_only=False)


def export_state_dict(source: PathLike, tag: Optional[str] = None, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The fp32 model (or its EMA) state dict of a DeepSpeed checkpoint, with timm's key names."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    root, tag = checkpoint_dir(source, tag)
    if ema:
        state = client_state(root, tag).get("ema")
        if state is None:
            raise ValueError(f"{root / tag} has no EMA weights (trained with ema=false)")
    elif any((root / tag).glob("*zero_pp_rank_*_optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:  # ZeRO-0: the module states are complete (in the training precision)
        state = client_state(root, tag)["module"]
    return {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.contiguous().clone()
            for k, v in state.items()}


def export(source: PathLike, out: PathLike, tag: Optional[str] = None, ema: bool = False) -> Path:
    """Write the checkpoint's weights to `out` (.safetensors), with the model name in the file's metadata."""
    from safetensors.torch import save_file
    meta = client_state(source, tag)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(export_state_dict(source, tag, ema), str(out),
              metadata={"format": "pt", "model": str(meta.get("model")), "ema": str(ema),
                        "global_steps": str(meta.get("global_steps"))})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run dir or its checkpoints/ dir")
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--tag", help="checkpoint tag (default: latest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    a = p.parse_args(argv)
    path = export(a.source, a.out, a.tag, a.ema)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
