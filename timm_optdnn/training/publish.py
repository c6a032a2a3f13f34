"""Hub commands: publish a training run in timm's hub layout, and download pretrained tags for offline nodes.

    optdnn-hub publish <run dir | exported .safetensors> --out <folder>   # config.json, model.safetensors, README.md
    optdnn-hub download optdnn_gd_vit_s.fb_in1k                            # fill the caches, then load offline

A published folder loads with `timm.create_model("local-dir:<folder>", pretrained=True)` after `import timm_optdnn`
and, once pushed (`--push <org>/<name>`), with `"hf-hub:<org>/<name>"`.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from timm.models import load_state_dict, save_for_hf

from ..pretrained import WEIGHT_SUFFIXES, PretrainedWeightsError, check_weights, download, sha256_file
from .run_dir import CheckpointError, RunDir

PAPER = "doi:10.1109/TPAMI.2024.3380007"
CITATION = """@article{wu2024optdnn,
  title={Designing Universally-Approximating Deep Neural Networks: A First-Order Optimization Approach},
  author={Wu, Zhoutong and Xiao, Mingqing and Fang, Cong and Lin, Zhouchen},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2024},
  doi={10.1109/TPAMI.2024.3380007}
}"""
HERE = "<this folder>"  # the model card's stand-in for wherever the folder ends up
USAGE = """```python
import timm, timm_optdnn  # timm_optdnn registers the architecture
from PIL import Image

model = timm.create_model("local-dir:{folder}", pretrained=True).eval()  # or "hf-hub:<org>/<name>" once pushed
config = timm.data.resolve_input_data_config(model)
transform = timm.data.create_transform(**config)
image = Image.open("image.png").convert("RGB" if config["input_size"][0] == 3 else "L")  # grey images too
probs = model(transform(image).unsqueeze(0)).softmax(-1)
```
"""


def load_run(source: Union[str, Path], ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, what the run recorded about itself: model, model_args, recipe) from an exported weight file
    (safetensors / torch) or a DeepSpeed run / checkpoint directory (consolidated by `timm_optdnn.training.export`)."""
    source = Path(source)
    if source.is_dir():
        from .export import export_state_dict
        run = RunDir(source)
        state = run.client_state()
        return export_state_dict(source, ema=ema), dict(
            model=state.get("model"),
            model_args=dict(state.get("model_kwargs") or {}, num_classes=state["num_classes"]),
            recipe=run.config.read_text() if run.config.is_file() else None)
    check_weights(source, "publish")
    info = {}
    if source.suffix == ".safetensors":
        with safe_open(str(source), framework="pt") as f:
            info["model"] = (f.metadata() or {}).get("model")  # `timm_optdnn.training.export` records it
    return load_state_dict(str(source)), info


