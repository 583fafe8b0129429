"""Units, level choice, grids and plans under scale: property tests of resolution normalization."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tilefeet.engine import Normalization
from tilefeet.errors import UnitError
from tilefeet.geometry import resample_taps
from tilefeet.image import ImageMeta, Level
from tilefeet.intensity import make_intensity_map
from tilefeet.plan import EngineSpec, make_plan
from tilefeet.resolution import Grid, choose_level, network_grid
from tilefeet.settings import Settings
from tilefeet.units import nm_per_unit, parse_length_nm, parse_pixel_size

sizes = st.floats(0.05, 500.0, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize(
    "text,nm",
    [("4nm", 4.0), ("4 nm", 4.0), ("0.004um", 4.0), ("0.004 µm", 4.0), ("0.004μm", 4.0), ("40Å", 4.0), ("40 angstrom", 4.0),
     ("4e-9m", 4.0), ("4", 4.0), ("4.0 nanometers", 4.0), ("0.000004mm", 4.0), (4, 4.0)],
)
def test_parse_length(text, nm):
    assert parse_length_nm(text) == pytest.approx(nm)


@pytest.mark.parametrize("text", ["4 parsec", "nm", "", "-4nm", "0nm", "four nm", "4 nm nm"])
def test_parse_length_rejects(text):
    with pytest.raises(UnitError):
        parse_length_nm(text)


@given(sizes, st.sampled_from(["nm", "um", "Å", "micrometer", "nanometer", "angstrom", "pm"]))
def test_unit_round_trip(value_nm, unit):
    text = f"{value_nm / nm_per_unit(unit)!r}{unit}"
    assert parse_length_nm(text) == pytest.approx(value_nm, rel=1e-9)


def test_parse_pixel_size_anisotropic():
    assert parse_pixel_size("5,4nm") == (5.0, 4.0)
    assert parse_pixel_size("5nm,0.004um") == pytest.approx((5.0, 4.0))
    assert parse_pixel_size("4nm") == (4.0, 4.0)
    assert parse_pixel_size((6, 3)) == (6.0, 3.0)
    with pytest.raises(UnitError):
        parse_pixel_size("1,2,3nm")


@given(sizes, st.integers(1, 8), st.floats(1.2, 3.0), sizes)
def test_choose_level_is_closest_not_coarser(base, n_levels, factor, target):
    """The chosen level is never coarser than the target unless every level is; among the others it is the coarsest."""
    levels = [(base * factor**k, base * factor**k) for k in range(n_levels)]
    k = choose_level(levels, (target, target), tolerance=0.0)
    finer = [i for i, (py, _) in enumerate(levels) if py <= target]
    if finer:
        assert levels[k][0] <= target and k == max(finer)
    else:
        assert k == 0


@given(sizes, sizes, st.integers(1, 5000), st.integers(1, 5000))
def test_network_grid_covers_the_same_extent(px0, target, h, w):
    g0 = Grid((h, w), (px0, px0), (px0 / 2, px0 / 2))
    net = network_grid(g0, g0, (target, target))
    for a in (0, 1):
        (s0, e0), (s1, e1) = g0.extent_nm[a], net.extent_nm[a]
        assert s1 == pytest.approx(s0)
        if e0 - s0 >= target / 2:  # at least half a network pixel: the ends within half a pixel
            assert abs(e1 - e0) <= target / 2 + 1e-6 * e0
        else:  # less: one network pixel
            assert net.shape[a] == 1


@given(sizes, sizes, st.integers(1, 3000))
def test_grid_maps_round_trip_through_the_network_grid(px0, target, n):
    g0 = Grid((n, n), (px0, px0), (0.0, 0.0))
    net = network_grid(g0, g0, (target, target), tolerance=0.0)
    there, back = g0.map_to(net), net.map_to(g0)
    a = np.array([0.0, n / 3, n - 1.0])
    np.testing.assert_allclose(back.y(there.y(a)), a, atol=1e-6 * n)
    # Physical coordinates agree: pixel i of grid 0 maps to where its centre is in the network grid.
    np.testing.assert_allclose(net.origin_nm[0] + there.y(a) * target, g0.origin_nm[0] + a * px0, rtol=1e-9, atol=1e-6)


def _meta(shape, px, n_levels=1):
    levels = tuple(
        Level(str(k), (-(-shape[0] // 2**k), -(-shape[1] // 2**k)), (256, 256), (px[0] * 2**k, px[1] * 2**k),
              (px[0] * (2**k - 1) / 2, px[1] * (2**k - 1) / 2))
        for k in range(n_levels)
    )
    return ImageMeta("mem", levels, "uint8", 2, "0.5")


ENGINE = EngineSpec("e", "/nonexistent", (4.0, 4.0), ("membrane",), 16, 200, 128, 32)
IDENTITY = make_intensity_map("bundle", Normalization(), None, dtype=np.dtype("uint8"))


@pytest.mark.filterwarnings("ignore::tilefeet.plan.PixelSizeWarning")  # 8× off and more warns; tested in test_cli
@given(st.floats(0.5, 40.0), st.integers(1, 6), st.integers(64, 4000), st.sampled_from(["input", "network"]))
@settings(max_examples=150, deadline=None)
def test_plan_reads_the_right_level_and_every_block_reads_inside_its_halo(px, n_levels, n, grid):
    meta = _meta((n, n), (px, px), n_levels)
    plan = make_plan(meta, ENGINE, Settings(chunk_size=(128, 128), block_size=(256, 256), output_grid=grid), IDENTITY)
    lv = meta.levels[plan.level].pixel_size_nm[0]
    # the coarsest level not coarser than the engine's 4 nm (1 % tolerance), or level 0 when all are
    not_coarser = [k for k, level in enumerate(meta.levels) if level.pixel_size_nm[0] <= 4.0 * 1.01]
    assert plan.level == max(not_coarser, default=0)
    assert plan.output.shape == (plan.network.shape if grid == "network" else (n, n))
    f = plan.summary()["scale_factor"][0]
    assert f == pytest.approx(lv / plan.network.pixel_size_nm[0])
    for by, bx in list(plan.blocks)[:4]:
        geo = plan.block(by, bx)
        assert geo.net_box.contains(geo.need)
        if plan.resamples_input:  # the source read covers every tap of every network pixel
            iy, _ = resample_taps(geo.net_box.y0, geo.net_box.y1, plan.src_from_net.y)
            assert geo.src_box.y0 <= iy.min() and iy.max() < geo.src_box.y1


def test_dry_run_reports_level_and_factor():
    plan = make_plan(_meta((4000, 4000), (2.0, 2.0), 3), ENGINE, Settings(), IDENTITY)
    assert plan.level == 1 and not plan.resamples_input  # the 4 nm level is read as is
    plan = make_plan(_meta((4000, 4000), (2.5, 2.5), 3), ENGINE, Settings(), IDENTITY)
    assert plan.level == 0 and plan.summary()["scale_factor"][0] == pytest.approx(0.625)
    text = plan.describe()
    assert "read        level 0" in text and "× 0.625" in text
    plan = make_plan(_meta((4000, 4000), (5.0, 5.0), 3), ENGINE, Settings(), IDENTITY)
    assert plan.level == 0 and "× 1.25" in plan.describe()


def test_with_pixel_size_keeps_level_ratios():
    meta = _meta((1000, 1000), (4.0, 4.0), 3).with_pixel_size((5.0, 2.5))
    assert meta.levels[2].pixel_size_nm == (20.0, 10.0)
    assert meta.levels[1].origin_nm == pytest.approx((2.5, 1.25))


@given(st.floats(1.0, 10.0), st.floats(1.0, 10.0))
def test_anisotropic_pixels_resample_each_axis_on_its_own(py, px):
    assume(not math.isclose(py, px))
    plan = make_plan(_meta((500, 500), (py, px)), ENGINE, Settings(), IDENTITY)
    assert plan.src_from_net.y.scale == pytest.approx(4.0 / py)
    assert plan.src_from_net.x.scale == pytest.approx(4.0 / px)
