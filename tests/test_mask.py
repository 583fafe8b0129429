"""Tissue masks (issue 12): tiles outside the mask do not run, blocks outside it write no chunks,
inside it the output is bit for bit a run without a mask; the auto mask never skips the project's
real sections and skips nearly all of an empty region."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import zarr

import tilefeet
from tilefeet.convert import write_image, write_labels
from tilefeet.mask import TissueMask, tissue_cells

from .conftest import isbi_montage
from .helpers import assert_one_line_error, run_cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "em"
KW = dict(chunk_size=128, block_size=256, output_dtype="float32", batch_size=2, threads=1)


def half_empty(kind: str) -> np.ndarray:
    """The held-out montage with its right half replaced by resin: constant, or white noise."""
    img = isbi_montage(2, 4)[0].copy()  # 1024 × 2048
    if kind == "constant":
        img[:, 1024:] = 118
    else:
        img[:, 1024:] = np.clip(np.random.default_rng(0).normal(150, 20, (1024, 1024)), 0, 255).astype(np.uint8)
    return img


@pytest.mark.parametrize("kind", ["constant", "noise"])
def test_inside_the_mask_the_bits_are_those_of_a_run_without_one(tmp_path, random_engine, kind):
    src = write_image(half_empty(kind), tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=256)
    run = tilefeet.plan_segmentation(src, random_engine, mask="auto", **KW)
    s = run.plan.summary()
    assert s["area_skipped"] > 0.4 and s["tiles_skipped"] > 0.3  # most of the empty half
    assert "not tissue" in run.describe()
    masked = tilefeet.write_planned(run, tmp_path / "m.ome.zarr")
    plain = tilefeet.segment_to_zarr(src, tmp_path / "p.ome.zarr", random_engine, **KW)
    a, b = zarr.open_group(str(masked), mode="r"), zarr.open_group(str(plain), mode="r")
    keep = run.plan.kept_pixels(run.plan.blocks.box(0, 0).hull(run.plan.blocks.box(*[n - 1 for n in run.plan.blocks.counts])))
    assert keep is not None and 0.4 < 1 - keep.mean() < 0.5
    for name in ("0", "labels/membrane/0"):
        x, y = a[name][:], b[name][:]
        np.testing.assert_array_equal(x[..., keep], y[..., keep])
        assert not x[..., ~keep].any()  # outside: the fill value
    # Blocks wholly outside wrote no chunks (they read as the fill value).
    outside = [b for b in run.plan.blocks if not run.plan.block_active(*b)]
    assert outside
    chunks = {p.relative_to(masked / "0" / "c").parts for p in (masked / "0" / "c").rglob("*") if p.is_file()}
    for by, bx in outside:
        box = run.plan.blocks.box(by, bx)
        assert ("0", str(box.y0 // 128), str(box.x0 // 128)) not in chunks
    meta = a.attrs["ome"]["multiscales"][0]["metadata"]
    assert meta["blocks_outside_mask"] == len(outside) and meta["mask"]["mask"] == "auto"


def test_lazy_segment_with_a_mask_is_bit_identical_across_block_sizes(tmp_path, random_engine):
    src = write_image(half_empty("noise"), tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=256)
    ref = tilefeet.segment(src, random_engine, mask="auto", **{**KW, "block_size": 128}).values
    for block in (256, 1024):
        np.testing.assert_array_equal(tilefeet.segment(src, random_engine, mask="auto", **{**KW, "block_size": block}).values, ref)


def _real_sections():
    import imageio.v3 as iio
    import tifffile

    yield "isbi", isbi_montage(2, 3)[0], 4.0
    for folder in ("test", "train"):
        files = sorted(glob.glob(str(SHARED / "lucchi" / folder / "slices" / "*.png")))[:4]
        if len(files) == 4:
            s = [iio.imread(f) for f in files]
            yield f"lucchi {folder}", np.block([[s[0], s[1]], [s[2], s[3]]]), 5.0
    for name, px in (("HR_2nm.tif", 2.0), ("LR_8nm.tif", 8.0)):
        if (SHARED / "pssr" / name).exists():
            yield f"pssr {px:g} nm", tifffile.imread(SHARED / "pssr" / name), px
    local = sorted((Path(__file__).parent / "data" / "lucchi" / "image").glob("*.png"))
    yield "lucchi (tests/data)", np.concatenate([iio.imread(p) for p in local], axis=1), 5.0


def test_the_auto_mask_skips_nothing_of_real_sections(tmp_path, random_engine):
    for name, img, px in _real_sections():
        src = write_image(img, tmp_path / f"{name.replace(' ', '-')}.ome.zarr", (px, px), chunk=256)
        s = tilefeet.plan_segmentation(src, random_engine, mask="auto").plan.summary()
        assert s["area_skipped"] == 0 and s["tiles_skipped"] == 0, name


def test_tissue_decision_on_cell_statistics():
    """Pure: a flat or white-noise region larger than a tile is empty, a small flat patch is not."""
    rng = np.random.default_rng(1)
    means = rng.normal(120, 10, (64, 64))  # tissue: means vary from cell to cell
    stds = np.full((64, 64), 30.0)
    diffs = np.full((64, 64), 30.0)  # correlated: neighbour differences well below sqrt(2) * std
    means[:, 40:], stds[:, 40:], diffs[:, 40:] = 118.0, 0.0, 0.0  # resin, constant
    means[10:13, 10:13], stds[10:13, 10:13], diffs[10:13, 10:13] = 118.0, 0.0, 0.0  # a small flat patch in tissue
    t = tissue_cells(means, stds, diffs, 1024, min_empty=256)
    assert t[:, :38].all() and not t[:, 44:].any()


def test_mask_from_a_label_image_of_another_shape(tmp_path, capsys, random_engine):
    img = half_empty("constant")
    src = write_image(img, tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=256)
    coarse = np.zeros((64, 128), np.uint8)
    coarse[:, :64] = 1  # the left half, at 16× coarser pixels (64 nm), with its pixel size
    mask_img = write_image(coarse, tmp_path / "mask.ome.zarr", (64.0, 64.0), chunk=64)
    run = tilefeet.plan_segmentation(src, random_engine, mask=str(mask_img), **KW)
    keep = run.plan.kept_pixels(run.plan.blocks.box(0, 0).hull(run.plan.blocks.box(3, 7)))
    assert keep is not None and keep[:, :1000].all() and not keep[:, 1100:].any()
    empty = write_image(np.zeros((64, 128), np.uint8), tmp_path / "empty.ome.zarr", (64.0, 64.0), chunk=64)
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--mask", empty)
    assert_one_line_error(code, err, "marks no tissue")
    labels = write_labels(np.zeros(img.shape, np.uint8), src, "tissue")
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--mask", labels)
    assert_one_line_error(code, err, "marks no tissue")
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--mask", tmp_path / "nope.ome.zarr")
    assert_one_line_error(code, err, "nope.ome.zarr", "does not exist")


def test_a_mask_pickles_small_and_equal():
    import pickle

    from tilefeet.resolution import Grid

    m = TissueMask(np.eye(40, dtype=bool), Grid((40, 40), (128.0, 128.0), (60.0, 60.0)))
    back = pickle.loads(pickle.dumps(m))
    assert back.token() == m.token() and not back.cells.flags.writeable
