"""FFCV pipeline stages that spend the per-image work where it matters: crop decoders and a normalisation.

Stock FFCV decodes every JPEG whole, then resizes the crop with OpenCV's INTER_AREA. Measured here on 500x375
photos cropped to 224 px, that resize costs as much as the decode (~0.6 ms each): INTER_AREA at a non-integer ratio
is OpenCV's slow general path. These decoders

- decode only the crop: rows and iMCU columns outside it are skipped by libjpeg-turbo's partial decoding
  (`_jpeg.c`), bit-exact to the full decode's pixels (0.43 vs 0.58 ms per photo for random-resized crops);
- let libjpeg-turbo decode at 1/2, 1/4 or 1/8 scale (its fast reduced-size IDCT, a box filter) when the crop is at
  least that many times larger than the output, so what is left to resize is less than a 2x reduction;
- resize that remainder bilinearly for training (INTER_LINEAR, ~6x cheaper than INTER_AREA; below a 2x reduction
  it skips few source pixels), and keep INTER_AREA for validation, whose outputs should match the reference;
- draw the training crop and flip from numba's RNG seeded per sample from (seed, rank, epoch, sample index, copies
  of the sample earlier in its batch): FFCV's own augmentations draw from numba's per-thread RNG, which no seed
  reaches, so a resumed run could not see the same crops. The crops do not depend on batch size or worker count;
  rank and copy count keep repeated augmentation's copies of a sample apart (except two copies that land on one
  rank on either side of a batch boundary: they get the same crop).

OpenCV is called through its C API (cvResize, cvFlip) in the library FFCV itself links, since FFCV's own ctypes
binding hard-codes INTER_AREA. Raw-stored images take the same resize path. `NormalizeToFloat` then turns the uint8
batch into the model's float batch in one pass in the same worker threads.
"""
import ctypes
import ctypes.util
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from . import _jpeg

INTER_LINEAR, INTER_AREA = 1, 3  # OpenCV's interpolation codes
_CV_8UC3, _HDR = 16, 64  # OpenCV type code of HxWx3 uint8; bytes reserved per CvMat header (sizeof is 40)


def _opencv(name: str) -> ctypes.CDLL:
    path = ctypes.util.find_library(name)
    if path is None:
        raise ImportError(f"lib{name} not found: FFCV needs OpenCV (Debian: apt-get install libopencv-dev)")
    return ctypes.CDLL(path)


_core, _imgproc = _opencv("opencv_core"), _opencv("opencv_imgproc")
_decode_region = ctypes.CDLL(_jpeg.__file__).decode_region  # see _jpeg.c
_decode_region.argtypes = [ctypes.c_int64] * 9
_decode_region.restype = ctypes.c_int64
_init_header = _core.cvInitMatHeader
# pointers travel as int64, as in FFCV's own bindings: numba passes them through unchanged
_init_header.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
_init_header.restype = ctypes.c_int64
_resize = _imgproc.cvResize
_resize.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
_resize.restype = None
_flip = _core.cvFlip
_flip.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
_flip.restype = None
# numba freezes arrays captured by compiled code as constants; the epoch must change without recompiling, so the
# code copies it (memcpy) from a fixed address, that of the decoder's own `epoch` array
_memcpy = ctypes.CDLL(ctypes.util.find_library("c")).memcpy
_memcpy.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_size_t]
_memcpy.restype = ctypes.c_int64


