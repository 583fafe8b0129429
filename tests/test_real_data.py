"""The bundled isbi-membrane engine on real held-out EM: the F1 its README states, and no seams."""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr

import tilefeet
from tilefeet.convert import write_image

from .conftest import bundled_engine_available, isbi_montage

pytestmark = pytest.mark.skipif(not bundled_engine_available(), reason="engines/isbi-membrane is not in this checkout")

#: The exact recipe behind the number in engines/isbi-membrane/README.md (keep the two in sync).
HELD_OUT_SETTINGS: dict = {}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """The 2 × 3 montage of the six held-out slices, segmented once with the default settings."""
    d = tmp_path_factory.mktemp("heldout")
    img, mem = isbi_montage(2, 3)
    src = write_image(img, d / "heldout.ome.zarr", (4.0, 4.0), chunk=256)
    out = tilefeet.segment_to_zarr(src, d / "seg.ome.zarr", "isbi-membrane", chunk_size=256, block_size=768, **HELD_OUT_SETTINGS)
    pred = zarr.open_group(str(out), mode="r")["labels/membrane/0"][0].astype(bool)
    return src, out, pred, mem.astype(bool)


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = np.sum(pred & truth)
    return float(2 * tp / (pred.sum() + truth.sum()))


def stated_f1() -> float:
    from tilefeet.engine import load_engine

    engine = load_engine("isbi-membrane")
    text = (engine.path / "README.md").read_text()
    m = re.search(r"held-out membrane F1[^0-9]*([0-9.]+)", text, re.I)
    assert m, "engines/isbi-membrane/README.md must state the held-out membrane F1"
    readme = float(m.group(1))
    assert engine.metrics["heldout_f1"] == pytest.approx(readme, abs=5e-4), "engine.toml and README disagree"
    return readme


def test_heldout_f1_matches_the_readme(heldout):
    _, _, pred, truth = heldout
    assert f1(pred, truth) == pytest.approx(stated_f1(), abs=0.01)


def test_evaluate_agrees(heldout):
    from tilefeet.evaluate import evaluate

    _, out, pred, truth = heldout
    ev = evaluate(str(out), truth.astype(np.uint8), class_name="membrane")
    assert ev.pixel.f1 == pytest.approx(f1(pred, truth), abs=1e-9)


def _bands(shape, step: int, width: int = 8) -> np.ndarray:
    """Pixels within ``width`` of the lines y = k·step and x = k·step."""
    m = np.zeros(shape, bool)
    for p in range(step, shape[0], step):
        m[max(p - width, 0) : p + width] = True
    for p in range(step, shape[1], step):
        m[:, max(p - width, 0) : p + width] = True
    return m


def test_no_seams_along_tile_borders(heldout, tmp_path):
    """Pixels where neighbouring tiles meet are no worse than the same pixels in mid-tile.

    Comparing seam bands with "the interior" would compare different image content (membrane
    density varies from place to place by more than any seam). So the section is segmented a second
    time shifted by half a stride, which puts today's seam pixels in the middle of tiles, and the
    error on exactly those pixels is compared.
    """
    from tilefeet.engine import load_engine

    _, _, pred, truth = heldout
    engine = load_engine("isbi-membrane")
    stride = engine.tile - engine.overlap
    half = stride // 2
    img, _ = isbi_montage(2, 3)
    src = write_image(np.pad(img, ((half, 0), (half, 0)), mode="symmetric"), tmp_path / "shifted.ome.zarr", (4.0, 4.0), chunk=256)
    out = tilefeet.segment_to_zarr(src, tmp_path / "shifted-seg.ome.zarr", "isbi-membrane", chunk_size=256, block_size=768, **HELD_OUT_SETTINGS)
    mid = zarr.open_group(str(out), mode="r")["labels/membrane/0"][0, half:, half:].astype(bool)
    seams = _bands(pred.shape, stride)
    on_seam, mid_tile = (pred != truth)[seams].mean(), (mid != truth)[seams].mean()
    assert on_seam <= mid_tile + 0.005, (on_seam, mid_tile)


def test_no_seams_along_block_borders(heldout, tmp_path):
    """Pixels along block borders are exactly as good as in a run with one block (they are the same bits)."""
    src, out, pred, truth = heldout
    whole = tilefeet.segment_to_zarr(src, tmp_path / "whole.ome.zarr", "isbi-membrane", chunk_size=256, block_size=4096, **HELD_OUT_SETTINGS)
    single = zarr.open_group(str(whole), mode="r")["labels/membrane/0"][0].astype(bool)
    borders = _bands(pred.shape, 768)
    assert (pred != truth)[borders].mean() <= (single != truth)[borders].mean()


def test_block_size_changes_nothing_on_real_data(heldout, tmp_path):
    src, out, _, _ = heldout
    whole = tilefeet.segment_to_zarr(src, tmp_path / "whole.ome.zarr", "isbi-membrane", chunk_size=256, block_size=4096, **HELD_OUT_SETTINGS)
    a = zarr.open_group(str(out), mode="r")["0"][:]
    b = zarr.open_group(str(whole), mode="r")["0"][:]
    np.testing.assert_array_equal(a, b)
