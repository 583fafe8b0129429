"""Reading sections: reflection at the borders, in-memory arrays (tokens, chunks), and what cannot be read."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from tilefeet.errors import InputNotFoundError, InvalidImageError
from tilefeet.geometry import Box
from tilefeet.image import Image, Region

RNG = np.random.default_rng(0)
ARRAY = RNG.integers(0, 255, (37, 51)).astype(np.uint8)


@settings(max_examples=60, deadline=None)
@given(st.integers(-80, 60), st.integers(-90, 70), st.integers(1, 90), st.integers(1, 100))
def test_reads_beyond_the_border_are_symmetric_reflections(y0, x0, h, w):
    img = Image.from_array(ARRAY, 4.0)
    box = Box(y0, x0, y0 + h, x0 + w)
    pad = 400
    ref = np.pad(ARRAY, pad, mode="symmetric")[pad + y0 : pad + y0 + h, pad + x0 : pad + x0 + w]
    np.testing.assert_array_equal(img.read(0, box), ref)
    hull = img.hull(0, box)
    np.testing.assert_array_equal(Region(0, hull, img.read(0, hull), ARRAY.shape).read(0, box), ref)


def test_in_memory_arrays_are_told_apart_by_content_and_travel_in_chunks():
    a, b = Image.from_array(ARRAY, 4.0), Image.from_array(ARRAY.copy(), 4.0)
    c = Image.from_array(ARRAY + 1, 4.0)
    assert a.meta.token == b.meta.token != c.meta.token
    big = Image.from_array(np.zeros((3000, 2500), np.uint8), 4.0)
    assert big.meta.levels[0].chunks == (1024, 1024)
    import pickle

    assert pickle.loads(pickle.dumps(big))._arrays == []  # arrays never travel with the image


def test_what_cannot_be_read_is_one_clear_error(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        Image.open(tmp_path / "missing.ome.zarr")
    zarr.create_array(str(tmp_path / "bare.zarr"), shape=(4, 4), dtype="uint8")
    with pytest.raises(InvalidImageError, match="bare Zarr array"):
        Image.open(tmp_path / "bare.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(InvalidImageError, match="no OME-Zarr 'multiscales'"):
        Image.open(tmp_path / "plain.zarr")
    with pytest.raises(InvalidImageError, match="2 planes along its axis 0"):
        Image.from_array(np.zeros((2, 3, 8, 8)), 4.0)  # a (z, y, x) array is a stack; one more axis is not