def model_card(model: torch.nn.Module, name: str, sha256: str, top1: Optional[float] = None,
               top5: Optional[float] = None, dataset: Optional[str] = None, gflops: Optional[float] = None,
               recipe: Optional[str] = None, notes: Optional[str] = None) -> str:
    """README.md in the format of timm's model cards. Only what the caller measured is stated; the rest says so."""
    cfg = model.pretrained_cfg
    unknown = "not measured"
    stats = [f"Params (M): {sum(p.numel() for p in model.parameters()) / 1e6:.3f}",
             f"GFLOPs: {gflops:.4g}" if gflops is not None else f"GFLOPs: {unknown}",
             f"Image size: {'x'.join(map(str, cfg['input_size'][1:]))}", f"Classes: {model.num_classes}"]
    details = {
        "Model Type": "Image classification / feature backbone",
        "Architecture": f"{cfg['architecture']} (OptDNN scheme '{model.blocks.scheme}')",
        "Model Stats": stats,
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
    lines = ["---", "tags:", "- image-classification", "- timm", "pipeline_tag: image-classification",
             "library_name: timm", f"license: {cfg.get('license') or 'apache-2.0'}",
             *(["datasets:", f"- {dataset.lower()}"] if dataset else []), "---",
             f"# Model card for {name}", "", notes or f"OptDNN model {name}, trained with timm-optdnn.", "",
             "## Model Details"]
    for k, v in details.items():
        lines += [f"- **{k}:**", *(f"  - {x}" for x in v)] if isinstance(v, list) else [f"- **{k}:** {v}"]
    lines += ["", "## Model Usage", USAGE.format(folder=HERE), "## Citation", f"```bibtex\n{CITATION}\n```", "",
              "## Training recipe", f"```yaml\n{recipe.rstrip()}\n```" if recipe else "not recorded", ""]
    return "\n".join(lines)


def publish(source: Union[str, Path], out: Union[str, Path], model_name: Optional[str] = None,
            model_args: Optional[Dict[str, Any]] = None, data_config: Optional[Dict[str, Any]] = None,
            label_names: Optional[Sequence[str]] = None, hash_name: bool = False, card_name: Optional[str] = None,
            ema: bool = False, recipe: Optional[str] = None, overwrite: bool = False, **card: Any) -> Path:
    """Write `out/` = config.json + model.safetensors (timm's `save_for_hf`) + README.md; returns the weight file.

    Model name, its kwargs and the recipe default to what the run recorded; explicit ones win. The state dict
    must fit `model_name(**model_args)` exactly (strict load), so a published folder always rebuilds the trained
    network. `hash_name` names the weights `model-<sha256>.safetensors`, the form a `file` / `url` cfg checks.

    A folder that already holds files is refused unless `overwrite`, and then only the three files are replaced;
    nothing else in it is touched. Everything is written to a temporary folder first and moved in at the end, so
    a failure leaves `out` as it was.
    """
    import timm
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    old = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"--out {out} is not empty ({', '.join(old)}): pass --overwrite to replace its "
                              f"config.json, README.md and weights, or choose an empty folder")
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

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        # the tag is the card name's (`<arch>.<tag>`), not that of the cfg the model was built with
        config = dict(pretrained_cfg=dict(tag=(card_name or "").partition(".")[2] or None))
        if label_names:
            config["label_names"] = list(label_names)
        save_for_hf(model.eval(), tmp, model_config=config, data_config=data_config, safe_serialization=True)
        weights = tmp / "model.safetensors"
        weights.chmod(0o644)  # safetensors writes 0600: a shipped / uploaded file must be readable by all
        sha = sha256_file(weights)
        if hash_name:
            weights = weights.rename(tmp / f"model-{sha}.safetensors")
        card = model_card(model, card_name or model_name, sha, recipe=recipe or info.get("recipe"), **card)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        others = [n for n in old if Path(n).suffix in WEIGHT_SUFFIXES and n != weights.name]
        if others:  # two weight files would leave which one loads to chance
            raise FileExistsError(f"--out {out} holds other weights ({', '.join(others)}) that publishing would "
                                  f"not replace: move them away first")
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / weights.name


def push(out: Union[str, Path], repo_id: str, private: bool = False) -> str:
    """Upload a published folder as is (what was checked locally is what lands on the hub)."""
    from huggingface_hub import HfApi
    api = HfApi(library_name="timm")
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(out), commit_message="Add OptDNN weights")
    return repo_id


def load_command(out: Union[str, Path]) -> str:
    """The line that loads a published folder, as `publish` prints it."""
    return f"model = timm.create_model('local-dir:{Path(out).resolve()}', pretrained=True)"


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


