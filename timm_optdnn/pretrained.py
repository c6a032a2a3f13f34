"""Pretrained weights: checked before timm loads them, fetched with torch.hub, and the weights shipped in the package.

Loading is timm's (`pretrained=True`, `local-dir:`, `hf-hub:`, `pretrained_cfg_overlay=dict(file=...)`). The model
builders pass their kwargs through `verified_pretrained` first, which adds what timm leaves out:

* a weight file (a `file`, the weight file of a `local-dir:` folder, a downloaded `url`) is checked before timm reads
  it: that it exists, is not empty, is a complete safetensors or torch checkpoint, and has the sha256 its name
  promises where it names one (torch.hub's `<name>-<sha256 prefix>.<ext>` convention). Each failure is one
  `PretrainedWeightsError` naming the model, the file and what is wrong.
* a `url` is fetched with `torch.hub.download_url_to_file` (a temporary file, moved into torch.hub's cache only when
  complete and, with a hash in its name, only when the hash matches), checked, and handed to timm as a `file`. A
  cached file that fails the check is fetched again.
* `hf-hub` weights are timm's and huggingface_hub's business: huggingface_hub checks each file's size against the
  Hub's record and caches it under the Hub's ETag (a weight file's sha256).

`download(name)` runs the same load once to fill the caches for nodes without network. Publishing a training run in
the hub layout is the trainer's business (`timm_optdnn.training.publish`).
"""
import dataclasses
import hashlib
import json
import logging
import os
import re
import urllib.parse
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors import safe_open
from timm.models import PretrainedCfg, resolve_pretrained_cfg

_logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
WEIGHTS_DIR = Path(__file__).parent / "weights"  # weights shipped with the package (package-data)
HASH_RE = re.compile(r"-([0-9a-f]{8,64})\.[a-z]+$")  # torch.hub's convention, at least 8 hex digits
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be fetched or read; the message names the model, the file and what is wrong."""


def expected_sha256(location: str) -> Optional[str]:
    """The sha256 (or prefix) a weight location promises in its file name, None if it names none."""
    m = HASH_RE.search(os.path.basename(urllib.parse.urlparse(str(location)).path))
    return m.group(1) if m else None


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _reason(e: BaseException) -> str:
    """One line from an exception. torch's weights-only unpickler opens with a page of advice: its own line says
    what it met."""
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:
        text = "unpickling: " + text.split("WeightsUnpickler error:", 1)[1].strip()
    return (text.splitlines() or [type(e).__name__])[0]


def check_weights(path: PathLike, name: str) -> Path:
    """`path` if it is a complete checkpoint with the sha256 its name promises; else a PretrainedWeightsError."""
    path = Path(path)

    def fail(what: str) -> PretrainedWeightsError:
        return PretrainedWeightsError(f"{name}: weight file {path} {what}")

    if not path.exists():
        raise fail("does not exist")
    if not path.is_file():
        raise fail("is not a file")
    if path.stat().st_size == 0:
        raise fail("is empty (0 bytes)")
    if (want := expected_sha256(path.name)) and not (got := sha256_file(path)).startswith(want):
        raise fail(f"has sha256 {got}, but its name promises {want} (a corrupt or replaced file)")
    if path.suffix == ".safetensors":
        try:  # the header lists every tensor's byte range: a cut-off file fails here
            with safe_open(str(path), framework="pt") as f:
                n = len(list(f.keys()))
        except Exception as e:  # safetensors raises several types for a bad header
            raise fail(f"is not a complete safetensors file ({_reason(e)})") from e
    else:
        try:  # a zip checkpoint is mapped: its directory and pickle are read, not the tensor data
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:
            raise fail(f"is not a complete torch checkpoint ({_reason(e)})") from e
        n = len(state) if isinstance(state, dict) else 0
    if n == 0:
        raise fail("holds no tensors")
    return path


def weights_in(folder: PathLike, name: str) -> Path:
    """The weight file of a hub-layout folder: model.safetensors, else the folder's only weight file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PretrainedWeightsError(f"{name}: {folder} is not a folder")
    if (folder / "model.safetensors").is_file():
        return folder / "model.safetensors"
    found = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        raise PretrainedWeightsError(
            f"{name}: {folder} holds {len(found)} weight files ({', '.join(p.name for p in found) or 'none'}); "
            f"expected model.safetensors or exactly one *{'/*'.join(WEIGHT_SUFFIXES)}")
    return found[0]


def fetch(url: str, name: str, cache_dir: Optional[PathLike] = None, progress: bool = True) -> Path:
    """`url` in torch.hub's cache (or `cache_dir`), checked; a cached copy that fails the check is fetched again."""
    cache = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    dst = cache / os.path.basename(urllib.parse.urlparse(url).path)
    if dst.exists():
        try:
            return check_weights(dst, name)
        except PretrainedWeightsError as e:
            _logger.warning(f"{e}; fetching {url} again")
            dst.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    try:  # a temporary file, moved to dst only once complete (and, for a hashed name, once the hash matches)
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=expected_sha256(url), progress=progress)
    except Exception as e:  # urllib's HTTP / connection errors, torch.hub's hash mismatch
        raise PretrainedWeightsError(f"{name}: download of {url} failed ({_reason(e)})") from e
    try:
        return check_weights(dst, name)
    except PretrainedWeightsError as e:
        dst.unlink()  # what was fetched is no checkpoint (an error page, a cut-off transfer): not a cache entry
        raise PretrainedWeightsError(f"{e}, as downloaded from {url}") from e


def verified_pretrained(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Model-builder hook: check (and for a `url`, fetch) the weight file timm will load; returns the kwargs for
    `build_model_with_cfg`, pointing timm at the checked file.

    The source is timm's, in timm's order: a `local-dir:` folder, an in-memory state dict, a `file`, an `hf_hub_id`
    (left to timm and huggingface_hub), a `url`.
    """
    if not pretrained:
        return kwargs
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg: PretrainedCfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay)
    own_source = any(overlay.get(k) for k in ("file", "url", "hf_hub_id"))  # then the tag's weights are not loaded
    name = f"{variant}.{cfg.tag}" if cfg.tag and not own_source else variant
    if cfg.source == "hf-hub" or cfg.state_dict is not None:
        return kwargs
    if cfg.source == "local-dir":  # timm would pick a file in the folder itself: name it, so the checked one loads
        file = check_weights(weights_in(cfg.file, name), name)
        return dict(kwargs, pretrained_cfg=dict(dataclasses.asdict(cfg), source=None, file=str(file)))
    if cfg.file:
        check_weights(cfg.file, name)
    elif cfg.url and not cfg.hf_hub_id:
        file = fetch(cfg.url, name, kwargs.get("cache_dir"))
        return dict(kwargs, pretrained_cfg_overlay=dict(overlay, file=str(file)))
    return kwargs


def download(name: str, **kwargs: Any) -> torch.nn.Module:
    """Load pretrained tag `name` once, as `timm.create_model(name, pretrained=True)` will later, so that its
    weights sit in torch.hub's or huggingface_hub's cache for nodes without network. Returns the loaded model."""
    import timm
    return timm.create_model(name, pretrained=True, **kwargs)


def shipped(tag: str, sha256: str) -> Dict[str, Any]:
    """Pretrained cfg entries for weights shipped in `timm_optdnn/weights/<tag>/`: the weight file (its sha256 in its
    name, checked before it loads) and the class names its config.json records."""
    folder = WEIGHTS_DIR / tag
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return dict(file=str(folder / f"model-{sha256}.safetensors"), label_names=tuple(config["label_names"]))
