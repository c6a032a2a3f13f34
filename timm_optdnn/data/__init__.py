"""FFCV data pipeline: beton writer (`python -m timm_optdnn.data.write`), train/val loaders.

Importing it changes nothing process-wide; `setup_process()` makes the settings the loaders are tuned for."""
from .beton import check_beton
from .config import DataConfig
from .loaders import create_loaders, resolution
from .process import setup_process

__all__ = ["DataConfig", "check_beton", "create_loaders", "resolution", "setup_process", "write_beton"]


def __getattr__(name: str):
    # the writer is imported on use: `python -m timm_optdnn.data.write` must find it not yet imported
    if name == "write_beton":
        from .write import write_beton
        return write_beton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
