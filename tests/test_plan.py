"""The plan (pure): automatic block size, the fingerprint that resume and dask keys rely on, block geometry."""

from __future__ import annotations

import numpy as np
import pytest

from tilefeet.errors import ConfigError
from tilefeet.image import ImageMeta, Level
from tilefeet.intensity import Normalization, make_intensity_map
from tilefeet.plan import EngineSpec, block_size, make_plan
from tilefeet.settings import Settings

ENGINE = EngineSpec("e", "/e", (4.0, 4.0), ("membrane",), 16, 200, 256, 32, "fp")
IDENTITY = make_intensity_map("bundle", Normalization(), None, dtype=np.dtype("uint8"))


def _meta(shape=(3000, 2000), px=(4.0, 4.0), token="") -> ImageMeta:
    return ImageMeta("mem", (Level("0", shape, (512, 512), px),), "uint8", 2, "0.5", token=token)


@pytest.mark.parametrize("zoom,expected", [(1.0, 4096), (1.25, 4096), (2.0, 3072), (4.0, 1024), (16.0, 1024)])
def test_the_automatic_block_keeps_a_blocks_network_pixels_bounded(zoom, expected):
    assert block_size(Settings(), (zoom, zoom)) == (expected, expected)


def test_an_explicit_block_too_large_for_the_scale_is_refused_with_one_that_fits():
    with pytest.raises(ConfigError, match="--block-size 1024"):
        block_size(Settings(block_size=(4096, 4096)), (6.0, 6.0))


def test_the_fingerprint_holds_what_changes_bits_and_nothing_else():
    base = make_plan(_meta(), ENGINE, Settings(), IDENTITY).fingerprint()
    assert make_plan(_meta(), ENGINE, Settings(blocks_in_flight=7, device="cpu", tile_cache_mb=0), IDENTITY).fingerprint() == base
    for other in (Settings(threshold=0.4), Settings(blend="cosine"), Settings(tta=2)):
        assert make_plan(_meta(), ENGINE, other, IDENTITY).fingerprint() != base
    assert make_plan(_meta(token="a"), ENGINE, Settings(), IDENTITY).fingerprint() != make_plan(_meta(token="b"), ENGINE, Settings(), IDENTITY).fingerprint()


def test_plan_settings_are_concrete():
    s = make_plan(_meta(), ENGINE, Settings(), IDENTITY).settings
    assert s.tile == (256, 256) and s.overlap == (32, 32) and s.block_size == (4096, 4096) and s.tta == 1


@pytest.mark.parametrize("px", [(4.0, 4.0), (5.0, 5.0), (2.5, 3.0)])
def test_each_block_reads_what_its_pixels_need(px):
    plan = make_plan(_meta((1000, 900), px), ENGINE, Settings(block_size=(256, 256), chunk_size=(128, 128)), IDENTITY)
    covered = np.zeros(plan.output.shape, int)
    for by, bx in plan.blocks:
        geo = plan.block(by, bx)
        covered[geo.out_box.y0 : geo.out_box.y1, geo.out_box.x0 : geo.out_box.x1] += 1
        assert geo.net_box.contains(geo.need)
        tiles = [plan.lattice.tile_box(iy, ix) for iy in geo.tiles[0] for ix in geo.tiles[1]]
        assert all(not t.intersect(geo.need).empty for t in tiles)
    assert (covered == 1).all()
