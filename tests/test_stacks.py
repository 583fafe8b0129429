"""Stacks of sections (z, y, x): every section through the same global 2-D lattice, each section's
output bit-identical to segmenting it alone, for any block size in y/x and any block depth in z;
valid NGFF 0.5 (c, z, y, x) with a pyramid in y and x only; --z, resume, masks, TTA, lazy API."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import zarr

import tilefeet
from tilefeet.convert import write_image
from tilefeet.errors import ConfigError, TilefeetError

from .conftest import isbi_slices

DZ = 50.0  # nm between sections (serial-section TEM)


@pytest.fixture(scope="module")
def planes():
    """Three real ISBI slices cut to 384 × 448 (not a multiple of the chunks: edge blocks are partial)."""
    return np.stack([s[:384, :448] for s in isbi_slices()[0][:3]])


@pytest.fixture
def stack(tmp_path, planes):
    return write_image(planes, tmp_path / "stack.ome.zarr", (4.0, 4.0), chunk=128, z_spacing_nm=DZ)


def _alone(tmp_path, plane, engine, k, **kw):
    src = write_image(plane, tmp_path / f"alone{k}.ome.zarr", (4.0, 4.0), chunk=256)
    out = tilefeet.segment_to_zarr(src, tmp_path / f"alone{k}-seg.ome.zarr", engine, **kw)
    return zarr.open_group(str(out), mode="r")


KW = dict(tile=128, overlap=32, chunk_size=64)


def test_each_section_is_bit_identical_to_segmenting_it_alone(tmp_path, stack, planes, random_engine):
    out = tilefeet.segment_to_zarr(stack, tmp_path / "seg.ome.zarr", random_engine, block_size=128, block_depth=2, **KW)
    got = zarr.open_group(str(out), mode="r")
    assert got["0"].shape == (1, 3, 384, 448) and got["labels/membrane/0"].shape == (3, 384, 448)
    assert got["1"].shape == (1, 3, 192, 224) and got["labels/membrane/1"].shape == (3, 192, 224)  # y, x only
    for k in range(3):
        alone = _alone(tmp_path, planes[k], random_engine, k, block_size=256, **KW)  # another block size too
        for level in ("0", "1"):
            np.testing.assert_array_equal(got[level][:, k], alone[level][:], err_msg=f"section {k} level {level}")
            np.testing.assert_array_equal(got[f"labels/membrane/{level}"][k], alone[f"labels/membrane/{level}"][:])


@pytest.mark.parametrize("depth, block", [(1, 64), (3, 192)])
def test_any_block_shape_gives_the_same_bits(tmp_path, stack, random_engine, depth, block):
    ref = zarr.open_group(str(tilefeet.segment_to_zarr(stack, tmp_path / "a.ome.zarr", random_engine, block_size=448, **KW)), mode="r")
    out = tilefeet.segment_to_zarr(stack, tmp_path / "b.ome.zarr", random_engine, block_size=block, block_depth=depth, **KW)
    got = zarr.open_group(str(out), mode="r")
    for name in ("0", "1", "2", "labels/membrane/0", "labels/membrane/2"):
        np.testing.assert_array_equal(got[name][:], ref[name][:], err_msg=name)


def test_output_is_valid_ngff_with_z_in_nanometres(tmp_path, stack, random_engine):
    from ome_zarr_models.v05 import Image, ImageLabel

    out = tilefeet.segment_to_zarr(stack, tmp_path / "seg.ome.zarr", random_engine, z_range="1:3", **KW)
    Image.from_zarr(zarr.open_group(str(out), mode="r"))
    ImageLabel.from_zarr(zarr.open_group(str(out / "labels" / "membrane"), mode="r"))
    ms = json.loads((out / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"] and ms["axes"][1]["unit"] == "nanometer"
    for k, ds in enumerate(ms["datasets"]):
        scale, shift = ds["coordinateTransformations"][0]["scale"], ds["coordinateTransformations"][1]["translation"]
        assert scale[:2] == [1.0, DZ] and scale[2:] == [4.0 * 2**k] * 2 and shift[1] == DZ  # --z 1:3 starts at section 1
    lab = json.loads((out / "labels" / "membrane" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert [a["name"] for a in lab["axes"]] == ["z", "y", "x"]
    from tilefeet.image import Image as TImage

    meta = TImage.open(out, stacks=True).meta
    assert meta.is_stack and meta.depth == 2 and meta.z_spacing_nm == DZ and meta.z_origin_nm == DZ


def test_z_selects_sections_and_they_equal_the_full_runs(tmp_path, stack, random_engine):
    full = zarr.open_group(str(tilefeet.segment_to_zarr(stack, tmp_path / "full.ome.zarr", random_engine, **KW)), mode="r")
    part = zarr.open_group(str(tilefeet.segment_to_zarr(stack, tmp_path / "part.ome.zarr", random_engine, z_range="1:", **KW)), mode="r")
    np.testing.assert_array_equal(part["0"][:], full["0"][:, 1:])
    with pytest.raises(ConfigError, match=r"outside the stack.*sections 0 to 2"):
        tilefeet.plan_segmentation(stack, random_engine, z_range="2:5", **KW)


def test_tta_uncertainty_and_mask_on_a_stack_equal_each_section_alone(tmp_path, stack, planes, random_engine):
    opts = dict(tta=2, uncertainty=True, mask="auto", **KW)
    got = zarr.open_group(str(tilefeet.segment_to_zarr(stack, tmp_path / "seg.ome.zarr", random_engine, **opts)), mode="r")
    assert got["uncertainty/0"].shape == (3, 384, 448)
    for k in (0, 2):
        alone = _alone(tmp_path, planes[k], random_engine, k, **opts)
        np.testing.assert_array_equal(got["0"][:, k], alone["0"][:])
        np.testing.assert_array_equal(got["uncertainty/0"][k], alone["uncertainty/0"][:])


def test_lazy_api_returns_c_z_y_x_with_z_coordinates(stack, planes, random_engine, tmp_path):
    arr = tilefeet.segment(stack, random_engine, **KW)
    assert arr.dims == ("c", "z", "y", "x") and arr.shape == (1, 3, 384, 448)
    np.testing.assert_allclose(arr.coords["z"].values, [0.0, DZ, 2 * DZ])
    written = zarr.open_group(str(tilefeet.segment_to_zarr(stack, tmp_path / "s.ome.zarr", random_engine, **KW)), mode="r")
    np.testing.assert_array_equal(np.round(arr.values * 255).astype(np.uint8), written["0"][:])
    # a numpy (z, y, x) stack: the same sections, z in section numbers without a spacing
    mem = tilefeet.segment(planes, random_engine, pixel_size_nm="4nm", **KW)
    assert mem.dims == ("c", "z", "y", "x") and mem.coords["z"].attrs["units"] == "section"
    np.testing.assert_array_equal(mem.values, arr.values)


def test_an_interrupted_stack_resumes_to_the_same_bits(tmp_path, stack, random_engine, monkeypatch):
    import tilefeet.schedule

    kw = dict(block_size=128, blocks_in_flight=1, **KW)
    ref = zarr.open_group(str(tilefeet.segment_to_zarr(stack, tmp_path / "ref.ome.zarr", random_engine, **kw)), mode="r")
    original, written = tilefeet.schedule._write_block, []

    def failing(*args, **kwargs):
        if len(written) == 7:
            raise KeyboardInterrupt
        written.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tilefeet.schedule, "_write_block", failing)
    out = tmp_path / "out.ome.zarr"
    with pytest.raises((KeyboardInterrupt, TilefeetError)):
        tilefeet.segment_to_zarr(stack, out, random_engine, **kw)
    assert (tmp_path / "out.ome.zarr.partial").is_dir()
    monkeypatch.setattr(tilefeet.schedule, "_write_block", original)
    got = zarr.open_group(str(tilefeet.segment_to_zarr(stack, out, random_engine, resume=True, **kw)), mode="r")
    for name in ("0", "1", "labels/membrane/0"):
        np.testing.assert_array_equal(got[name][:], ref[name][:], err_msg=name)


def test_cli_on_a_stack_and_its_edges(tmp_path, stack, random_engine, capsys):
    from tilefeet.cli import main

    out = tmp_path / "cli.ome.zarr"
    assert main(["-q", "segment", str(stack), str(out), "-e", str(random_engine.path), "--tile", "128", "--overlap", "32",
                 "--chunk-size", "64", "--z", "0:2", "--block-depth", "2", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "sections    2 of the stack's 3 (z 0:2), 50 nm apart" in plan and "× 2 sections, 2 per task" in plan
    assert main(["-q", "segment", str(stack), str(out), "-e", str(random_engine.path), "--z", "7"]) == 2
    assert "outside the stack" in capsys.readouterr().err
    assert main(["info", str(stack)]) == 0
    assert "a stack of 3 sections, 50 nm apart" in capsys.readouterr().out


def test_convert_records_the_section_spacing_or_warns(tmp_path, planes, capsys):
    import imageio.v3 as iio

    from tilefeet.cli import main
    from tilefeet.image import Image

    folder = tmp_path / "slices"
    folder.mkdir()
    for k, p in enumerate(planes):
        iio.imwrite(folder / f"s{k:03d}.png", p)
    assert main(["-q", "convert", str(folder), str(tmp_path / "a.ome.zarr"), "--stack", "--pixel-size", "50,4,4nm"]) == 0
    assert Image.open(tmp_path / "a.ome.zarr", stacks=True).meta.z_spacing_nm == 50.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["-q", "convert", str(folder), str(tmp_path / "b.ome.zarr"), "--stack", "--pixel-size", "4nm"]) == 0
    err = capsys.readouterr().err
    assert "no section spacing given" in err + " ".join(str(w.message) for w in caught)
    assert Image.open(tmp_path / "b.ome.zarr", stacks=True).meta.z_spacing_nm == 4.0


@pytest.mark.slow
def test_z_median_is_exact_across_block_depths_and_is_the_median(tmp_path, stack, random_engine):
    """--z-median 3: each probability is the median over the section and its neighbours (reflected at
    the ends), computed from per-section probabilities that do not depend on the block depth."""
    raw = zarr.open_group(str(tilefeet.segment_to_zarr(stack, tmp_path / "raw.ome.zarr", random_engine, **KW)), mode="r")["0"][:]
    outs = [
        zarr.open_group(str(tilefeet.segment_to_zarr(stack, tmp_path / f"m{d}.ome.zarr", random_engine, z_median=3, block_depth=d,
                                                     block_size=b, **KW)), mode="r")
        for d, b in ((1, 128), (2, 448), (3, 64))
    ]
    for o in outs[1:]:
        for name in ("0", "1", "labels/membrane/0"):
            np.testing.assert_array_equal(o[name][:], outs[0][name][:], err_msg=name)
    # the median of the quantized sections is the quantized median (rounding is monotone)
    padded = raw[:, [0, 0, 1, 2, 2]]
    want = np.stack([np.median(padded[:, k : k + 3], axis=1) for k in range(3)], axis=1).astype(np.uint8)
    np.testing.assert_array_equal(outs[0]["0"][:], want)
    assert not np.array_equal(outs[0]["0"][:], raw)
    lazy = tilefeet.segment(stack, random_engine, z_median=3, **KW)
    np.testing.assert_array_equal(np.round(lazy.values * 255).astype(np.uint8), want)


def test_a_tczyx_stack_with_single_t_and_c_reads_as_a_stack(tmp_path, planes, random_engine):
    """bioformats2raw's layout: (t, c, z, y, x) with one time point and one channel."""
    from tilefeet.ngff import create_levels, image_metadata, multiscales

    root = zarr.open_group(str(tmp_path / "tczyx.ome.zarr"), mode="w")
    lead = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}, {"name": "z", "type": "space", "unit": "nanometer"}]
    root.attrs.update(image_metadata(multiscales("tczyx", (4.0, 4.0), 1, lead_axes=lead, lead_scale=[1.0, 1.0, DZ])))
    (arr,) = create_levels(root, [(1, 1, *planes.shape)], chunks=(1, 1, 1, 128, 128), dtype="uint8", dimension_names=list("tczyx"))
    arr[...] = planes[None, None]
    run = tilefeet.plan_segmentation(tmp_path / "tczyx.ome.zarr", random_engine, **KW)
    assert run.plan.is_stack and run.plan.sections == (0, 1, 2) and run.image.meta.z_spacing_nm == DZ
    lazy = tilefeet.segment(tmp_path / "tczyx.ome.zarr", random_engine, **KW)
    np.testing.assert_array_equal(lazy.values, tilefeet.segment(planes, random_engine, pixel_size_nm="4nm", **KW).values)