def cached_location(model: torch.nn.Module) -> str:
    """Where the weights `download` loaded sit now, for the user to copy or point the offline nodes at."""
    cfg = model.pretrained_cfg
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants, try_to_load_from_cache
        path = try_to_load_from_cache(cfg["hf_hub_id"], "model.safetensors")
        where = path if isinstance(path, str) else f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        return f"hf-hub:{cfg['hf_hub_id']} -> {where}"
    return f"{cfg['file']} (sha256 {sha256_file(cfg['file'])})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optdnn-hub", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("publish", help="run / checkpoint -> hub folder (config.json, model.safetensors, README.md)")
    pp.add_argument("source", help="exported state dict (.safetensors / .pth) or DeepSpeed run / checkpoint folder")
    pp.add_argument("--out", required=True, help="output folder (must be empty or new, unless --overwrite)")
    pp.add_argument("--overwrite", action="store_true",
                    help="replace config.json, README.md and the weights in a non-empty --out (nothing else)")
    pp.add_argument("--model", help="registered architecture (default: the one the run / export recorded)")
    pp.add_argument("--model-args", nargs="*", default=[], metavar="K=V",
                    help="create_model kwargs, e.g. dim=64 (default: those the run recorded)")
    pp.add_argument("--ema", action="store_true", help="publish a DeepSpeed run's EMA weights")
    pp.add_argument("--name", help="name in the model card (e.g. <arch>.<tag>); default: --model")
    pp.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                    help="input size the weights expect (default: the model's pretrained cfg)")
    pp.add_argument("--mean", type=float, nargs="+", help="normalisation mean, one value or one per channel")
    pp.add_argument("--std", type=float, nargs="+", help="normalisation std, one value or one per channel")
    pp.add_argument("--crop-pct", type=float, help="evaluation center-crop fraction (timm's crop_pct)")
    pp.add_argument("--interpolation", help="resize interpolation, e.g. bicubic or bilinear")
    pp.add_argument("--label-names", help="comma-separated class names, in class-index order")
    pp.add_argument("--top1", type=float, help="measured top-1 %% (stated in the card; omitted = 'not measured')")
    pp.add_argument("--top5", type=float, help="measured top-5 %% (stated in the card; omitted = 'not measured')")
    pp.add_argument("--dataset", help="evaluation dataset and split, e.g. 'Fashion-MNIST test (10k)'")
    pp.add_argument("--gflops", type=float, help="GFLOPs per image at the input size, from optdnn-flops")
    pp.add_argument("--recipe", type=Path, help="training recipe (YAML) for the card (default: the run's config.yaml)")
    pp.add_argument("--notes", help="description paragraph for the card")
    pp.add_argument("--hash-name", action="store_true", help="name the weights model-<sha256>.safetensors")
    pp.add_argument("--push", metavar="ORG/NAME", help="upload the folder to the Hugging Face hub (needs a token)")
    dp = sub.add_parser("download", help="load pretrained tags once, filling torch.hub's / huggingface_hub's caches")
    dp.add_argument("tags", nargs="+", metavar="TAG", help="pretrained tags, e.g. optdnn_gd_vit_s.fb_in1k "
                                                           "(all: python -c \"import timm, timm_optdnn; "
                                                           "print(timm.list_pretrained('optdnn*'))\")")
    return p


def run_publish(a: argparse.Namespace) -> None:
    data_config = {k: v for k, v in dict(input_size=a.input_size, mean=a.mean, std=a.std, crop_pct=a.crop_pct,
                                         interpolation=a.interpolation).items() if v is not None}
    if a.recipe and not a.recipe.is_file():
        raise SystemExit(f"--recipe {a.recipe}: no such file")
    import timm_optdnn  # noqa: F401  registers the architectures
    weights = publish(a.source, a.out, a.model, _kv(a.model_args), data_config or None,
                      a.label_names.split(",") if a.label_names else None, a.hash_name, a.name, a.ema,
                      recipe=a.recipe.read_text() if a.recipe else None, overwrite=a.overwrite,
                      top1=a.top1, top5=a.top5, dataset=a.dataset, gflops=a.gflops, notes=a.notes)
    print(f"published {a.out}: {weights.name} sha256 {sha256_file(weights)}")
    print(f"load with:\nimport timm, timm_optdnn\n{load_command(a.out)}")
    if a.push:
        print(f"pushed to https://huggingface.co/{push(a.out, a.push)}")


def run_download(tags: List[str]) -> None:
    import timm
    import timm_optdnn  # noqa: F401  registers the architectures
    for tag in tags:
        if tag not in timm.list_pretrained("optdnn*"):
            raise SystemExit(f"error: {tag} is no pretrained tag; those with weights: "
                             f"{', '.join(timm.list_pretrained('optdnn*'))}")
        print(f"{tag}: {cached_location(download(tag))}")
    print("offline nodes: the same TORCH_HOME and HF_HOME (or copies of these caches), and HF_HUB_OFFLINE=1")


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = build_parser().parse_args(argv)
    try:
        run_publish(a) if a.cmd == "publish" else run_download(a.tags)
    except (PretrainedWeightsError, CheckpointError, ValueError, OSError) as e:  # bad inputs, files, no network
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
