"""Intensity normalization: section statistics matched to the engine's training data, once per section."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tilefeet
from tilefeet.convert import write_image
from tilefeet.errors import ConfigError
from tilefeet.intensity import (
    IntensityWarning,
    make_intensity_map,
    mismatch,
    quantiles,
    reference_quantiles,
    training_normalization,
)

from .conftest import isbi_slices


@pytest.fixture(scope="module")
def norm():
    imgs, _ = isbi_slices()
    return training_normalization(imgs[:3])


@pytest.fixture(scope="module")
def section():
    imgs, _ = isbi_slices()
    return imgs[4]


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Kolmogorov–Smirnov distance between two samples."""
    grid = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()), 512)
    ca = np.searchsorted(np.sort(a.ravel()), grid, side="right") / a.size
    cb = np.searchsorted(np.sort(b.ravel()), grid, side="right") / b.size
    return float(np.abs(ca - cb).max())


def test_training_normalization_records_stats_and_histogram(norm):
    imgs, _ = isbi_slices()
    flat = np.concatenate([a.ravel() for a in imgs[:3]]).astype(np.float64)
    assert norm.mean == pytest.approx(flat.mean()) and norm.std == pytest.approx(flat.std())
    assert len(norm.histogram) == 256 and norm.histogram_range == (0.0, 256.0)
    assert sum(norm.histogram) == pytest.approx(1.0)
    np.testing.assert_allclose(reference_quantiles(norm, np.array([0.01, 0.5, 0.99])), np.percentile(flat, [1, 50, 99]), atol=1.5)


def test_lut_equals_direct_application(norm, section):
    for mode in ("bundle", "percentile", "meanstd", "histogram"):
        m = make_intensity_map(mode, norm, section, dtype=section.dtype)
        np.testing.assert_allclose(m.lut(np.uint8)[section], m(section), rtol=1e-6)


def test_bundle_mode_is_the_training_normalization(norm, section):
    m = make_intensity_map("bundle", norm, None, dtype=np.uint8)
    np.testing.assert_allclose(m(section), (section - norm.mean) / norm.std, rtol=1e-5)


@pytest.mark.parametrize("mode", ["percentile", "meanstd", "histogram"])
@pytest.mark.parametrize("gamma", [1.0, 1.4])
def test_adaptive_modes_undo_a_contrast_change(norm, section, mode, gamma):
    """A section with other contrast maps back to nearly the same network input: every adaptive mode
    undoes a linear change (dimmer, offset); only histogram matching also undoes a gamma change."""
    u = section.astype(np.float64) / 255
    changed = np.round(255 * (0.25 + 0.5 * u**gamma)).astype(np.uint8)
    ref = make_intensity_map(mode, norm, section, dtype=np.uint8)(section)
    got = make_intensity_map(mode, norm, changed, dtype=np.uint8)(changed)
    bundle_err = np.abs(make_intensity_map("bundle", norm, None, dtype=np.uint8)(changed) - ref).mean()
    err = np.abs(got - ref).mean()
    limit = 0.15 if (gamma == 1.0 or mode == "histogram") else 0.6
    assert err < limit * bundle_err, (mode, gamma, err, bundle_err)


def test_histogram_mode_matches_the_reference_histogram(norm, section):
    dim = (section // 3 + 40).astype(np.uint8)
    m = make_intensity_map("histogram", norm, dim, dtype=np.uint8)
    matched = m(dim) * norm.std + norm.mean  # back to raw training units
    imgs, _ = isbi_slices()
    training = np.concatenate([a.ravel() for a in imgs[:3]])
    assert _ks(matched, training) < 0.05 < _ks(dim.astype(np.float64), training)


def test_invert_flips_contrast(norm, section):
    inv = (255 - section).astype(np.uint8)
    a = make_intensity_map("percentile", norm, section, dtype=np.uint8)(section)
    b = make_intensity_map("percentile", norm, inv, dtype=np.uint8, invert=True)(inv)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_flat_section_is_a_clear_error(norm):
    with pytest.raises(ConfigError, match="no contrast"):
        make_intensity_map("percentile", norm, np.full((32, 32), 7, np.uint8), dtype=np.uint8)


def test_sixteen_bit_and_float_sections(norm, section):
    for data in (section.astype(np.uint16) * 256, section.astype(np.float32) / 255):
        m = make_intensity_map("percentile", norm, data, dtype=data.dtype)
        ref = make_intensity_map("percentile", norm, section, dtype=np.uint8)(section)
        np.testing.assert_allclose(m(data), ref, atol=0.02)
        lut = m.lut(data.dtype)
        assert (lut is None) == (data.dtype.kind == "f")


def test_statistics_are_per_section_so_blocks_do_not_matter(tmp_path, random_engine):
    """Adaptive normalization with section-wide statistics keeps the output bit-identical across blocks."""
    from .conftest import isbi_montage

    img, _ = isbi_montage(1, 2)
    src = write_image((img // 2 + 60).astype(np.uint8), tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=128)
    kw = dict(intensity="histogram", chunk_size=128, output_dtype="float32")
    a = tilefeet.segment(src, random_engine, block_size=128, **kw).values
    b = tilefeet.segment(src, random_engine, block_size=512, **kw).values
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------- sections that do not look like training


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda s: s.astype(np.float32) / 255, "look nothing like"),  # float in [0, 1], engine trained on 8-bit
        (lambda s: s.astype(np.uint16) * 256, "look nothing like"),  # 16-bit
        (lambda s: np.full_like(s, 7), "no contrast"),
        (lambda s: np.full(s.shape, np.nan, np.float32), "no finite pixel"),
    ],
)
def test_bundle_mode_flags_a_wrong_value_range(norm, section, make, expected):
    data = make(section)
    assert expected in mismatch(make_intensity_map("bundle", norm, data, dtype=data.dtype), data)


