"""Training augmentations on uint8 HxWx3 images and float batches, compiled with numba for FFCV's worker threads
(`stages` wraps them as FFCV operations): timm's RandAugment, normalisation, timm's RandomErasing and Mixup / CutMix.
Every draw comes from numba's RNG as the stages seed it (`rng`).

RandAugment takes timm's `rand-...` strings (parsed by timm: ops, magnitude, its noise, layers, probability,
weights) and implements timm's ops the way Pillow computes them (LUTs, blends truncated as Pillow's, the 3x3
smoothing kernel, affine maps sampled as Pillow's bilinear filter); `tests/test_data_augment.py` compares each op
with timm's own. Geometric ops sample bilinearly, as timm's `create_transform(interpolation='bilinear')` (which the
torchvision backend uses) does; timm's default picks bilinear or bicubic per call. The draws follow timm's
distributions from numba's RNG, not timm's Python RNG, so the two backends see different (equally likely)
augmentations of a sample.

The torchvision backend gets RandAugment and RandomErasing from timm's `create_transform` (`timm_train_transform`)
and Mixup / CutMix / smoothing from timm on the device batch (`Targets`).
"""
import math

import numba
import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data import auto_augment
from timm.data.mixup import Mixup, mixup_target

from .rng import MIX, seed_batch

# timm's op names (auto_augment.NAME_TO_OP) implemented here; an op's code is its index
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
       "Solarize", "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast", "ContrastIncreasing",
       "Brightness", "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateX",
       "TranslateY", "TranslateXRel", "TranslateYRel")
(AUTO_CONTRAST, EQUALIZE, INVERT, ROTATE, POSTERIZE, POSTERIZE_INC, POSTERIZE_ORIG, SOLARIZE, SOLARIZE_INC,
 SOLARIZE_ADD, COLOR, COLOR_INC, CONTRAST, CONTRAST_INC, BRIGHTNESS, BRIGHTNESS_INC, SHARPNESS, SHARPNESS_INC, SHEAR_X,
 SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, TRANSLATE_X_REL, TRANSLATE_Y_REL) = range(len(OPS))
_F32, _U64 = np.float32, np.uint64
# Flat loops index with uint64 (_U64): numba checks every signed index for a negative value (wraparound), which
# keeps LLVM from vectorising the loop (normalisation ran 8x slower with int64 indices).


# ------------------------------------------------------------------------------------------ RandAugment's ops

@numba.njit(nogil=True, cache=True)
def _negate(v: float) -> float:
    return -v if np.random.random() > 0.5 else v  # timm's _randomly_negate


@numba.njit(nogil=True, cache=True)
def op_argument(op: int, level: float, translate_const: float, translate_pct: float) -> float:
    """timm's LEVEL_TO_ARG for `op` at magnitude `level` (0..10), with its random sign flips."""
    frac = level / 10.0
    if op == ROTATE:
        return _negate(frac * 30.0)
    if op == POSTERIZE:
        return int(frac * 4)
    if op == POSTERIZE_INC:
        return 4 - int(frac * 4)
    if op == POSTERIZE_ORIG:
        return int(frac * 4) + 4
    if op == SOLARIZE:
        return min(256, int(frac * 256))
    if op == SOLARIZE_INC:
        return 256 - min(256, int(frac * 256))
    if op == SOLARIZE_ADD:
        return min(128, int(frac * 110))
    if op == COLOR or op == CONTRAST or op == BRIGHTNESS or op == SHARPNESS:
        return frac * 1.8 + 0.1
    if op == COLOR_INC or op == CONTRAST_INC or op == BRIGHTNESS_INC or op == SHARPNESS_INC:
        return max(0.1, 1.0 + _negate(frac * 0.9))
    if op == SHEAR_X or op == SHEAR_Y:
        return _negate(frac * 0.3)
    if op == TRANSLATE_X or op == TRANSLATE_Y:
        return _negate(frac * translate_const)
    if op == TRANSLATE_X_REL or op == TRANSLATE_Y_REL:
        return _negate(frac * translate_pct)
    return 0.0  # AutoContrast, Equalize, Invert take none


@numba.njit(nogil=True, cache=True)
def _histograms(src):
    hist = np.zeros((3, 256), np.int64)
    flat = src.reshape(-1)
    for k in range(_U64(0), _U64(flat.size), _U64(3)):
        hist[0, flat[k]] += 1
        hist[1, flat[k + _U64(1)]] += 1
        hist[2, flat[k + _U64(2)]] += 1
    return hist


