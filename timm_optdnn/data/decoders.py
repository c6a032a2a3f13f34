"""FFCV crop decoders that let libjpeg-turbo decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop will be shrunk
anyway. Stock FFCV decodes every JPEG at full size and then resizes the crop: for a 500x375 photo cropped to
224 px most of that decode work is thrown away. The reduced-scale IDCT is a box-filtered image, so the result stays
within a small tolerance of full decode + resize (tests/test_data.py checks it). Raw-stored images are unchanged."""
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler


class _ScaledDecode:
    """generate_code of ffcv's ResizedCropRGBImageDecoder, plus the DCT scale choice."""

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(self.get_crop_generator)
        scale = np.array(self.scale) if isinstance(self.scale, tuple) else self.scale
        ratio = np.array(self.ratio) if isinstance(self.ratio, tuple) else self.ratio
        out_h, out_w = self.output_size

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                if field["mode"] == jpg:
                    d = 8  # the largest 1/d scale at which the crop still covers the output (so it is still shrunk)
                    while d > 1 and (h < d * out_h or w < d * out_w):
                        d //= 2
                    sh, sw = (height + d - 1) // d, (width + d - 1) // d
                    temp = temp_storage[dst_ix]
                    imdecode_c(image_data, temp, height, width, height, width, 0, 0, 1, d, False, False)
                    temp = temp.reshape(-1)[: 3 * sh * sw].reshape(sh, sw, 3)
                    half = d // 2  # round crop edges to the nearest scaled pixel: at most d/2 source pixels off
                    resize_crop_c(temp, (i + half) // d, min(sh, (i + h + half) // d), (j + half) // d,
                                  min(sw, (j + w + half) // d), destination[dst_ix])
                else:
                    resize_crop_c(image_data.reshape(height, width, 3), i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class ScaledRandomResizedCropRGBImageDecoder(_ScaledDecode, RandomResizedCropRGBImageDecoder):
    pass


class ScaledCenterCropRGBImageDecoder(_ScaledDecode, CenterCropRGBImageDecoder):
    pass
