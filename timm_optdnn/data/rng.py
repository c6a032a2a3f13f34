"""Seeded randomness for the FFCV training stages: every random draw for a sample (crop, flip, RandAugment,
RandomErasing) and for a batch (Mixup / CutMix) comes from numba's RNG seeded from (seed, rank, epoch, sample, ...).

FFCV's own augmentations draw from numba's per-thread RNG, which no seed reaches, so a resumed run could not see the
same images. Seeded per sample, the images do not depend on batch size, worker count or which thread ran which
sample; rank and the number of copies of a sample earlier in its batch keep repeated augmentation's copies apart
(except two copies that land on one rank on either side of a batch boundary: they get the same draws).
"""
import ctypes
import ctypes.util
import functools

import numba
import numpy as np

MASK = 0xFFFFFFFF  # numba's seed is 32 bits
# one salt per stage: the stages of one sample draw from different streams
CROP, RAND_AUGMENT, ERASE, MIX = 0, 1, 2, 3


@functools.cache
def _memcpy():
    memcpy = ctypes.CDLL(ctypes.util.find_library("c")).memcpy
    # pointers travel as int64, as in FFCV's own bindings: numba passes them through unchanged
    memcpy.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_size_t]
    memcpy.restype = ctypes.c_int64
    return memcpy


class Stream:
    """(seed, rank) and the current epoch, readable from compiled code without recompiling when the epoch changes.

    numba freezes arrays captured by compiled code as constants, so the code copies the epoch (memcpy) from the
    fixed address of `self.epoch`, which `set_epoch` writes.
    """

    def __init__(self, seed: int = 0, rank: int = 0):
        self.seed = (np.int64(seed) * 1000003 + rank) & MASK
        self.epoch = np.zeros(1, np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch[0] = epoch

    def reader(self):
        """A compiled function returning this epoch's stream number (made here: compiled code calls it)."""
        memcpy, address, seed = _memcpy(), self.epoch.ctypes.data, self.seed

        @numba.njit(nogil=True)
        def stream() -> np.int64:
            epoch = np.zeros(1, np.int64)
            memcpy(np.int64(epoch.ctypes.data), address, 8)
            return (seed * 2654435761 + epoch[0] * 40503) & MASK

        return stream


@numba.njit(nogil=True, cache=True)
def seed_sample(stream, batch_indices, i, salt) -> None:
    """Seed this thread's RNG for sample `batch_indices[i]`, stage `salt`."""
    sample = np.int64(batch_indices[i])
    copy = 0
    for q in range(i):
        copy += batch_indices[q] == sample
    np.random.seed((stream + sample * 2246822519 + copy * 3266489917 + salt * 2654435769) & MASK)


@numba.njit(nogil=True, cache=True)
def seed_batch(stream, batch_indices, salt) -> None:
    """Seed this thread's RNG for the batch made of `batch_indices`, stage `salt`."""
    h = (stream + salt * 2654435769) & MASK
    for sample in batch_indices:
        h = (h * 1000003 + np.int64(sample)) & MASK
    np.random.seed(h)
