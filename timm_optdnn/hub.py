"""Pretrained weights: verified download + cache, shipped weights, and publishing runs in timm's hub layout.

Loading goes through timm's own machinery (`pretrained=True`, `hf-hub:`, `local-dir:`); this module only
adds what timm lacks for these models:

* a verified download for `url` weights: progress bar, cache reuse, sha256 check, and errors that name the
  model and the location. timm's PretrainedCfg has no sha256 field (and `local-dir:` configs reject unknown
  keys), so the hash rides in the weight file's name, torch.hub's `check_hash` convention:
  `<name>-<sha256 or a prefix of at least 8 hex digits>.safetensors`. Weights shipped inside the package
  (a `file` with a hash in its name) are verified the same way before they load.
* `python -m timm_optdnn.hub publish <checkpoint> --out <dir> [--push <org/name>]`: a run or an exported
  state dict -> timm's `save_for_hf` folder (config.json + model.safetensors) plus a model card, loadable with
  `timm.create_model("local-dir:<dir>")` (after `import timm_optdnn`) and, once pushed, `hf-hub:<org/name>`.
"""
import argparse
import hashlib
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from timm.models import load_state_dict
from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
from timm.models._hub import generate_readme, get_cache_dir, save_for_hf
from tqdm import tqdm

_logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"  # weights shipped with the package (package-data)
HASH_RE = re.compile(r"-([0-9a-f]{8,64})\.safetensors$")
PAPER = "doi:10.1109/TPAMI.2024.3380007"
CITATION = """@article{wu2024optdnn,
  title={Designing Universally-Approximating Deep Neural Networks: A First-Order Optimization Approach},
  author={Wu, Zhoutong and Xiao, Mingqing and Fang, Cong and Lin, Zhouchen},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2024},
  doi={10.1109/TPAMI.2024.3380007}
}"""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be fetched or verified; the message names the model and the location."""


def expected_sha256(location: str) -> Optional[str]:
    """The sha256 (or prefix) a weight location promises in its file name, None if it names none."""
    m = HASH_RE.search(os.path.basename(urllib.parse.urlparse(str(location)).path))
    return m.group(1) if m else None


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_checkpoint(path: Union[str, Path], name: str, location: str) -> None:
    """Fail, naming `name` and `location`, unless `path` is a safetensors file holding tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            n = len(list(f.keys()))
    except Exception as e:  # safetensors raises several error types for a bad header
        raise PretrainedWeightsError(f"{name}: {location} is not a safetensors checkpoint ({e})") from e
    if n == 0:
        raise PretrainedWeightsError(f"{name}: {location} holds no tensors")


def verify_file(path: Union[str, Path], name: str, want: Optional[str] = None) -> None:
    """Check a local weight file against the sha256 its name promises (or `want`), and that it is a checkpoint."""
    want = want or expected_sha256(str(path))
    if not Path(path).is_file():
        raise PretrainedWeightsError(f"{name}: weight file {path} does not exist")
    if want and not (got := sha256_file(path)).startswith(want):
        raise PretrainedWeightsError(f"{name}: {path} has sha256 {got}, expected {want} (corrupt or replaced file)")
    check_checkpoint(path, name, str(path))


def download_weights(url: str, name: str, cache_dir: Optional[Union[str, Path]] = None,
                     progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch `url` into the cache (timm's, i.e. $TORCH_HOME/hub/checkpoints, unless `cache_dir`), verified.

    A cached file whose sha256 matches is reused with no network access. The download streams into a
    temporary file that only replaces the cache entry once its length, sha256 and format check out, so a
    failed or corrupt download never becomes a cache entry.
    """
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    want = expected_sha256(url)
    if not want:
        raise PretrainedWeightsError(
            f"{name}: {url} names no sha256; url weights must be '<name>-<sha256>.safetensors' "
            f"(run `python -m timm_optdnn.hub publish --hash-name` to produce one)")
    cache = Path(cache_dir) if cache_dir else Path(get_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / filename
    if dst.exists():
        if sha256_file(dst).startswith(want):
            return dst
        _logger.warning(f"{name}: cached {dst} fails its sha256 check, downloading it again")
        dst.unlink()
    tmp = cache / f".{filename}.{os.getpid()}.part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f, \
                tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     desc=name, disable=not progress) as bar:
            h, n = hashlib.sha256(), 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                n += len(chunk)
                bar.update(len(chunk))
        if bar.total and n != bar.total:
            raise PretrainedWeightsError(f"{name}: download of {url} truncated, {n} of {bar.total} bytes arrived")
        if not (got := h.hexdigest()).startswith(want):
            raise PretrainedWeightsError(f"{name}: {url} has sha256 {got}, expected {want} ({n} bytes)")
        check_checkpoint(tmp, name, url)
        os.replace(tmp, dst)
    except urllib.error.HTTPError as e:
        raise PretrainedWeightsError(f"{name}: {url} answered HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise PretrainedWeightsError(f"{name}: cannot reach {url} ({e.reason})") from e
    except (OSError, http.client.HTTPException) as e:  # reset, timeout, incomplete chunked read
        raise PretrainedWeightsError(f"{name}: download of {url} failed ({e!r})") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def verified_pretrained(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Model-builder hook: resolve `pretrained=True` the way timm will, and verify what it would load.

    A `url` source is downloaded with `download_weights` and handed to timm as a local `file`; a `file`
    whose name carries a sha256 (the shipped weights) is checked in place. Other sources (an explicit
    state dict, `hf-hub:` whose files HF verifies itself, `local-dir:`) pass through unchanged.
    """
    if not pretrained:
        return kwargs
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    name = f"{variant}.{cfg.tag}" if cfg.tag else variant
    load_from, location = _resolve_pretrained_source(cfg.to_dict())
    if load_from == "url":
        path = download_weights(location, name, kwargs.get("cache_dir"))
        overlay = dict(kwargs.get("pretrained_cfg_overlay") or {}, file=str(path))
        return dict(kwargs, pretrained_cfg_overlay=overlay)
    if load_from == "file" and expected_sha256(location):
        verify_file(location, name)
    return kwargs


def shipped(filename: str) -> str:
    """Path of a weight file shipped in `timm_optdnn/weights/`, for a pretrained cfg's `file`."""
    return str(WEIGHTS_DIR / filename)


# ---------------------------------------------------------------------------------------------- publish

def load_run(source: Union[str, Path], ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, what the run recorded about itself: model, model_args, recipe) from an exported weight
    file (safetensors / torch) or a DeepSpeed run / checkpoint directory (consolidated by `timm_optdnn.export`)."""
    source = Path(source)
    if source.is_file():
        info = {}
        if source.suffix == ".safetensors":
            with safe_open(str(source), framework="pt") as f:
                info["model"] = (f.metadata() or {}).get("model")  # `timm_optdnn.export` records it
        return load_state_dict(str(source)), info
    if source.is_dir():
        from timm_optdnn.export import client_state, export_state_dict
        state = client_state(source)
        recipe = source / "config.yaml"  # the trainer saves the effective config in the run dir
        return export_state_dict(source, ema=ema), dict(
            model=state.get("model"), model_args=dict(state.get("model_kwargs") or {}, num_classes=state["num_classes"]),
            recipe=recipe.read_text() if recipe.is_file() else None)
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
    p = argparse.ArgumentParser(prog="python -m timm_optdnn.hub", description=__doc__.split("\n\n")[0])
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
