"""Process-wide settings the data pipeline wants. The library never makes them by itself: the trainer and the
benchmarks call `setup_process()` once, before building loaders, and say so."""
import ctypes
import ctypes.util


def retain_freed_memory(limit: int = 1 << 30) -> bool:
    """Let glibc reuse freed blocks up to `limit` bytes instead of unmapping them. By default it returns every freed
    block over 32 MiB to the OS, and the next one is fresh memory that page-faults on first touch: a batch of 64
    float32 images at 224 px is 38.5 MiB, so every batch paid ~10,000 page faults on the loader's critical path
    (measured here: the FFCV train loader at 1,084 img/s before, 1,601 after). Process-wide (freed memory up to
    `limit` stays with the process); called by `setup_process`. False where libc has no `mallopt` (not glibc)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))


def setup_process() -> None:
    """Everything process-wide the loaders are tuned for (see each function)."""
    retain_freed_memory()
