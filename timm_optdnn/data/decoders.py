"""FFCV crop decoders that spend the per-image work where it matters.

Stock FFCV decodes every JPEG at full size, then resizes the crop with OpenCV's INTER_AREA. Measured here on
500x375 photos cropped to 224 px, that resize costs as much as the decode (~0.6 ms each): INTER_AREA at a
non-integer ratio is OpenCV's slow general path. These decoders

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
binding hard-codes INTER_AREA. Raw-stored images take the same resize path.
"""
import ctypes
import ctypes.util

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.pipeline.compiler import Compiler

INTER_LINEAR, INTER_AREA = 1, 3  # OpenCV's interpolation codes
_CV_8UC3, _HDR = 16, 64  # OpenCV type code of HxWx3 uint8; bytes reserved per CvMat header (sizeof is 40)


def _opencv(name: str) -> ctypes.CDLL:
    path = ctypes.util.find_library(name)
    if path is None:
        raise ImportError(f"lib{name} not found: FFCV needs OpenCV (Debian: apt-get install libopencv-dev)")
    return ctypes.CDLL(path)


_core, _imgproc = _opencv("opencv_core"), _opencv("opencv_imgproc")
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
        jpg = IMAGE_MODES["jpg"]
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, get_crop_c = Compiler.compile(imdecode), Compiler.compile(self.get_crop_generator)
        init_header, resize, flip, memcpy = _init_header, _resize, _flip, _memcpy
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
                    source = temp_storage[dst_ix]
                    imdecode_c(image_data, source, height, width, height, width, 0, 0, 1, d, False, False)
                    half = d // 2  # round crop edges to the nearest scaled pixel: at most d/2 source pixels off
                    i0, j0 = (i + half) // d, (j + half) // d
                    i1, j1 = min(sh, (i + h + half) // d), min(sw, (j + w + half) // d)
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
