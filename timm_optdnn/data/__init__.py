"""FFCV data pipeline: beton writer (`python -m timm_optdnn.data.write`), train/val loaders."""
from .config import DataConfig
from .loaders import check_beton, create_loaders, resolution
from .process import setup_process
from .write import write_beton

__all__ = ["DataConfig", "check_beton", "create_loaders", "resolution", "setup_process", "write_beton"]
