/* Decode only the part of a JPEG that a crop needs (libjpeg-turbo's partial decoding).
 *
 * A random-resized crop keeps on average about half of the photo, yet TurboJPEG's tjDecompress2 (what FFCV calls)
 * decodes all of it. Here rows below the crop are never decoded, rows above it are only entropy-decoded
 * (jpeg_skip_scanlines skips their IDCT, upsampling and colour conversion), and columns outside it are not
 * transformed either (jpeg_crop_scanline, rounded out to whole iMCUs). Called from numba-compiled FFCV code through
 * ctypes, so plain C types and no Python API beyond the module stub that lets Python locate the library.
 */
#include <Python.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <jpeglib.h>

struct error_jump {
    struct jpeg_error_mgr mgr;
    jmp_buf jump;
};

static void jump_on_error(j_common_ptr cinfo) { longjmp(((struct error_jump *)cinfo->err)->jump, 1); }

static void drop_message(j_common_ptr cinfo, int level) { (void)cinfo, (void)level; }

/* One decompressor per thread (FFCV runs a batch's images on numba's worker threads), reused across images:
 * creating one allocates libjpeg's memory pools. */
static __thread struct jpeg_decompress_struct dinfo;
static __thread struct error_jump err;
static __thread int ready;

/* Decode rows [y, y + h) and columns [x, x + w) of the image scaled by 1/denom (denom in 1, 2, 4, 8; coordinates
 * in the scaled image) as RGB into `out`, one row every `stride` bytes. Columns start at an iMCU boundary at or
 * before x: returns how many columns precede x in `out` (< 0: not a decodable JPEG, or the region is outside). */
int64_t decode_region(const uint8_t *data, int64_t size, int64_t denom, int64_t y, int64_t x, int64_t h, int64_t w,
                      uint8_t *out, int64_t stride) {
    if (!ready) {
        dinfo.err = jpeg_std_error(&err.mgr);
        err.mgr.error_exit = jump_on_error;
        err.mgr.emit_message = drop_message;  /* warnings (e.g. extraneous bytes) are not errors, as in TurboJPEG */
        jpeg_create_decompress(&dinfo);
        ready = 1;
    }
    if (setjmp(err.jump)) {
        jpeg_abort_decompress(&dinfo);
        return -1;
    }
    jpeg_mem_src(&dinfo, data, (unsigned long)size);
    jpeg_read_header(&dinfo, TRUE);
    dinfo.scale_num = 1;
    dinfo.scale_denom = (unsigned int)denom;
    dinfo.out_color_space = JCS_RGB;
    dinfo.dct_method = JDCT_IFAST;  /* TurboJPEG's TJFLAG_FASTDCT, which FFCV's decoder uses */
    jpeg_start_decompress(&dinfo);
    if (y < 0 || x < 0 || h < 1 || w < 1 || y + h > dinfo.output_height || x + w > dinfo.output_width) {
        jpeg_abort_decompress(&dinfo);
        return -2;
    }
    /* one more column each side where there is one: at the decoded region's edges the chroma upsampling has no
     * neighbour and repeats the edge, so the crop's own columns come out as in a full decode */
    JDIMENSION x0 = (JDIMENSION)(x > 0 ? x - 1 : 0);
    JDIMENSION cw = (JDIMENSION)(x + w < dinfo.output_width ? x + w + 1 : x + w) - x0;
    jpeg_crop_scanline(&dinfo, &x0, &cw);
    if (y > 0)
        jpeg_skip_scanlines(&dinfo, (JDIMENSION)y);
    JSAMPROW rows[16];
    while (dinfo.output_scanline < (JDIMENSION)(y + h)) {
        JDIMENSION n = (JDIMENSION)(y + h) - dinfo.output_scanline;
        n = n < 16 ? n : 16;
        for (JDIMENSION r = 0; r < n; r++)
            rows[r] = out + (int64_t)(dinfo.output_scanline - y + r) * stride;
        jpeg_read_scanlines(&dinfo, rows, n);
    }
    jpeg_abort_decompress(&dinfo);  /* the rows below the crop are never decoded */
    return x - (int64_t)x0;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg", "decode_region(): see _jpeg.c", -1, NULL};

PyMODINIT_FUNC PyInit__jpeg(void) { return PyModule_Create(&module); }
