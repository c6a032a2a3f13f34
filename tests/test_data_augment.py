"""The FFCV pipeline's RandAugment against timm's own: every op pixel for pixel, the level -> argument maps, the
draws of a whole RandAugment; RandomErasing's box and noise."""
import math

import numpy as np
import pytest
from PIL import Image
from timm.data import auto_augment as aa

from timm_optdnn.data import augment
from timm_optdnn.data.rng import RAND_AUGMENT, seed_sample

FILL = (124, 116, 104)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A smooth random 41x57 picture (odd sizes, not a multiple of anything)."""
    small = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((57, 41), Image.BICUBIC))


# (timm op name, its argument, timm's function): every op at two arguments, both signs for the geometric ones
CASES = [("AutoContrast", 0, aa.auto_contrast), ("Equalize", 0, aa.equalize), ("Invert", 0, aa.invert),
         ("Rotate", 23.7, aa.rotate), ("Rotate", -12.0, aa.rotate), ("Posterize", 1, aa.posterize),
         ("Posterize", 4, aa.posterize), ("Solarize", 100, aa.solarize), ("Solarize", 230, aa.solarize),
         ("SolarizeAdd", 77, aa.solarize_add), ("SolarizeAdd", 3, aa.solarize_add), ("Color", 1.6, aa.color),
         ("Color", 0.3, aa.color), ("Contrast", 1.7, aa.contrast), ("Contrast", 0.4, aa.contrast),
         ("Brightness", 1.5, aa.brightness), ("Brightness", 0.5, aa.brightness), ("Sharpness", 1.8, aa.sharpness),
         ("Sharpness", 0.2, aa.sharpness), ("ShearX", 0.27, aa.shear_x), ("ShearX", -0.1, aa.shear_x),
         ("ShearY", -0.2, aa.shear_y), ("ShearY", 0.3, aa.shear_y), ("TranslateXRel", 0.3, aa.translate_x_rel),
         ("TranslateXRel", -0.41, aa.translate_x_rel), ("TranslateYRel", -0.41, aa.translate_y_rel),
         ("TranslateYRel", 0.2, aa.translate_y_rel), ("TranslateX", 9.0, aa.translate_x_abs),
         ("TranslateY", -7.5, aa.translate_y_abs)]


@pytest.mark.parametrize("name,arg,timm_op", CASES, ids=[f"{n}({a})" for n, a, _ in CASES])
def test_op_equals_timm(image, name, arg, timm_op):
    """Bit for bit what timm's op gives through Pillow (bilinear resampling, the mean colour as fill)."""
    ref = np.asarray(timm_op(Image.fromarray(image), *([arg] if arg else []), fillcolor=FILL,
                             resample=Image.BILINEAR))
    out = np.empty_like(image)
    augment.apply_op(augment.OPS.index(name), float(arg), image, out, np.array(FILL, np.uint8))
    assert np.array_equal(out, ref), (name, np.abs(out.astype(int) - ref).max())


def test_posterize_to_no_bits_is_black(image):
    """'PosterizeIncreasing' at magnitude 10 keeps 0 bits, which Pillow >= 12 rejects: black, as older Pillow gave."""
    out = np.empty_like(image)
    augment.apply_op(augment.OPS.index("PosterizeIncreasing"), 0.0, image, out, np.array(FILL, np.uint8))
    assert not out.any()


@pytest.mark.parametrize("name", augment.OPS)
def test_level_to_argument_equals_timm(name):
    """timm's LEVEL_TO_ARG at magnitudes 0..10, up to the random sign timm also draws."""
    hparams = dict(translate_const=100, translate_pct=0.45)
    for level in np.linspace(0, 10, 12):
        ref = aa.LEVEL_TO_ARG[name](level, hparams)[0] if aa.LEVEL_TO_ARG[name] else 0.0
        got = augment.op_argument(augment.OPS.index(name), level, 100.0, 0.45)
        if name.endswith("Increasing") and name[:-10] in ("Color", "Contrast", "Brightness", "Sharpness"):
            either_sign = (max(0.1, 1 + level / 10 * 0.9), max(0.1, 1 - level / 10 * 0.9))
            assert got in tuple(map(pytest.approx, either_sign))
        else:
            assert abs(got) == pytest.approx(abs(ref)), (name, level)


