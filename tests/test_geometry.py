"""Property tests of the pure geometry: lattice coverage, tile lookup, blocks, reflection, resampling taps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilefeet.blend import window
from tilefeet.geometry import AxisMap, BlockGrid, Box, GridMap, TileLattice, reflect_index, resample_taps, tap_count

extents = st.integers(1, 400)
tiles = st.integers(16, 200)


@st.composite
def lattices(draw, fitted=None):
    shape = (draw(extents), draw(extents))
    tile = (draw(tiles), draw(tiles))
    overlap = (draw(st.integers(0, tile[0] - 1)), draw(st.integers(0, tile[1] - 1)))
    return TileLattice(shape, tile, overlap, fitted=draw(st.booleans()) if fitted is None else fitted)


@given(lattices(fitted=True))
@settings(max_examples=300, deadline=None)
def test_fitted_lattice_is_the_fewest_tiles_centred_on_the_image(lat):
    for a in (0, 1):
        n, s, t, h, o = lat.counts[a], lat.stride[a], lat.tile[a], lat.shape[a], lat.origin[a]
        assert (n - 1) * s + t >= h  # covers the image
        fewer = (n - 2) * s + t if n > 1 else 0  # what one tile fewer spans (no tile: nothing)
        assert fewer < h  # does not
        end = o + (n - 1) * s + t
        assert o <= 0 and end >= h and abs(-o - (end - h)) <= 1  # the spare is split evenly


@given(lattices(fitted=False))
@settings(max_examples=200, deadline=None)
def test_kept_regions_partition_the_image(lat):
    """In crop mode every pixel is kept by exactly one tile; each kept region lies inside its tile."""
    cover = np.zeros(lat.shape, dtype=np.int32)
    ny, nx = lat.counts
    img = Box(0, 0, *lat.shape)
    for iy in range(ny):
        for ix in range(nx):
            kept, tile = lat.kept_box(iy, ix), lat.tile_box(iy, ix)
            assert tile.contains(kept)
            k = kept.intersect(img)
            cover[k.y0 : k.y1, k.x0 : k.x1] += 1
    assert (cover == 1).all()


@given(lattices(), st.data())
@settings(max_examples=200, deadline=None)
def test_tiles_touching_matches_brute_force(lat, data):
    """The closed-form lookup finds exactly the tiles whose extent (or kept region) meets a box."""
    h, w = lat.shape
    y0 = data.draw(st.integers(-50, h))
    x0 = data.draw(st.integers(-50, w))
    box = Box(y0, x0, y0 + data.draw(st.integers(1, 300)), x0 + data.draw(st.integers(1, 300)))
    for crop in (False, True) if not lat.fitted else (False,):
        ys, xs = lat.tiles_touching(box, crop=crop)
        ny, nx = lat.counts
        expect = {
            (iy, ix)
            for iy in range(ny)
            for ix in range(nx)
            if not (lat.kept_box(iy, ix) if crop else lat.tile_box(iy, ix)).intersect(box).empty
        }
        assert {(iy, ix) for iy in ys for ix in xs} == expect


@given(lattices())
@settings(max_examples=200, deadline=None)
def test_window_sum_positive_everywhere(lat):
    """Blending never divides by zero: Σw over the lattice is positive at every image pixel."""
    wsum = np.zeros(lat.shape, dtype=np.float64)
    img = Box(0, 0, *lat.shape)
    w = window(lat.tile, "gaussian")
    ny, nx = lat.counts
    for iy in range(ny):
        for ix in range(nx):
            tb = lat.tile_box(iy, ix)
            r = tb.intersect(img)
            wsum[r.y0 : r.y1, r.x0 : r.x1] += w[r.relative_to(tb)]
    assert wsum.min() > 0


@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(16, 600), st.integers(16, 600))
@settings(max_examples=200, deadline=None)
def test_blocks_partition_the_output(h, w, by, bx):
    grid = BlockGrid((h, w), (by, bx))
    assert sum(grid.box(i, j).size for i, j in grid) == h * w
    cy, cx = grid.chunks()
    assert sum(cy) == h and sum(cx) == w and len(cy) * len(cx) == len(grid)


@given(st.integers(1, 50), st.lists(st.integers(-500, 500), min_size=1, max_size=50))
def test_reflect_index_is_symmetric_padding(n, idx):
    idx = np.array(idx)
    got = reflect_index(idx, n)
    assert ((got >= 0) & (got < n)).all()
    # Same as numpy's symmetric pad of arange(n)
    pad = 600
    ref = np.pad(np.arange(n), pad, mode="symmetric")
    assert np.array_equal(got, ref[idx + pad])


@given(
    st.floats(0.1, 8.0),
    st.floats(-20.0, 20.0),
    st.integers(-100, 100),
    st.integers(1, 200),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_resample_taps_weights_and_locality(scale, offset, start, n, antialias):
    amap = AxisMap(scale, offset)
    idx, w = resample_taps(start, start + n, amap, antialias=antialias)
    assert idx.shape == w.shape == (n, tap_count(scale, antialias))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    assert (w >= 0).all()
    # Linear interpolation reproduces ramps exactly: the weighted mean of tap positions is the mapped
    # coordinate. The widened (antialiasing) triangle samples its support unevenly, off by < half a pixel.
    u = np.arange(start, start + n) * scale + offset
    centroid = (idx * w).sum(axis=1)
    if not antialias or scale <= 1:
        np.testing.assert_allclose(centroid, u, atol=1e-4)
    else:
        assert np.abs(centroid - u).max() < 0.5
    assert (np.abs(idx - u[:, None])[w > 0] < max(1.0, scale if antialias else 1.0)).all()


@given(st.integers(-100, 100), st.integers(1, 80), st.integers(0, 80), st.floats(0.2, 5.0), st.floats(-10, 10))
@settings(max_examples=200, deadline=None)
def test_resample_taps_do_not_depend_on_the_range_asked(start, n, cut, scale, offset):
    """A pixel's taps are a function of its global index alone: asking for a sub-range gives the same rows."""
    amap = AxisMap(scale, offset)
    idx, w = resample_taps(start, start + n + cut, amap)
    idx2, w2 = resample_taps(start + cut, start + n + cut, amap)
    assert np.array_equal(idx[cut:], idx2) and np.array_equal(w[cut:], w2)


