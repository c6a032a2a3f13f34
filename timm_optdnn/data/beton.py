"""The beton as the writer leaves it and the loaders accept it: an FFCV file with fields `image` (RGB) and `label`
(int, the class index), next to `<beton>.meta.json` (source, classes, counts, options, size, sha256), written last.

`check_beton` is what a loader runs before reading: the meta is there and describes this file, the file is intact,
its fields are the ones the loaders decode, and every label is a class index below `num_classes`.
"""
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .process import kept_threads

META_FORMAT = "timm_optdnn-beton-v1"
VERIFY_MAX_BYTES = 4 << 30  # betons up to 4 GiB are sha256-checked at load (a few s); bigger ones by size + structure
FIELDS = {"image": "RGBImageField", "label": "IntField"}


def meta_path(beton: str | os.PathLike) -> Path:
    return Path(f"{beton}.meta.json")


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _reader(path: Path):
    with kept_threads():
        from ffcv.reader import Reader
    try:
        return Reader(str(path))
    except Exception as e:  # noqa: BLE001  ffcv raises assorted errors on garbage headers
        raise ValueError(f"beton {path} is corrupt: FFCV cannot read its header ({e})") from e


def check_beton(path: str | os.PathLike, num_classes: int, checksum: bool | None = None) -> dict:
    """Meta of the beton at `path` after checking it is complete, intact, holds an RGB `image` and an int `label`
    field and only labels in [0, num_classes), and has `num_classes` classes.

    checksum: compare the sha256 recorded by the writer (None: only for files up to VERIFY_MAX_BYTES).
    """
    path, mpath = Path(path), meta_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"beton {path} does not exist")
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath} is missing: {path} was not written by timm_optdnn.data.write or the write "
                                f"did not finish; re-create it with `python -m timm_optdnn.data.write`")
    meta = json.loads(mpath.read_text())
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{mpath} is not a {META_FORMAT} meta file")
    size = path.stat().st_size
    if size != meta["size_bytes"]:
        raise ValueError(f"beton {path} is {size} bytes but its meta says {meta['size_bytes']}: truncated or replaced")
    if meta["num_classes"] != num_classes:
        raise ValueError(f"beton {path} has {meta['num_classes']} classes ({meta['source']}), "
                         f"but num_classes={num_classes} was requested")
    if (checksum is None and size <= VERIFY_MAX_BYTES) or checksum:
        if file_sha256(path) != meta["sha256"]:
            raise ValueError(f"beton {path} is corrupt: its sha256 differs from the one recorded in {mpath}")
    reader = _reader(path)
    fields = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
    if fields != FIELDS:
        raise ValueError(f"beton {path} has fields {fields}; the loaders read {FIELDS}")
    if not (reader.num_samples == meta["num_samples"] and reader.header["alloc_table_ptr"] <= size
            and len(reader.alloc_table) >= reader.num_samples
            and (reader.alloc_table["ptr"] + reader.alloc_table["size"] <= size).all()):
        raise ValueError(f"beton {path} is corrupt: its header or allocation table does not match its meta")
    labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"beton {path}: {bad.sum()} label(s) outside [0, {num_classes}) (first at sample "
                         f"{bad.argmax()}: {labels[bad.argmax()]}); the class index must be below num_classes")
    return meta


def warn_if_oversized(path: str | os.PathLike, largest_use: int, factor: float = 4.0) -> None:
    """Warn when stored images are more than `factor` times larger (longer side) than the largest side the recipe
    ever crops to (`largest_use` px): every read decodes pixels the recipe throws away."""
    reader = _reader(Path(path))
    image = reader.metadata[f"f{reader.field_names.index('image')}"]
    sides = np.maximum(image["height"], image["width"])
    over = sides > factor * largest_use
    if over.any():
        warnings.warn(f"{over.sum()} of {len(sides)} images in {path} have a side over {factor:g}x the "
                      f"{largest_use} px this recipe uses (largest {sides.max()} px): each read decodes pixels the "
                      f"recipe throws away. Re-write it with `--max-side` (e.g. --max-side 500), see docs/data.md",
                      stacklevel=3)
