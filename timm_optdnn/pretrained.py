"""Pretrained weights: verified download + cache and shipped weights.

Loading goes through timm's own machinery (`pretrained=True`, `hf-hub:`, `local-dir:`); this module only
adds what timm lacks for these models:

* a verified download for `url` weights: progress bar, cache reuse, sha256 check, and errors that name the
  model and the location. timm's PretrainedCfg has no sha256 field (and `local-dir:` configs reject unknown
  keys), so the hash rides in the weight file's name, torch.hub's `check_hash` convention:
  `<name>-<sha256 or a prefix of at least 8 hex digits>.safetensors`. Weights shipped inside the package
  (a `file` with a hash in its name) are verified the same way before they load.

Publishing a training run in timm's hub layout is the trainer's business: `timm_optdnn.training.publish`.
"""
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional, Union

from safetensors import safe_open
from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
from timm.models._hub import get_cache_dir
from tqdm import tqdm

_logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"  # weights shipped with the package (package-data)
HASH_RE = re.compile(r"-([0-9a-f]{8,64})\.safetensors$")


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
            f"(run `python -m timm_optdnn.training.publish publish --hash-name` to produce one)")
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
