"""Publish a training run in timm's hub layout.

`python -m timm_optdnn.training.publish publish <checkpoint> --out <dir> [--push <org/name>]`: a run or an exported
state dict -> timm's `save_for_hf` folder (config.json + model.safetensors) plus a model card, loadable with
`timm.create_model("local-dir:<dir>")` (after `import timm_optdnn`) and, once pushed, `hf-hub:<org/name>`.
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from timm.models import load_state_dict
from timm.models._hub import generate_readme, save_for_hf

from ..pretrained import sha256_file

PAPER = "doi:10.1109/TPAMI.2024.3380007"
CITATION = """@article{wu2024optdnn,
  title={Designing Universally-Approximating Deep Neural Networks: A First-Order Optimization Approach},
  author={Wu, Zhoutong and Xiao, Mingqing and Fang, Cong and Lin, Zhouchen},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2024},
  doi={10.1109/TPAMI.2024.3380007}
}"""

def load_run(source: Union[str, Path], ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, what the run recorded about itself: model, model_args, recipe) from an exported weight
    file (safetensors / torch) or a DeepSpeed run / checkpoint directory (consolidated by `timm_optdnn.training.export`)."""
    source = Path(source)
    if source.is_file():
        info = {}
        if source.suffix == ".safetensors":
            with safe_open(str(source), framework="pt") as f:
                info["model"] = (f.metadata() or {}).get("model")  # `timm_optdnn.training.export` records it
        return load_state_dict(str(source)), info
    if source.is_dir():
        from .export import export_state_dict
        from .run_dir import RunDir
        run = RunDir(source)
        state = run.client_state()
        return export_state_dict(source, ema=ema), dict(
            model=state.get("model"), model_args=dict(state.get("model_kwargs") or {}, num_classes=state["num_classes"]),
            recipe=run.config.read_text() if run.config.is_file() else None)
    raise FileNotFoundError(f"no checkpoint at {source}")


def model_card(model: torch.nn.Module, name: str, sha256: str, top1: Optional[float] = None,
               top5: Optional[float] = None, dataset: Optional[str] = None, gflops: Optional[float] = None,
               recipe: Optional[str] = None, notes: Optional[str] = None) -> str:
    """README.md in timm's card format. Only what the caller measured is stated; the rest says so."""
    cfg = model.pretrained_cfg
    unknown = "not measured"
    details = {
        "Model Type": "Image classification / feature backbone",
        "Architecture": f"{cfg['architecture']} (OptDNN scheme '{model.blocks.scheme}')",
        "Model Stats": {
            "Params (M)": f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}",
            "GFLOPs": f"{gflops:.4g}" if gflops is not None else unknown,
            "Image size": "x".join(map(str, model.pretrained_cfg["input_size"][1:])),
            "Classes": model.num_classes,
        },
        "Top-1 accuracy (%)": f"{top1:.2f}" if top1 is not None else unknown,
        "Top-5 accuracy (%)": f"{top5:.2f}" if top5 is not None else unknown,
        "Weights sha256": sha256,
        "Papers": ["Designing Universally-Approximating Deep Neural Networks: A First-Order Optimization "
                   f"Approach, {PAPER}"],
    }
    if dataset:
        details["Dataset"] = dataset
    if coefs := model.scheme_coefficients():
        details["Learned scheme coefficients"] = ", ".join(f"{c:.4f}" for c in coefs)
    card = {
        "license": cfg.get("license") or "apache-2.0",
        "details": details,
        "description": notes or f"OptDNN model {name}, trained with timm-optdnn.",
        "usage": ("```python\nimport timm, timm_optdnn  # timm_optdnn registers the architecture\n"
                  f"model = timm.create_model('hf-hub:<org>/{name}')  # or 'local-dir:<this folder>'\n```\n"),
        "citation": CITATION,
    }
    text = generate_readme(card, name)
    return text + (f"\n## Training recipe\n```yaml\n{recipe.rstrip()}\n```\n" if recipe else
                   "\n## Training recipe\nnot recorded\n")