def test_a_stacks_label_image_has_the_stacks_z_spacing(tmp_path, planes):
    from tilefeet.convert import write_labels

    src = write_image(planes, tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=128, z_spacing_nm=DZ)
    write_labels((planes < 100).astype(np.uint8), src, "membrane")
    ms = json.loads((src / "labels" / "membrane" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [DZ, 4.0, 4.0]


def test_a_stack_takes_a_label_image_mask_per_section(tmp_path, stack, planes, random_engine):
    """--mask PATH on a stack: a (z, y, x) label image masks each section by its own plane."""
    from tilefeet.convert import write_labels

    tissue = np.zeros(planes.shape, np.uint8)
    tissue[0, :, :200] = 1
    tissue[1, :, 200:] = 1
    tissue[2] = 1
    write_labels(tissue, stack, "tissue")
    got = zarr.open_group(str(tilefeet.segment_to_zarr(stack, tmp_path / "m.ome.zarr", random_engine, mask=str(stack / "labels" / "tissue"),
                                                       **KW)), mode="r")["0"][0]
    assert got[0, :, 300:].max() == 0 and got[0, :, :150].max() > 0
    assert got[1, :, :100].max() == 0 and got[1, :, 250:].max() > 0
    assert got[2].min() >= 0 and (got[2] > 0).mean() > 0.5