def _draws(spec: dict, image: np.ndarray, n: int) -> list[np.ndarray]:
    """RandAugment of `image` for samples 0..n-1, seeded as the pipeline seeds them."""
    out, indices = [], np.arange(n)
    for i in range(n):
        seed_sample(12345, indices, i, RAND_AUGMENT)
        a, spare = image.copy(), np.empty_like(image)
        in_spare = augment.rand_augment(a, spare, spec["ops"], spec["weights"], spec["num_layers"], spec["prob"],
                                        spec["magnitude"], spec["magnitude_std"], spec["magnitude_max"],
                                        np.array(FILL, np.uint8))
        out.append(spare if in_spare else a)
    return out


def test_rand_augment_applies_timm_ops_at_its_magnitude(image):
    """One op always applied at magnitude 9 (rand-n1-m9-p1.0-inc1): every result is one op of the set at level 9
    (either sign), and 300 samples reach every op."""
    spec = augment.rand_augment_spec("rand-n1-m9-p1.0-inc1")
    candidates = {}
    for name in aa._RAND_INCREASING_TRANSFORMS:
        level_to_arg = aa.LEVEL_TO_ARG[name]
        for sign in (1, -1):
            if level_to_arg is aa._enhance_increasing_level_to_arg:
                args = [max(0.1, 1 + sign * 0.9 * 9 / 10)]
            elif level_to_arg in (aa._rotate_level_to_arg, aa._shear_level_to_arg, aa._translate_rel_level_to_arg):
                args = [abs(level_to_arg(9, {})[0]) * sign]  # timm draws the sign: both ways
            else:
                args = list(level_to_arg(9, {})) if level_to_arg else []
            ref = aa.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=FILL, resample=Image.BILINEAR)
            candidates.setdefault(name, []).append(np.asarray(ref))
    hits = set()
    for out in _draws(spec, image, 300):
        names = [n for n, refs in candidates.items() if any(np.array_equal(out, r) for r in refs)]
        assert names, "a result no op of timm's set gives at magnitude 9"
        hits.update(names)
    assert hits == set(aa._RAND_INCREASING_TRANSFORMS)


def test_rand_augment_probability_and_unsupported_sets(image):
    """DeiT's rand-m9-mstd0.5-inc1 is two layers, each applied with probability 0.5: a quarter of the samples
    come out untouched; timm's weighted set works; sets with ops not implemented here are refused by name."""
    spec = augment.rand_augment_spec("rand-m9-mstd0.5-inc1")
    assert spec["num_layers"] == 2 and spec["prob"] == 0.5 and spec["magnitude_std"] == 0.5
    untouched = np.mean([np.array_equal(out, image) for out in _draws(spec, image, 800)])
    assert 0.19 < untouched < 0.31, untouched  # 0.25, binomial sd 0.015
    weighted = augment.rand_augment_spec("rand-m9-tweights")
    assert weighted["weights"].size == weighted["ops"].size and _draws(weighted, image, 4)
    with pytest.raises(ValueError, match="GaussianBlur.*backend 'torchvision'"):
        augment.rand_augment_spec("rand-m9-t3a")


@pytest.mark.parametrize("channels_last", [True, False])
def test_random_erasing_box(channels_last):
    """timm's RandomErasing ('pixel' mode): one box of 2 %..1/3 of the image, aspect 0.3..3.3, standard normal."""
    h, w, areas = 48, 64, []
    for i in range(200):
        out = np.zeros((h, w, 3) if channels_last else (3, h, w), np.float32)
        seed_sample(7, np.arange(200), i, 2)
        augment.erase(out, h, w, channels_last)
        mask = (out != 0).any(-1 if channels_last else 0)
        ys, xs = np.nonzero(mask)
        box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert mask.sum() == box_h * box_w  # a filled rectangle
        assert 0.3 / 1.1 < box_h / box_w < 1.1 / 0.3
        areas.append(box_h * box_w / (h * w))
        values = out[:, :, 0][mask] if channels_last else out[0][mask]
        assert abs(values.mean()) < 0.5 and 0.6 < values.std() < 1.4
    assert 0.015 < min(areas) and max(areas) < 1 / 3 + 0.02 and 0.12 < np.mean(areas) < 0.24
    assert math.isclose(np.mean(areas), (0.02 + 1 / 3) / 2, abs_tol=0.04)