@given(st.floats(0.05, 20), st.floats(-1e4, 1e4), st.floats(0.05, 20), st.floats(-1e4, 1e4), st.floats(-1e4, 1e4))
def test_grid_maps_round_trip(s1, o1, s2, o2, a):
    m = AxisMap(s1, o1)
    assert m.inverse()(m(a)) == pytest.approx(a, rel=1e-9, abs=1e-6)
    n = AxisMap(s2, o2)
    assert m.then(n)(a) == pytest.approx(n(m(a)), rel=1e-9, abs=1e-6)
    g = GridMap(m, n).inverse().inverse()
    assert (g.y.scale, g.y.offset) == pytest.approx((s1, o1), rel=1e-9, abs=1e-6)
    assert (g.x.scale, g.x.offset) == pytest.approx((s2, o2), rel=1e-9, abs=1e-6)


def test_identity_map_is_an_integer_shift():
    assert AxisMap(1.0, 3.0).is_integer_shift
    assert not AxisMap(1.0, 0.5).is_integer_shift
    assert not AxisMap(1.25, 0.0).is_integer_shift


@pytest.mark.parametrize("kind", ["gaussian", "cosine", "constant"])
def test_windows_positive_symmetric(kind):
    w = window((64, 48), kind)
    assert w.dtype == np.float32 and w.min() > 0 and w.max() == pytest.approx(1.0)
    np.testing.assert_allclose(w, w[::-1, ::-1])
