"""Domain randomization (tilefeet.augment): each group does what it says to a real EM crop, masks move
only with geometry, the same seed gives the same crop, and bad --augment values are one line."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from tilefeet.augment import ALL, GROUPS, parse_augment, randomize
from tilefeet.errors import ConfigError

from .conftest import DATA


@pytest.fixture(scope="module")
def crop() -> tuple[np.ndarray, np.ndarray]:
    img = iio.imread(DATA / "isbi" / "image" / "24.png")[:128, :128].astype(np.float32)
    mask = (iio.imread(DATA / "isbi" / "label" / "24.png")[:128, :128] < 128).astype(np.float32)[None]
    return img, mask


def test_parse_augment():
    assert parse_augment("all") == ALL == GROUPS
    assert parse_augment("all,-elastic") == tuple(g for g in GROUPS if g != "elastic")
    assert parse_augment("noise, BLUR") == ("blur", "noise")  # canonical order, case-insensitive
    assert parse_augment("none") == () and parse_augment("") == ()
    assert parse_augment("legacy") == ("legacy",)
    with pytest.raises(ConfigError, match=r"unknown randomization 'sharpen'.*all,-elastic"):
        parse_augment("all,sharpen")
    with pytest.raises(ConfigError, match="-elastic removes a group that is not on"):
        parse_augment("noise,-elastic")


def _high_frequency(x: np.ndarray) -> float:
    return float(np.abs(np.diff(x, axis=1)).mean())


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "elastic"])
def test_photometric_groups_change_intensities_only(crop, group):
    img, mask = crop
    changed = 0
    for seed in range(8):
        out, m = randomize(img, mask, (group,), np.random.default_rng(seed), top=255.0, probability=1.0)
        assert out.dtype == np.float32 and out.shape == img.shape and out.min() >= 0 and out.max() <= 255
        assert m is mask  # labels are untouched
        changed += not np.allclose(out, img, atol=0.5)
    assert changed >= 4  # each group does something on most crops (some members may draw "none")


def test_blur_smooths_and_noise_roughens(crop):
    img, mask = crop
    for seed in range(8):
        blurred, _ = randomize(img, mask, ("blur",), np.random.default_rng(seed), top=255.0, probability=1.0)
        noisy, _ = randomize(img, mask, ("noise",), np.random.default_rng(seed), top=255.0, probability=1.0)
        assert _high_frequency(blurred) <= _high_frequency(img) + 1e-3
        assert _high_frequency(noisy) >= _high_frequency(img) - 1e-3


def test_elastic_moves_masks_with_the_image(crop):
    _, mask = crop
    img = mask[0] * 200 + 30  # an image that is its own mask: alignment is checkable pixel by pixel
    moved = 0
    for seed in range(6):
        out, m = randomize(img, mask, ("elastic",), np.random.default_rng(seed), top=255.0, probability=1.0)
        assert m.shape == mask.shape and set(np.unique(m)) <= {0.0, 1.0}
        assert np.mean((out > 130) == (m[0] > 0)) > 0.97
        moved += np.mean(m != mask) > 0.01
        assert abs(m.mean() - mask.mean()) < 0.03  # structures keep their area (membranes do not thin out)
    assert moved >= 5


def test_same_seed_same_crop_and_none_is_identity(crop):
    img, mask = crop
    a = randomize(img, mask, ALL, np.random.default_rng(7), top=255.0)
    b = randomize(img, mask, ALL, np.random.default_rng(7), top=255.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    out, m = randomize(img, mask, (), np.random.default_rng(7), top=255.0)
    assert np.array_equal(out, img) and m is mask


def test_legacy_is_the_first_engines_recipe(crop):
    """legacy draws gamma, contrast, brightness, blur and noise in that order from the generator (what
    engines/isbi-membrane was trained with): replaying the draws by hand gives the same crop."""
    from scipy.ndimage import gaussian_filter

    img, mask = crop
    out, _ = randomize(img, mask, ("legacy",), np.random.default_rng(3), top=255.0)
    rng = np.random.default_rng(3)
    u = np.clip(img / 255.0, 0, 1) ** np.exp(rng.uniform(-0.35, 0.35))
    mean = u.mean()
    u = (u - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.3:
        u = gaussian_filter(u, rng.uniform(0.3, 1.2))
    if rng.random() < 0.5:
        u = u + rng.normal(0, rng.uniform(0.0, 0.06), u.shape)
    np.testing.assert_allclose(out, np.clip(u, 0, 1) * 255.0, atol=1e-3)  # same draws (float32 vs float64 rounding)
