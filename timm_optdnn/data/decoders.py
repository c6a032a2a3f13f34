"""FFCV crop decoders that spend the per-image work where it matters.

Stock FFCV decodes every JPEG whole, then resizes the crop with OpenCV's INTER_AREA. Measured here on 500x375
photos cropped to 224 px, that resize costs as much as the decode (~0.6 ms each): INTER_AREA at a non-integer ratio
is OpenCV's slow general path. These decoders

- decode only the crop: rows and iMCU columns outside it are skipped by libjpeg-turbo's partial decoding
  (`_jpeg.c`), bit-exact to the full decode's pixels (0.43 vs 0.58 ms per photo for random-resized crops);
- let libjpeg-turbo decode at 1/2, 1/4 or 1/8 scale (its fast reduced-size IDCT, a box filter) when the crop is at
  least that many times larger than the output, so what is left to resize is less than a 2x reduction;
- resize that remainder bilinearly for training (INTER_LINEAR, ~6x cheaper than INTER_AREA; below a 2x reduction
  it skips few source pixels), and keep INTER_AREA for validation, whose outputs should match the reference;
- draw the training crop and flip from numba's RNG seeded per sample (`rng`), so a resumed run sees the same crops.

OpenCV is called through its C API (cvResize, cvFlip) in the library FFCV itself links, since FFCV's own ctypes
binding hard-codes INTER_AREA. Raw-stored images take the same resize path. Nothing is loaded or set at import:
the bindings are made when a loader first compiles a decoder.
"""
import ctypes
import functools
from types import SimpleNamespace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.pipeline.compiler import Compiler

from . import _jpeg
from .process import opencv
from .rng import CROP, Stream, seed_sample

INTER_LINEAR, INTER_AREA = 1, 3  # OpenCV's interpolation codes
_CV_8UC3, _HDR = 16, 64  # OpenCV type code of HxWx3 uint8; bytes reserved per CvMat header (sizeof is 40)


@functools.cache
def c_functions() -> SimpleNamespace:
    """ctypes bindings of decode_region (`_jpeg.c`) and OpenCV's C API; pointers travel as int64, as in FFCV's own
    bindings: numba passes them through unchanged."""
    core, imgproc = opencv("opencv_core"), opencv("opencv_imgproc")
    c = SimpleNamespace(decode_region=ctypes.CDLL(_jpeg.__file__).decode_region, init_header=core.cvInitMatHeader,
                        resize=imgproc.cvResize, flip=core.cvFlip)
    c.decode_region.argtypes, c.decode_region.restype = [ctypes.c_int64] * 9, ctypes.c_int64
    c.init_header.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int]
    c.init_header.restype = ctypes.c_int64
    c.resize.argtypes, c.resize.restype = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int], None
    c.flip.argtypes, c.flip.restype = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int], None
    return c


class _FastDecode:
    """generate_code of ffcv's ResizedCropRGBImageDecoder, plus DCT scaling, the interpolation and seeded flips."""
    interpolation, flip_prob, stream = INTER_AREA, 0.0, None

    def generate_code(self):
        c, jpg = c_functions(), IMAGE_MODES["jpg"]
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        get_crop_c = Compiler.compile(self.get_crop_generator)
        decode_region, init_header, resize, flip = c.decode_region, c.init_header, c.resize, c.flip
        scale = np.array(self.scale) if isinstance(self.scale, tuple) else self.scale
        ratio = np.array(self.ratio) if isinstance(self.ratio, tuple) else self.ratio
        out_h, out_w = self.output_size
        interpolation, flip_prob = self.interpolation, self.flip_prob
        seeded = self.stream is not None
        stream = (self.stream or Stream()).reader()

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            stream_now = stream()
            for dst_ix in my_range(len(batch_indices)):
                if seeded:
                    seed_sample(stream_now, batch_indices, dst_ix, CROP)
                field = metadata[batch_indices[dst_ix]]
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
    """Random-resized crop + horizontal flip, seeded per sample from `stream` (None: numba's unseeded RNG)."""

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_prob: float = 0.0,
                 stream: Stream | None = None):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.interpolation, self.flip_prob, self.stream = INTER_LINEAR, flip_prob, stream


class FastCenterCropRGBImageDecoder(_FastDecode, CenterCropRGBImageDecoder):
    """Center crop (timm's crop_pct as `ratio`), INTER_AREA like stock FFCV; DCT scaling where it applies."""