def test_what_the_training_data_looks_like_is_not_flagged(norm, section):
    """Real sections in bundle mode, a brightness/contrast change augmentation covers, and any
    range once an adaptive mode matches it."""
    assert mismatch(make_intensity_map("bundle", norm, section, dtype=np.uint8), section) is None
    dimmer = (section * 0.6 + 40).astype(np.uint8)
    assert mismatch(make_intensity_map("bundle", norm, dimmer, dtype=np.uint8), dimmer) is None
    as_float = section.astype(np.float32) / 255
    for mode in ("percentile", "meanstd", "histogram"):
        assert mismatch(make_intensity_map(mode, norm, as_float, dtype=as_float.dtype), as_float) is None


def test_the_warning_reaches_the_user_and_the_fix_works(tmp_path, random_engine, capsys):
    from tilefeet.cli import main

    src = write_image(isbi_slices()[0][0].astype(np.float32) / 255, tmp_path / "f.ome.zarr", (4.0, 4.0), chunk=256)
    with pytest.warns(IntensityWarning, match="--intensity percentile"):
        tilefeet.plan_segmentation(src, random_engine, intensity="bundle")  # asked for: warned
    args = ["-q", "segment", str(src), str(tmp_path / "o.ome.zarr"), "-e", str(random_engine.path)]
    assert main([*args, "--intensity", "bundle"]) == 0
    assert "tilefeet: warning: the section's intensities" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default (auto) matches the values itself: no warning
        # (--no-invert: a random network cannot tell the contrast's polarity, and says so: tests/test_polarity.py)
        run = tilefeet.plan_segmentation(src, random_engine, invert=False)
    assert run.plan.intensity.mode == "percentile" and "differ from the training data" in run.describe()


def test_nan_pixels_are_read_as_the_training_mean(tmp_path, random_engine):
    """A NaN gap in a float section does not spread over the receptive field: the output is
    that of the gap filled with the training mean (network input 0, up to the float32 rounding of
    the mean itself)."""
    img = isbi_slices()[0][0].astype(np.float32)
    holed, filled = img.copy(), img.copy()
    holed[100:140, 200:260] = np.nan
    filled[100:140, 200:260] = random_engine.normalization.mean
    a, b = (tilefeet.segment(x, random_engine, pixel_size_nm="4nm", output_dtype="float32").values for x in (holed, filled))
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
@pytest.mark.parametrize("n", [1, 2, 7, 10_001])
def test_counted_quantiles_are_numpys_bits(dtype, n):
    """Section quantiles of integer data come from counts, not a sort: the same bits as numpy's."""
    info = np.iinfo(dtype)
    a = np.random.default_rng(n).integers(info.min, info.max, n, endpoint=True).astype(dtype)
    q = np.concatenate([[0.0, 0.01, 0.5, 0.99, 1.0], np.linspace(0.002, 0.998, 129)])
    np.testing.assert_array_equal(quantiles(a, q), np.quantile(a.astype(np.float64), q))


def test_float_quantiles_skip_non_finite_values():
    a = np.array([np.nan, 1.0, 2.0, np.inf, 3.0], np.float32)
    np.testing.assert_array_equal(quantiles(a, [0.0, 0.5, 1.0]), [1.0, 2.0, 3.0])
    assert np.isnan(quantiles(np.array([np.nan]), [0.5])).all()