class _FastDecode:
    """generate_code of ffcv's ResizedCropRGBImageDecoder, plus DCT scaling, the interpolation and seeded flips."""
    interpolation, flip_prob, seed, rank = INTER_AREA, 0.0, None, 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = np.zeros(1, np.int64)  # set_epoch writes here; the compiled code reads it at every batch

    def generate_code(self):
        # OpenCV's own thread pool (one thread per core) under numba's worker threads, each resizing one image,
        # oversubscribes the cores: 1 thread made the decode stage 1.3-1.5x faster here. Process-wide, like FFCV's
        # own numba threads; nothing else in a training process uses OpenCV.
        _core.cvSetNumThreads(1)
        jpg = IMAGE_MODES["jpg"]
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        get_crop_c = Compiler.compile(self.get_crop_generator)
        decode_region, init_header, resize, flip, memcpy = _decode_region, _init_header, _resize, _flip, _memcpy
        epoch_address = self.epoch.ctypes.data
        scale = np.array(self.scale) if isinstance(self.scale, tuple) else self.scale
        ratio = np.array(self.ratio) if isinstance(self.ratio, tuple) else self.ratio
        out_h, out_w = self.output_size
        interpolation, flip_prob = self.interpolation, self.flip_prob
        seeded, seed = self.seed is not None, (np.int64(self.seed or 0) * 1000003 + self.rank) & 0xFFFFFFFF

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch = np.zeros(1, np.int64)
            memcpy(np.int64(epoch.ctypes.data), epoch_address, 8)
            stream = (seed * 2654435761 + epoch[0] * 40503) & 0xFFFFFFFF
            for dst_ix in my_range(len(batch_indices)):
                sample = np.int64(batch_indices[dst_ix])
                if seeded:  # the hash only has to separate nearby seeds; 32 bits is numba's seed width
                    copy = 0
                    for q in range(dst_ix):
                        copy += batch_indices[q] == sample
                    np.random.seed((stream + sample * 2246822519 + copy * 3266489917) & 0xFFFFFFFF)
                field = metadata[sample]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.int64(field["height"]), np.int64(field["width"])
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                i, j, h, w = np.int64(i), np.int64(j), np.int64(h), np.int64(w)
                if field["mode"] == jpg:
                    d = 8  # the largest 1/d scale at which the crop still covers the output (so it is still shrunk)
                    while d > 1 and (h < d * out_h or w < d * out_w):
                        d //= 2
                    sh, sw = (height + d - 1) // d, (width + d - 1) // d
                    half = d // 2  # round crop edges to the nearest scaled pixel: at most d/2 source pixels off
                    i0, j0 = (i + half) // d, (j + half) // d
                    i1, j1 = max(i0 + 1, min(sh, (i + h + half) // d)), max(j0 + 1, min(sw, (j + w + half) // d))
                    source = temp_storage[dst_ix]  # the crop's rows, from row 0; its columns from column j0 - shift
                    shift = decode_region(np.int64(image_data.ctypes.data), image_data.size, d, i0, j0, i1 - i0,
                                          j1 - j0, np.int64(source.ctypes.data), 3 * sw)
                    # shift < 0: not decodable, which check_beton rules out (the writer decodes every image it
                    # stores and the loader checks the file's sha256); a raise here would serialise the prange
                    shift = max(shift, 0)
                    i1, i0, j0, j1 = i1 - i0, 0, shift, shift + j1 - j0
                else:
                    source, sw, i0, i1, j0, j1 = image_data, width, i, i + h, j, j + w
                hdr = np.empty(2 * _HDR, np.uint8)  # two CvMat headers: views of the crop and of the output
                base = np.int64(hdr.ctypes.data)
                src = init_header(base, i1 - i0, j1 - j0, _CV_8UC3,
                                  np.int64(source.ctypes.data) + 3 * (i0 * sw + j0), 3 * sw)
                dst = init_header(base + _HDR, out_h, out_w, _CV_8UC3, np.int64(destination[dst_ix].ctypes.data),
                                  3 * out_w)
                resize(src, dst, interpolation)
                if flip_prob > 0 and np.random.random() < flip_prob:
                    flip(dst, dst, 1)  # in place, horizontal
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class FastRandomResizedCropRGBImageDecoder(_FastDecode, RandomResizedCropRGBImageDecoder):
    """Random-resized crop + horizontal flip, seeded per sample; `seed=None` leaves numba's RNG unseeded."""

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_prob: float = 0.0,
                 seed: int | None = 0, rank: int = 0):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.interpolation, self.flip_prob, self.seed, self.rank = INTER_LINEAR, flip_prob, seed, rank


class FastCenterCropRGBImageDecoder(_FastDecode, CenterCropRGBImageDecoder):
    """Center crop (timm's crop_pct as `ratio`), INTER_AREA like stock FFCV; DCT scaling where it applies."""


class NormalizeToFloat(Operation):
    """uint8 HxWx3 images -> normalised float32 batch in new memory, laid out as the model wants it:
    (B, H, W, 3), a channels_last NCHW tensor once permuted, or (B, 3, H, W) contiguous.

    One parallel pass in FFCV's worker threads instead of three (FFCV's NormalizeImage into its ring buffer, then a
    copy out of that buffer, which FFCV overwrites a batch later, transposed for contiguous NCHW, on the main thread).
    The batch is allocated per call, so it stays valid as long as the caller keeps it.
    """

    def __init__(self, mean, std, channels_last: bool):
        super().__init__()
        self.scale = (1.0 / np.asarray(std, np.float64)).astype(np.float32)
        self.bias = (-np.asarray(mean, np.float64) / np.asarray(std, np.float64)).astype(np.float32)
        self.channels_last = channels_last

    def generate_code(self):
        my_range, channels_last = Compiler.get_iterator(), self.channels_last
        s0, s1, s2 = (float(v) for v in self.scale)
        b0, b1, b2 = (float(v) for v in self.bias)
        # written so LLVM vectorises them (~25 us per 224 px image, 3x faster than a loop over (y, x, c)): NHWC as a
        # flat loop over whole periods of the 3-channel pattern (48 values: 16 pixels), NCHW as one pass over the
        # pixels writing three planes
        period_scale, period_bias = np.tile(self.scale, 16), np.tile(self.bias, 16)

        def normalize(images, _):
            n, h, w, _c = images.shape
            out = np.empty((n, h, w, 3) if channels_last else (n, 3, h, w), np.float32)
            for i in my_range(n):
                src, dst = images[i].reshape(-1), out[i].reshape(-1)
                m = h * w
                if channels_last:
                    whole = 3 * m - 3 * m % 48
                    for b in range(0, whole, 48):
                        for k in range(48):
                            dst[b + k] = src[b + k] * period_scale[k] + period_bias[k]
                    for k in range(whole, 3 * m):
                        dst[k] = src[k] * period_scale[k % 3] + period_bias[k % 3]
                else:
                    for p in range(m):
                        dst[p] = src[3 * p] * s0 + b0
                        dst[m + p] = src[3 * p + 1] * s1 + b1
                        dst[2 * m + p] = src[3 * p + 2] * s2 + b2
            return out

        normalize.is_parallel = True
        return normalize

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        h, w, _ = previous_state.shape
        shape = (h, w, 3) if self.channels_last else (3, h, w)
        return replace(previous_state, jit_mode=True, dtype=np.dtype(np.float32), shape=shape), None
