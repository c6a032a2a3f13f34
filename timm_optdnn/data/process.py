"""Process-wide settings the data pipeline is tuned for. The library never makes them by itself (importing it or
building loaders leaves the process as it found it): the trainer and the benchmarks call `setup_process()` once,
before building loaders, and say so."""
import ctypes
import ctypes.util
from contextlib import contextmanager


def retain_freed_memory(limit: int = 1 << 30) -> bool:
    """Let glibc reuse freed blocks up to `limit` bytes instead of unmapping them. By default it returns every freed
    block over 32 MiB to the OS, and the next one is fresh memory that page-faults on first touch: a batch of 64
    float32 images at 224 px is 38.5 MiB, so every batch paid ~10,000 page faults on the loader's critical path
    (measured here: the FFCV train loader at 1,084 img/s before, 1,601 after). Freed memory up to `limit` stays with
    the process. False where libc has no `mallopt` (not glibc)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))


def opencv(name: str) -> ctypes.CDLL:
    """OpenCV's library `name` (opencv_core, opencv_imgproc), the one FFCV links."""
    path = ctypes.util.find_library(name)
    if path is None:
        raise ImportError(f"lib{name} not found: FFCV needs OpenCV (Debian: apt-get install libopencv-dev)")
    return ctypes.CDLL(path)


def single_thread_opencv() -> None:
    """Run OpenCV's functions on the calling thread only. Each of FFCV's worker threads resizes one image at a time;
    OpenCV's own pool of one thread per core under them oversubscribed the cores (the decode stage ran 1.3-1.5x
    faster with one thread here). Process-wide: every OpenCV call in the process, FFCV's stock decoders included."""
    opencv("opencv_core").cvSetNumThreads(1)


@contextmanager
def kept_threads():
    """Put the calling thread's torch and numba thread counts back afterwards. FFCV sets both (to 1 when it is
    imported, to `num_workers` when a Loader is made or compiled); the library calls FFCV inside this."""
    import numba
    import torch
    counts = torch.get_num_threads(), numba.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(counts[0])
        numba.set_num_threads(counts[1])


def setup_process() -> None:
    """Everything process-wide the loaders are tuned for (see each function)."""
    retain_freed_memory()
    single_thread_opencv()