@numba.njit(nogil=True, cache=True)
def _lut(op: int, arg: float, src):
    """The per-channel table of a point op, as ImageOps builds it."""
    lut = np.empty((3, 256), np.uint8)
    if op == AUTO_CONTRAST or op == EQUALIZE:
        hist = _histograms(src)
    for c in range(3):
        for i in range(256):
            lut[c, i] = i
        if op == AUTO_CONTRAST:
            lo, hi = 0, 255
            while lo < 255 and hist[c, lo] == 0:
                lo += 1
            while hi > 0 and hist[c, hi] == 0:
                hi -= 1
            if hi > lo:
                scale = 255.0 / (hi - lo)
                offset = -lo * scale
                for i in range(256):
                    lut[c, i] = min(255, max(0, int(i * scale + offset)))
        elif op == EQUALIZE:
            used, total, last = 0, 0, 0
            for i in range(256):
                if hist[c, i]:
                    used, total, last = used + 1, total + hist[c, i], hist[c, i]
            step = (total - last) // 255
            if used > 1 and step:
                n = step // 2
                for i in range(256):
                    lut[c, i] = min(255, n // step)
                    n += hist[c, i]
        elif op == INVERT:
            for i in range(256):
                lut[c, i] = 255 - i
        elif op == POSTERIZE or op == POSTERIZE_INC or op == POSTERIZE_ORIG:
            bits = int(arg)
            if bits < 8:  # 0 bits gives black, as Pillow before 12 did (Pillow 12 rejects 0)
                mask = ~((1 << (8 - bits)) - 1)
                for i in range(256):
                    lut[c, i] = i & mask
        elif op == SOLARIZE or op == SOLARIZE_INC:
            for i in range(int(arg), 256):
                lut[c, i] = 255 - i
        elif op == SOLARIZE_ADD:
            for i in range(128):
                lut[c, i] = min(255, i + int(arg))
    return lut


@numba.njit(nogil=True, cache=True)
def _blend(out, src, factor: float) -> None:
    """Image.blend(degenerate, src, factor) with the degenerate image in `out`: Pillow's float arithmetic,
    truncated, clipped."""
    a = _F32(factor)
    o, s = out.reshape(-1), src.reshape(-1)
    for k in range(_U64(o.size)):
        v = _F32(o[k]) + a * (_F32(s[k]) - _F32(o[k]))
        o[k] = 0 if v <= 0 else 255 if v >= 255 else np.uint8(v)


@numba.njit(nogil=True, cache=True)
def _gray(r, g, b) -> int:
    return (np.int64(r) * 19595 + np.int64(g) * 38470 + np.int64(b) * 7471 + 0x8000) >> 16  # Pillow's RGB -> L


@numba.njit(nogil=True, cache=True)
def _degenerate(op: int, src, out) -> None:
    """The image ImageEnhance blends with: gray (Color), the mean gray level (Contrast), black (Brightness),
    ImageFilter.SMOOTH with the border kept (Sharpness)."""
    h, w, _ = src.shape
    if op == COLOR or op == COLOR_INC:
        for y in range(h):
            for x in range(w):
                v = _gray(src[y, x, 0], src[y, x, 1], src[y, x, 2])
                out[y, x, 0], out[y, x, 1], out[y, x, 2] = v, v, v
    elif op == CONTRAST or op == CONTRAST_INC:
        total = 0
        for y in range(h):
            for x in range(w):
                total += _gray(src[y, x, 0], src[y, x, 1], src[y, x, 2])
        out[:] = int(total / (h * w) + 0.5)
    elif op == BRIGHTNESS or op == BRIGHTNESS_INC:
        out[:] = 0
    else:
        out[:] = src
        k0, k1 = _F32(1 / 13), _F32(5 / 13)
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                for c in range(3):
                    ss = _F32(0.5)
                    for dy in (1, 0, -1):  # Pillow's order of the kernel's rows: the same float sums
                        ss += (_F32(src[y + dy, x - 1, c]) * k0 + _F32(src[y + dy, x, c]) * (k1 if dy == 0 else k0)
                               + _F32(src[y + dy, x + 1, c]) * k0)
                    out[y, x, c] = 0 if ss <= 0 else 255 if ss >= 255 else np.uint8(ss)


@numba.njit(nogil=True, cache=True)
def _affine(src, out, a0, a1, a2, a3, a4, a5, fill) -> None:
    """Image.transform(AFFINE, (a0..a5), BILINEAR, fillcolor=fill): each output pixel's centre maps to
    (a0 x + a1 y + a2, a3 x + a4 y + a5) in the input, sampled bilinearly with edges clamped as Pillow's filter."""
    h, w, _ = src.shape
    col_x, col_y = np.empty(w), np.empty(w)
    for x in range(w):  # the products by x are the same for every row (Pillow's sums keep their order below)
        col_x[x], col_y[x] = a0 * (x + 0.5), a3 * (x + 0.5)
    for y in range(h):
        by, ey = a1 * (y + 0.5), a4 * (y + 0.5)
        for x in range(w):
            xin, yin = col_x[x] + by + a2, col_y[x] + ey + a5
            if xin < 0.0 or xin >= w or yin < 0.0 or yin >= h:
                out[y, x, 0], out[y, x, 1], out[y, x, 2] = fill[0], fill[1], fill[2]
                continue
            xin, yin = xin - 0.5, yin - 0.5
            xf, yf = math.floor(xin), math.floor(yin)
            dx, dy, xi, yi = xin - xf, yin - yf, int(xf), int(yf)
            x0, x1 = _U64(min(max(xi, 0), w - 1)), _U64(min(max(xi + 1, 0), w - 1))
            y0 = _U64(min(max(yi, 0), h - 1))
            y1 = _U64(yi + 1) if 0 <= yi + 1 < h else y0
            for c in range(_U64(3)):  # a row below the image repeats the last (Pillow: v2 = v1 there)
                v1 = float(src[y0, x0, c]) + (float(src[y0, x1, c]) - float(src[y0, x0, c])) * dx
                v2 = float(src[y1, x0, c]) + (float(src[y1, x1, c]) - float(src[y1, x0, c])) * dx
                out[y, x, c] = np.uint8(v1 + (v2 - v1) * dy)


@numba.njit(nogil=True, cache=True)
def apply_op(op: int, arg: float, src, out, fill) -> None:
    """timm's op `op` with argument `arg` (from `op_argument`) on uint8 HxWx3 `src`, into `out`."""
    h, w, _ = src.shape
    if op == ROTATE:  # Image.rotate about the centre: the output -> input map of rotating by -angle
        angle = -math.radians(arg % 360.0)
        cos, sin, cx, cy = math.cos(angle), math.sin(angle), w / 2.0, h / 2.0
        _affine(src, out, cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy, fill)
    elif op == SHEAR_X:
        _affine(src, out, 1.0, arg, 0.0, 0.0, 1.0, 0.0, fill)
    elif op == SHEAR_Y:
        _affine(src, out, 1.0, 0.0, 0.0, arg, 1.0, 0.0, fill)
    elif op == TRANSLATE_X or op == TRANSLATE_X_REL:
        _affine(src, out, 1.0, 0.0, arg * (w if op == TRANSLATE_X_REL else 1), 0.0, 1.0, 0.0, fill)
    elif op == TRANSLATE_Y or op == TRANSLATE_Y_REL:
        _affine(src, out, 1.0, 0.0, 0.0, 0.0, 1.0, arg * (h if op == TRANSLATE_Y_REL else 1), fill)
    elif op >= COLOR and op <= SHARPNESS_INC:
        _degenerate(op, src, out)
        _blend(out, src, arg)
    else:
        lut = _lut(op, arg, src)
        s, o = src.reshape(-1), out.reshape(-1)
        for k in range(_U64(0), _U64(s.size), _U64(3)):
            o[k], o[k + _U64(1)], o[k + _U64(2)] = lut[0, s[k]], lut[1, s[k + _U64(1)]], lut[2, s[k + _U64(2)]]


@numba.njit(nogil=True, cache=True)
def rand_augment(image, spare, ops, weights, num_layers, prob, magnitude, magnitude_std, magnitude_max,
                 fill) -> bool:
    """timm's RandAugment.__call__ on uint8 HxWx3 `image`, using `spare` (same shape) as the other buffer: `num_layers`
    ops drawn (uniformly with replacement, or by `weights` without), each applied with probability `prob` at a
    magnitude ~ N(magnitude, magnitude_std) (uniform in [0, magnitude] for an infinite std) clipped to
    [0, magnitude_max]. True if the result is in `spare`."""
    h, w, _ = image.shape
    translate_const = float(int(min(h, w) * 0.45))  # timm's create_transform: 45 % of the image size
    left = weights.copy()
    in_spare = False
    for _ in range(num_layers):
        if weights.size:
            u, k = np.random.random() * left.sum(), 0
            while k < left.size - 1 and u >= left[k]:
                u -= left[k]
                k += 1
            left[k] = 0.0
        else:
            k = np.random.randint(0, ops.size)
        if prob < 1.0 and np.random.random() > prob:
            continue
        level = magnitude
        if np.isinf(magnitude_std):
            level = np.random.uniform(0.0, magnitude)
        elif magnitude_std > 0:
            level = np.random.normal(magnitude, magnitude_std)
        level = max(0.0, min(level, magnitude_max))
        arg = op_argument(ops[k], level, translate_const, 0.45)
        if in_spare:
            apply_op(ops[k], arg, spare, image, fill)
        else:
            apply_op(ops[k], arg, image, spare, fill)
        in_spare = not in_spare
    return in_spare


def rand_augment_spec(config_str: str) -> dict:
    """timm's own parse of a RandAugment string, checked against the ops implemented here."""
    ra = auto_augment.rand_augment_transform(config_str, {})
    names = [op.name for op in ra.ops]
    missing = sorted(set(names) - set(OPS))
    if missing:
        raise ValueError(f"rand_augment {config_str!r} uses {', '.join(missing)}, which the FFCV pipeline does not "
                         f"implement (it has {', '.join(OPS)}); use backend 'torchvision' for it")
    first = ra.ops[0]
    weights = np.asarray(ra.choice_weights if ra.choice_weights is not None else [], np.float64)
    return dict(ops=np.array([OPS.index(n) for n in names], np.int64), weights=weights, num_layers=ra.num_layers,
                prob=float(first.prob), magnitude=float(first.magnitude),
                magnitude_std=float(first.magnitude_std), magnitude_max=float(first.magnitude_max or 10))


def fill_colour(mean) -> np.ndarray:
    """timm's RandAugment fill: the mean colour in 0..255."""
    return np.array([min(255, round(255 * m)) for m in mean], np.uint8)


# --------------------------------------------------------------------------- float batch: normalise, erase, mix

@numba.njit(nogil=True, cache=True)
def normalize(src, out, scale, bias, channels_last: bool) -> None:
    """uint8 HxWx3 -> float32 (x - mean) / std in `out`, HxWx3 or 3xHxW. Written so LLVM vectorises it (~20 us per
    224 px image, 8x faster than a loop over (y, x, c)): HWC as a flat loop over whole periods of the 3-channel
    pattern (48 values: 16 pixels), CHW as one pass over the pixels writing three planes."""
    s, o = src.reshape(-1), out.reshape(-1)
    one, three, n = _U64(1), _U64(3), _U64(s.size)
    if channels_last:
        period_scale, period_bias = np.empty(48, np.float32), np.empty(48, np.float32)
        for k in range(48):
            period_scale[k], period_bias[k] = scale[k % 3], bias[k % 3]
        whole = n - n % _U64(48)
        for b in range(_U64(0), whole, _U64(48)):
            for k in range(_U64(48)):
                o[b + k] = s[b + k] * period_scale[k] + period_bias[k]
        for k in range(whole, n):
            o[k] = s[k] * scale[k % three] + bias[k % three]
    else:
        m = n // three
        s0, s1, s2, b0, b1, b2 = scale[0], scale[1], scale[2], bias[0], bias[1], bias[2]
        for p in range(m):
            o[p] = s[three * p] * s0 + b0
            o[m + p] = s[three * p + one] * s1 + b1
            o[m + m + p] = s[three * p + one + one] * s2 + b2


@numba.njit(nogil=True, cache=True)
def erase(out, h: int, w: int, channels_last: bool) -> None:
    """timm's RandomErasing once it has decided to erase (mode 'pixel', area 2 %..1/3, aspect 0.3..3.3, one box):
    a box of standard normal noise, up to 10 tries to fit one."""
    area, log_lo, log_hi = h * w, math.log(0.3), math.log(1 / 0.3)
    for _ in range(10):
        target = np.random.uniform(0.02, 1 / 3) * area
        aspect = math.exp(np.random.uniform(log_lo, log_hi))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            top, left = np.random.randint(0, h - eh + 1), np.random.randint(0, w - ew + 1)
            for y in range(top, top + eh):  # the box row by row, as runs of contiguous memory
                if channels_last:
                    _fill_normal(out[y, left:left + ew].reshape(-1))
                else:
                    for c in range(3):
                        _fill_normal(out[c, y, left:left + ew])
            return


@numba.njit(nogil=True, cache=True)
def _fill_normal(run) -> None:
    """Standard normal values into `run`, two per pair of uniforms (Marsaglia's polar method)."""
    for k in range(0, run.size, 2):
        s = 0.0
        while s == 0.0 or s >= 1.0:
            u, v = 2.0 * np.random.random() - 1.0, 2.0 * np.random.random() - 1.0
            s = u * u + v * v
        f = math.sqrt(-2.0 * math.log(s) / s)
        run[k] = u * f
        if k + 1 < run.size:
            run[k + 1] = v * f


@numba.njit(nogil=True, cache=True)
def mix_params(stream, indices, mixup_alpha: float, cutmix_alpha: float, h: int, w: int):
    """timm's Mixup in batch mode (mix_prob 1, switch_prob 0.5, correct_lam): (lam, cutmix?, box y0, y1, x0, x1),
    seeded by the batch's samples so the image and the label stages draw the same."""
    seed_batch(stream, indices, MIX)
    cut = cutmix_alpha > 0 and (mixup_alpha <= 0 or np.random.random() < 0.5)
    lam = np.random.beta(cutmix_alpha, cutmix_alpha) if cut else np.random.beta(mixup_alpha, mixup_alpha)
    y0 = y1 = x0 = x1 = 0
    if cut:  # timm's rand_bbox, then lam corrected to the box's real area
        ratio = math.sqrt(1 - lam)
        ch, cw = int(h * ratio), int(w * ratio)
        cy, cx = np.random.randint(0, h), np.random.randint(0, w)
        y0, y1 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
        x0, x1 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return lam, cut, y0, y1, x0, x1


@numba.njit(nogil=True, cache=True)
def mix_pair(a, b, lam: float, cut: bool, y0: int, y1: int, x0: int, x1: int, channels_last: bool) -> None:
    """timm's batch mixing of sample i with sample B-1-i, both ways at once: a, b = lam a + (1 - lam) b,
    lam b + (1 - lam) a, or the CutMix box swapped between them."""
    if cut:
        for y in range(y0, y1):
            for x in range(x0, x1):
                for c in range(3):
                    if channels_last:
                        a[y, x, c], b[y, x, c] = b[y, x, c], a[y, x, c]
                    else:
                        a[c, y, x], b[c, y, x] = b[c, y, x], a[c, y, x]
    else:
        fa, fb = a.reshape(-1), b.reshape(-1)
        la, lb = _F32(lam), _F32(1.0 - lam)
        for k in range(_U64(fa.size)):
            va, vb = fa[k], fb[k]
            fa[k], fb[k] = va * la + vb * lb, vb * la + va * lb


# ------------------------------------------------------------------------------------------ torchvision backend

def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for Pillow >= 12, which rejects bits=0; older Pillow returned a black image, as here."""
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)


def timm_train_transform(img_size: int, **kwargs):
    """timm's create_transform(is_training=True), with its RandAugment's posterize ops replaced, in this transform
    only, by one that accepts 0 bits: 'PosterizeIncreasing' at magnitude 10 (reached by rand-m9-mstd0.5) asks for 0
    bits, which Pillow >= 12 rejects, so RandAugment would crash."""
    transform = create_transform(img_size, is_training=True, **kwargs)
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


class Targets:
    """int64 labels -> hard labels, or soft [B, num_classes] targets when Mixup / CutMix / label smoothing is on
    (timm's, on the device batch)."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, label_smoothing: float = 0.0):
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                           num_classes=num_classes) if mixup > 0 or cutmix > 0 else None
        self.soft = self.mixup is not None or label_smoothing > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is not None:
            return self.mixup(images, labels)  # mixes images in place, returns smoothed soft targets
        if self.smoothing > 0:
            return images, mixup_target(labels, self.num_classes, 1.0, self.smoothing)
        return images, labels