def publish(source: Union[str, Path], out: Union[str, Path], model_name: Optional[str] = None,
            model_args: Optional[Dict[str, Any]] = None, data_config: Optional[Dict[str, Any]] = None,
            label_names: Optional[Sequence[str]] = None, hash_name: bool = False, card_name: Optional[str] = None,
            ema: bool = False, recipe: Optional[str] = None, **card: Any) -> Path:
    """Write `out/` = config.json + model.safetensors (timm's `save_for_hf`) + README.md; returns the weight file.

    Model name, its kwargs and the recipe default to what the run recorded; explicit ones win. The state dict
    must fit `model_name(**model_args)` exactly (strict load), so a published folder always rebuilds the trained
    network. `hash_name` names the weights `model-<sha256>.safetensors`, the form a `url` / shipped `file` cfg
    verifies (`local-dir:` loads either name).
    """
    import timm
    state, info = load_run(source, ema)
    model_name = model_name or info.get("model")
    if not model_name or model_name == "None":
        raise ValueError(f"{source} does not record its model: pass --model")
    model_args = {**info.get("model_args", {}), **(model_args or {})}
    model = timm.create_model(model_name, pretrained=False, **model_args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source} does not fit {model_name}({model_args}): {e}") from e
    out = Path(out)
    for old in out.glob("*.safetensors"):  # republishing: exactly one weight file
        old.unlink()
    save_for_hf(model.eval(), out, model_config=dict(label_names=list(label_names)) if label_names else None,
                data_config=data_config, safe_serialization=True)
    weights = out / "model.safetensors"
    weights.chmod(0o644)  # safetensors writes 0600: a shipped / uploaded file must be readable by all
    sha = sha256_file(weights)
    if hash_name:
        weights = weights.rename(out / f"model-{sha}.safetensors")
    card = model_card(model, card_name or model_name, sha, recipe=recipe or info.get("recipe"), **card)
    (out / "README.md").write_text(card, encoding="utf-8")
    return weights


def push(out: Union[str, Path], repo_id: str, private: bool = False) -> str:
    """Upload a published folder as is (what was verified locally is what lands on the hub)."""
    from huggingface_hub import HfApi
    api = HfApi(library_name="timm")
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(out), commit_message="Add OptDNN weights")
    return repo_id


def _kv(items: Sequence[str]) -> Dict[str, Any]:
    """`key=value` strings -> dict, values parsed as JSON when they parse (numbers, lists, bools)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--model-args expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m timm_optdnn.training.publish", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("publish", help="run / checkpoint -> hub folder (config.json, model.safetensors, README.md)")
    pp.add_argument("source", help="exported state dict (.safetensors/.pth) or DeepSpeed checkpoint directory")
    pp.add_argument("--out", required=True, help="output folder")
    pp.add_argument("--model", help="registered architecture (default: the one the run / export recorded)")
    pp.add_argument("--model-args", nargs="*", default=[], metavar="K=V",
                    help="create_model kwargs, e.g. dim=64 (default: those the run recorded)")
    pp.add_argument("--ema", action="store_true", help="publish a DeepSpeed run's EMA weights")
    pp.add_argument("--name", help="name in the model card (e.g. <arch>.<tag>); default: --model")
    pp.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    pp.add_argument("--mean", type=float, nargs="+")
    pp.add_argument("--std", type=float, nargs="+")
    pp.add_argument("--crop-pct", type=float)
    pp.add_argument("--interpolation")
    pp.add_argument("--label-names", help="comma-separated class names")
    pp.add_argument("--top1", type=float, help="measured top-1 %% (stated in the card; omitted = 'not measured')")
    pp.add_argument("--top5", type=float)
    pp.add_argument("--dataset", help="evaluation dataset and split, e.g. 'Fashion-MNIST test (10k)'")
    pp.add_argument("--gflops", type=float, help="measured GFLOPs per image at the input size")
    pp.add_argument("--recipe", type=Path, help="training recipe (YAML) for the card (default: the run's config.yaml)")
    pp.add_argument("--notes", help="description paragraph for the card")
    pp.add_argument("--hash-name", action="store_true", help="name the weights model-<sha256>.safetensors")
    pp.add_argument("--push", metavar="ORG/NAME", help="upload the folder to the Hugging Face hub")
    a = p.parse_args(argv)

    data_config = {k: v for k, v in dict(input_size=a.input_size, mean=a.mean, std=a.std, crop_pct=a.crop_pct,
                                         interpolation=a.interpolation).items() if v is not None}
    if a.recipe and not a.recipe.is_file():
        raise SystemExit(f"--recipe {a.recipe}: no such file")
    import timm_optdnn  # noqa: F401  registers the architectures
    weights = publish(a.source, a.out, a.model, _kv(a.model_args), data_config or None,
                      a.label_names.split(",") if a.label_names else None, a.hash_name, a.name, a.ema,
                      top1=a.top1, top5=a.top5, dataset=a.dataset, gflops=a.gflops,
                      recipe=a.recipe.read_text() if a.recipe else None, notes=a.notes)
    print(f"published {a.out}: {weights.name} sha256 {sha256_file(weights)}")
    print(f"load with: timm.create_model('local-dir:{Path(a.out).resolve()}') after `import timm_optdnn`")
    if a.push:
        print(f"pushed to https://huggingface.co/{push(a.out, a.push)}")


if __name__ == "__main__":
    main()
