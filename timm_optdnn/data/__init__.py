"""FFCV data pipeline: beton writer (`python -m timm_optdnn.data.write`), train/val loaders, loader benchmark."""
from .loaders import check_beton, create_loaders, resolution
from .write import write_beton

__all__ = ["check_beton", "create_loaders", "resolution", "write_beton"]
