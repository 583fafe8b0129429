"""Objects: ids equal to scikit-image's ``label`` of the whole mask and a table equal to its
``regionprops_table``, whatever the block size and chunking; cells equal to the same algorithm on
the whole image; the layer written into a store as a valid NGFF label image with a pyramid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi
from skimage.measure import label, regionprops_table

from tilefeet.ngff import multiscales
from tilefeet.objects import label_objects, write_objects
from tilefeet.objects.store import read_table

PIXEL = 5.0
PROPS = [
    "label", "area", "centroid", "bbox", "perimeter", "equivalent_diameter_area", "axis_major_length",
    "axis_minor_length", "eccentricity", "orientation", "intensity_mean", "intensity_max",
]  # fmt: skip


# ------------------------------------------------------------------------------------- fixtures


def make_output(path: Path, probs: np.ndarray, *, classes=("mitochondrion",), chunk: int = 64, threshold: float = 0.5,
                pixel: float = PIXEL, labels: bool = True, levels: int = 2) -> Path:
    """A store laid out as ``tilefeet segment`` writes it: (c, y, x) uint8 probabilities with named
    classes and the run's threshold in the provenance, ``labels/<class>`` = probabilities ≥ threshold,
    and a pyramid of ``levels`` levels (the coarser ones are only there to be counted)."""
    probs = np.asarray(probs)
    if probs.ndim == 2:
        probs = probs[None]
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for k in range(levels):
        root.create_array(str(k), data=probs[:, :: 2**k, :: 2**k], chunks=(1, chunk, chunk), dimension_names=["c", "y", "x"])
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [multiscales("probabilities", (pixel, pixel), levels, lead_axes=[{"name": "c", "type": "channel"}],
                                    metadata={"method": "tilefeet.segment", "settings": {"threshold": threshold, "output_dtype": "uint8"}})],
        "omero": {"channels": [{"label": c, "color": "FFFFFF"} for c in classes]},
    }
    if labels:
        g = root.create_group("labels")
        g.attrs["ome"] = {"version": "0.5", "labels": list(classes)}
        for i, c in enumerate(classes):
            lab = g.create_group(c)
            for k in range(levels):
                mask = (probs[i, :: 2**k, :: 2**k] >= threshold * 255).astype(np.uint8)
                lab.create_array(str(k), data=mask, chunks=(chunk, chunk), dimension_names=["y", "x"])
            lab.attrs["ome"] = {"version": "0.5", "multiscales": [multiscales(c, (pixel, pixel), levels)],
                                "image-label": {"version": "0.5", "source": {"image": "../../"}}}
    return path


def snake(h: int, w: int, step: int = 4) -> np.ndarray:
    """A 1-px wide serpentine path through the whole image: one object crossing every block."""
    m = np.zeros((h, w), bool)
    rows = list(range(1, h - 1, step))
    for k, y in enumerate(rows):
        m[y, 1 : w - 1] = True
        if k + 1 < len(rows):
            x = w - 2 if k % 2 == 0 else 1
            m[y : rows[k + 1] + 1, x] = True
    return m


def adversarial(h: int = 96, w: int = 144, corner: int = 8) -> np.ndarray:
    """Objects that make blockwise labelling fail: a frame spanning the section, a snake, chains
    touching only diagonally across block corners (every multiple of ``corner``), single pixels on
    block corners, and random noise."""
    rng = np.random.default_rng(7)
    m = np.zeros((h, w), bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True  # spans the whole section
    m[4 : h // 2, 4 : w - 4] |= snake(h // 2 - 4, w - 8)
    for k in range(1, min(h, w) // corner):  # diagonal pairs across block corners: (c-1, c-1) ~ (c, c)
        c = k * corner
        if k % 3 == 0:
            m[c - 1, c - 1] = m[c, c] = True
        elif k % 3 == 1:
            m[c - 1, c] = m[c, c - 1] = True  # the anti-diagonal pair
        else:
            m[c, c] = True  # a single pixel on a corner
    ys, xs = np.mgrid[corner : h - 1 : corner, corner : w - 1 : corner]
    m[ys[::2, ::3], xs[::2, ::3]] = True  # isolated pixels at block corners
    m[h // 2 + 4 :, w // 2 :] |= rng.random((h - h // 2 - 4, w - w // 2)) < 0.45
    return m


def reference(mask: np.ndarray, *, fill: bool = False, min_px: int = 0) -> np.ndarray:
    """The whole-image answer: fill holes, label (8-connected), drop small objects, renumber."""
    m = ndi.binary_fill_holes(mask) if fill else mask
    lab = label(m, connectivity=2)
    if min_px:
        keep = np.bincount(lab.ravel()) >= min_px
        keep[0] = False
        lab = label(keep[lab], connectivity=2)
    return lab


def assert_table_equal(df, lab: np.ndarray, prob: np.ndarray, *, pixel: float = PIXEL, scale: float = 255.0, cls: str | None = None) -> None:
    """The table against ``regionprops_table`` on the whole image (pixel size as spacing)."""
    rp = regionprops_table(lab, intensity_image=prob / scale, spacing=(pixel, pixel), properties=PROPS)
    assert len(df) == len(rp["label"]) == lab.max()
    np.testing.assert_array_equal(df["id"].to_numpy(), rp["label"])
    np.testing.assert_array_equal(df["area_px"].to_numpy(), np.bincount(lab.ravel())[1:])
    np.testing.assert_allclose(df["area_nm2"], rp["area"], rtol=1e-12)
    for i, c in enumerate(["bbox_y0_px", "bbox_x0_px", "bbox_y1_px", "bbox_x1_px"]):
        np.testing.assert_array_equal(df[c].to_numpy(), rp[f"bbox-{i}"])
    np.testing.assert_allclose(df["bbox_y0_nm"], (rp["bbox-0"] - 0.5) * pixel)
    np.testing.assert_allclose(df["bbox_x1_nm"], (rp["bbox-3"] - 0.5) * pixel)
    np.testing.assert_allclose(df["centroid_y_nm"], rp["centroid-0"], rtol=1e-12)
    np.testing.assert_allclose(df["centroid_x_nm"], rp["centroid-1"], rtol=1e-12)
    np.testing.assert_allclose(df["perimeter_nm"], rp["perimeter"], rtol=1e-12)
    np.testing.assert_allclose(df["equivalent_diameter_nm"], rp["equivalent_diameter_area"], rtol=1e-12)
    for mine, theirs in (("major_axis_nm", "axis_major_length"), ("minor_axis_nm", "axis_minor_length"), ("eccentricity", "eccentricity")):
        np.testing.assert_allclose(df[mine], rp[theirs], rtol=1e-9, atol=1e-6)
    turn = np.abs(df["orientation_rad"].to_numpy() - rp["orientation"]) % np.pi  # an axis: θ and θ ± π are one
    assert np.minimum(turn, np.pi - turn).max(initial=0) < 1e-6
    np.testing.assert_allclose(df["mean_probability"], rp["intensity_mean"], rtol=1e-12)
    np.testing.assert_allclose(df["max_probability"], rp["intensity_max"], rtol=1e-12)
    h, w = lab.shape
    np.testing.assert_array_equal(df["touches_border"].to_numpy(),
                                  (rp["bbox-0"] == 0) | (rp["bbox-1"] == 0) | (rp["bbox-2"] == h) | (rp["bbox-3"] == w))
    if cls is not None:
        assert (df["class"] == cls).all()


def probs_for(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 probabilities whose threshold at 0.5 is ``mask``, with varied values on both sides."""
    rng = np.random.default_rng(seed)
    return np.where(mask, rng.integers(128, 256, mask.shape), rng.integers(0, 128, mask.shape)).astype(np.uint8)


# ------------------------------------------------------------------------- exact labels, lazily


@pytest.mark.parametrize("block", [16, 40, 56])
def test_labels_and_table_equal_scikit_image_for_any_block(block):
    rng = np.random.default_rng(block)
    cases = {
        "adversarial": adversarial(96, 144, corner=8),
        "random": rng.random((83, 101)) < 0.5,
        "snake": snake(90, 70, step=3),
        "full": np.ones((50, 61), bool),  # one object spanning every block
        "empty": np.zeros((33, 47), bool),
    }
    for name, mask in cases.items():
        prob = probs_for(mask, block)
        got = label_objects(prob, pixel_size_nm=PIXEL, block_size=block, class_name="mito")
        lab = reference(mask)
        out = got.labels.compute()
        assert out.dtype == np.uint32, name
        np.testing.assert_array_equal(out, lab, err_msg=name)
        assert_table_equal(got.table, lab, prob, cls="mito")


def _pairs_across_corners(m: np.ndarray, block: int) -> set[str]:
    """Which pixel pairs touching only diagonally ("diagonal" ╲, "anti-diagonal" ╱) straddle a corner
    of the block grid: the 2×2 pixels around the corner hold the pair and nothing else."""
    kinds = {(1, 0, 0, 1): "diagonal", (0, 1, 1, 0): "anti-diagonal"}
    return {kinds[q] for cy in range(block, m.shape[0], block) for cx in range(block, m.shape[1], block)
            if (q := tuple(m[cy - 1 : cy + 1, cx - 1 : cx + 1].astype(int).ravel())) in kinds}


def test_corner_blocks_are_where_the_adversarial_pixels_sit():
    """The adversarial mask puts pixel pairs that touch only across a block corner on corners of blocks
    of 8 and 16 (both diagonals) and of 24 and 48 (one); labels equal the whole image's for those blocks
    and for 40 (whose corners hold single pixels)."""
    m = adversarial(96, 144, corner=8)
    for block, kinds in ((8, {"diagonal", "anti-diagonal"}), (16, {"diagonal", "anti-diagonal"}), (24, {"diagonal"}), (48, {"diagonal"})):
        assert _pairs_across_corners(m, block) == kinds, block
    lab = reference(m)
    for block in (8, 16, 24, 40, 48):
        got = label_objects(m, pixel_size_nm=PIXEL, block_size=block).labels.compute()
        np.testing.assert_array_equal(got, lab)


@pytest.mark.parametrize("block", [16, 48])
def test_fill_holes_and_min_size(block):
    rng = np.random.default_rng(3)
    mask = ndi.binary_dilation(rng.random((90, 120)) < 0.02, iterations=3)
    mask[10:40, 10:40] = True
    mask[20:30, 20:30] = False  # a hole, filled
    mask[24:26, 24:26] = True  # an island in the hole: joins the filled object
    mask[45:60, 0:20] = True
    mask[50:55, 0:10] = False  # open to the image edge: not a hole
    prob = probs_for(mask)
    min_px = 30
    got = label_objects(prob, pixel_size_nm=PIXEL, block_size=block, fill_holes=True, min_size=f"{min_px * PIXEL * PIXEL}nm2")
    lab = reference(mask, fill=True, min_px=min_px)
    np.testing.assert_array_equal(got.labels.compute(), lab)
    assert_table_equal(got.table, lab, prob)  # filled holes count in the mean probability, as in regionprops
    assert got.table["area_nm2"].min() >= min_px * PIXEL * PIXEL


def test_min_size_units():
    mask = np.zeros((20, 20), bool)
    mask[1:3, 1:3] = True  # 4 px = 100 nm²
    mask[10:15, 10:15] = True  # 25 px = 625 nm²
    for size, n in (("100nm2", 2), ("101nm²", 1), ("0.000625um2", 1), ("5px", 1), (0, 2), ("626nm2", 0)):
        assert label_objects(mask, pixel_size_nm=PIXEL, min_size=size).n_objects == n, size


def test_ids_switch_to_uint64_past_the_limit():
    mask = np.zeros((40, 40), bool)
    mask[::4, ::4] = True  # 100 single pixels
    got = label_objects(mask, pixel_size_nm=PIXEL, block_size=16, uint32_limit=99)
    assert got.labels.dtype == np.uint64 and got.table["id"].dtype == np.uint64
    np.testing.assert_array_equal(got.labels.compute(), reference(mask))
    assert label_objects(mask, pixel_size_nm=PIXEL, block_size=16, uint32_limit=100).labels.dtype == np.uint32


def test_float_probabilities_and_anisotropic_pixels():
    rng = np.random.default_rng(5)
    prob = ndi.gaussian_filter(rng.random((64, 80)), 2).astype(np.float32)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    got = label_objects(prob, pixel_size_nm=(5.0, 4.0), threshold=0.6, block_size=24)
    lab = reference(prob >= 0.6)
    np.testing.assert_array_equal(got.labels.compute(), lab)
    rp = regionprops_table(lab, intensity_image=prob, spacing=(5.0, 4.0), properties=["area", "centroid", "axis_major_length", "intensity_mean"])
    np.testing.assert_allclose(got.table["area_nm2"], rp["area"])
    np.testing.assert_allclose(got.table["centroid_x_nm"], rp["centroid-1"], rtol=1e-12)
    np.testing.assert_allclose(got.table["major_axis_nm"], rp["axis_major_length"], rtol=1e-9)
    np.testing.assert_allclose(got.table["mean_probability"], rp["intensity_mean"], rtol=1e-6)
    assert got.table["perimeter_nm"].isna().all()  # scikit-image defines it for square pixels only


# ------------------------------------------------------------------------------------- cells


def whole_image_cells(membrane: np.ndarray, steps: int, *, min_px: int = 0, fill: bool = False) -> np.ndarray:
    """The cells algorithm on the whole image, written independently of the package: 4-connected
    seeds of the non-membrane region, then ``steps`` rounds of min-id growth into unassigned pixels."""
    region = ~membrane
    if fill:
        region = ndi.binary_fill_holes(region, structure=np.ones((3, 3)))
    seeds = label(region, connectivity=1)
    if min_px:
        keep = np.bincount(seeds.ravel()) >= min_px
        keep[0] = False
        seeds = label(keep[seeds], connectivity=1)
    lab = seeds.astype(np.int64)
    big = 1 << 40
    for _ in range(steps):
        m = ndi.grey_erosion(np.where(lab > 0, lab, big), size=(3, 3), mode="constant", cval=big)
        grow = (lab == 0) & (m < big)
        lab[grow] = m[grow]
    return lab


def membranes(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.random((h, w)), 2.0)
    return np.abs(field - field.mean()) < 0.25 * field.std()  # thin walls between blobs


@pytest.mark.parametrize("block", [16, 40, 56])
def test_cells_equal_the_whole_image_algorithm(block):
    mem = membranes(90, 110, block)
    prob = probs_for(mem, 1)
    for steps, min_px, fill in ((3, 0, False), (6, 4, True), (0, 0, False)):
        got = label_objects(prob, pixel_size_nm=PIXEL, cells=True, grow=f"{steps * PIXEL}nm", block_size=block,
                            min_size=f"{min_px}px", fill_holes=fill, cell_method="grow")
        assert got.plan.steps == steps
        want = whole_image_cells(mem, steps, min_px=min_px, fill=fill)
        np.testing.assert_array_equal(got.labels.compute(), want)
        assert_table_equal(got.table, want, prob, cls="cell")


# --------------------------------------------------------------------- a store, written out of core


@pytest.mark.parametrize("chunk", [16, 24])
@pytest.mark.parametrize("block", [48, 72, 96])
def test_write_objects_equals_scikit_image_for_block_sizes_and_chunkings(tmp_path, chunk, block):
    if block % chunk:
        block = block // chunk * chunk
    mask = adversarial(100, 150, corner=24)
    mask[60:, :50] |= snake(40, 50, step=3)
    prob = probs_for(mask, 2)
    store = make_output(tmp_path / "seg.ome.zarr", prob, chunk=chunk)
    result = write_objects(store, block_size=block)
    lab = reference(mask)
    root = zarr.open_group(str(store), mode="r")
    got = root["labels/mitochondrion-objects/0"][:]
    assert got.dtype == np.uint32 and got.shape == mask.shape
    np.testing.assert_array_equal(got, lab)
    assert result.n_objects == lab.max()
    assert_table_equal(read_table(result.path), lab, prob, cls="mitochondrion")
    # the pyramid keeps ids (every other pixel), never averages them
    k = 1
    while f"labels/mitochondrion-objects/{k}" in root:
        np.testing.assert_array_equal(root[f"labels/mitochondrion-objects/{k}"][:], root[f"labels/mitochondrion-objects/{k - 1}"][::2, ::2])
        k += 1
    assert k > 1
    assert not (tmp_path / "seg.ome.zarr.mitochondrion-objects.partial").exists()


def test_layer_is_valid_ngff_and_listed(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05 import Image, ImageLabel

    mask = adversarial()
    store = make_output(tmp_path / "seg.ome.zarr", probs_for(mask), chunk=32)
    write_objects(store, block_size=64, cells=False)
    layer = store / "labels" / "mitochondrion-objects"
    ImageLabel.from_zarr(zarr.open_group(str(layer), mode="r"))
    img = Image.from_zarr(zarr.open_group(str(store), mode="r"))
    assert img.labels is not None
    assert zarr.open_group(str(store / "labels"), mode="r").attrs["ome"]["labels"] == ["mitochondrion", "mitochondrion-objects"]
    attrs = zarr.open_group(str(layer), mode="r").attrs["ome"]
    assert attrs["image-label"]["source"]["image"] == "../../"
    meta = attrs["multiscales"][0]["metadata"]
    assert meta["connectivity"] == 8 and meta["objects"] == reference(mask).max() and meta["mask"] == "labels/mitochondrion/0"
    scale = attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [PIXEL, PIXEL]
    nodes = list(Reader(parse_url(str(store)))())
    found = [n for n in nodes if "mitochondrion-objects" in str(n.zarr)]
    assert found and found[0].data[0].shape == mask.shape


def test_another_threshold_reads_the_probabilities(tmp_path):
    rng = np.random.default_rng(11)
    prob = (ndi.gaussian_filter(rng.random((80, 90)), 2) * 255 * 2 - 100).clip(0, 255).astype(np.uint8)
    store = make_output(tmp_path / "seg.ome.zarr", prob, chunk=32)
    result = write_objects(store, threshold=0.3, block_size=32)
    lab = reference(prob >= 0.3 * 255)
    np.testing.assert_array_equal(zarr.open_array(str(result.path / "0"), mode="r")[:], lab)
    meta = zarr.open_group(str(result.path), mode="r").attrs["ome"]["multiscales"][0]["metadata"]
    assert meta["threshold"] == 0.3 and meta["mask"].startswith("probabilities >=")


def test_several_classes_cells_and_csv(tmp_path):
    mem = membranes(80, 100, 4)
    mito = adversarial(80, 100, corner=16)
    probs = np.stack([probs_for(mem, 1), probs_for(mito, 2)])
    store = make_output(tmp_path / "seg.ome.zarr", probs, classes=("membrane", "mitochondrion"), chunk=16)
    cells = write_objects(store, class_name="membrane", cells=True, grow="15nm", block_size=32, table_format="csv", cell_method="grow")
    want = whole_image_cells(mem, 3)
    np.testing.assert_array_equal(zarr.open_array(str(store / "labels/membrane-cells/0"), mode="r")[:], want)
    assert cells.table_path.name == "objects.csv"
    assert_table_equal(read_table(cells.path), want, probs[0], cls="cell")
    objs = write_objects(store, class_name="mitochondrion", block_size=48)
    np.testing.assert_array_equal(zarr.open_array(str(objs.path / "0"), mode="r")[:], reference(mito))
    listed = zarr.open_group(str(store / "labels"), mode="r").attrs["ome"]["labels"]
    assert listed == ["membrane", "mitochondrion", "membrane-cells", "mitochondrion-objects"]


def test_lazy_call_on_a_store_matches_the_written_layer(tmp_path):
    mask = adversarial(70, 90, corner=16)
    store = make_output(tmp_path / "seg.ome.zarr", probs_for(mask), chunk=16)
    lazy = label_objects(store, block_size=32)
    written = write_objects(store, block_size=48)
    np.testing.assert_array_equal(lazy.labels.compute(), zarr.open_array(str(written.path / "0"), mode="r")[:])
    a, b = lazy.table, read_table(written.path)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for c in a.columns:
        if a[c].dtype.kind == "f":
            np.testing.assert_allclose(a[c], b[c], rtol=1e-12)
        else:
            np.testing.assert_array_equal(a[c].to_numpy(), b[c].to_numpy())


def test_overwrite_keeps_the_old_layer_until_the_new_one_is_complete(tmp_path, monkeypatch):
    import tilefeet.objects.run as run

    mask = adversarial(64, 64, corner=16)
    store = make_output(tmp_path / "seg.ome.zarr", probs_for(mask), chunk=16)
    first = write_objects(store, block_size=32)
    before = zarr.open_array(str(first.path / "0"), mode="r")[:]

    def broken(job, index, *after):
        raise RuntimeError("disk full")

    monkeypatch.setattr(run, "_relabel", broken)
    with pytest.raises(RuntimeError):
        write_objects(store, block_size=32, overwrite=True, min_size="10px")
    np.testing.assert_array_equal(zarr.open_array(str(first.path / "0"), mode="r")[:], before)  # untouched
    assert "mitochondrion-objects" in zarr.open_group(str(store / "labels"), mode="r").attrs["ome"]["labels"]
    monkeypatch.undo()
    second = write_objects(store, block_size=32, overwrite=True, min_size="10px")
    np.testing.assert_array_equal(zarr.open_array(str(second.path / "0"), mode="r")[:], reference(mask, min_px=10))


def test_a_crash_while_publishing_is_recovered(tmp_path):
    """Setting the old layer aside is the only step that removes it: recover() puts it back."""
    from tilefeet.objects import store as st

    mask = adversarial(64, 64, corner=16)
    store = make_output(tmp_path / "seg.ome.zarr", probs_for(mask), chunk=16)
    write_objects(store, block_size=32)
    layer = store / "labels" / "mitochondrion-objects"
    location = st.LocalLayer(store, "mitochondrion-objects")
    location._withdraw()  # what publish does first: unlist the old layer
    layer.rename(st.old_path(store, "mitochondrion-objects"))  # killed right after this rename
    location.recover()
    assert layer.exists() and not st.old_path(store, "mitochondrion-objects").exists()
    assert "mitochondrion-objects" in zarr.open_group(str(store / "labels"), mode="r").attrs["ome"]["labels"]
    np.testing.assert_array_equal(zarr.open_array(str(layer / "0"), mode="r")[:], reference(mask))


def test_objects_of_a_real_segment_output(tmp_path, section, random_engine):
    """On what `tilefeet segment` really writes: the objects are the components of labels/<class>."""
    import tilefeet

    out = tilefeet.segment_to_zarr(section, tmp_path / "seg.ome.zarr", random_engine, chunk_size=256, block_size=512)
    result = write_objects(out, block_size=256, min_size="0px")
    root = zarr.open_group(str(out), mode="r")
    mem = np.asarray(root["labels/membrane/0"][:])
    mem = mem.reshape(mem.shape[-2:]) != 0
    lab = reference(mem)
    np.testing.assert_array_equal(root["labels/membrane-objects/0"][:], lab)
    assert_table_equal(read_table(result.path), lab, np.asarray(root["0"][0]), pixel=4.0, cls="membrane")
    meta = json.loads((out / "labels" / "membrane-objects" / "zarr.json").read_text())["attributes"]["ome"]
    assert meta["multiscales"][0]["metadata"]["class"] == "membrane"


def test_ids_switch_to_uint64_in_a_store(tmp_path):
    mask = np.zeros((48, 48), bool)
    mask[::3, ::3] = True  # 256 single pixels
    store = make_output(tmp_path / "seg.ome.zarr", probs_for(mask), chunk=16)
    result = write_objects(store, block_size=16, uint32_limit=255)
    assert result.dtype == "uint64"
    arrays = [zarr.open_array(str(result.path / k), mode="r") for k in ("0", "1")]
    assert all(a.dtype == np.uint64 for a in arrays)
    np.testing.assert_array_equal(arrays[0][:], reference(mask))
    assert read_table(result.path)["id"].dtype == np.uint64


def test_objects_of_a_segment_run_still_in_its_staging_folder(tmp_path):
    """What `segment --objects` does: objects into OUT.partial before it is renamed to OUT."""
    mask = adversarial(64, 80, corner=16)
    partial = make_output(tmp_path / "out.ome.zarr.partial", probs_for(mask), chunk=16)
    write_objects(partial, block_size=32)
    assert not list(tmp_path.glob("*.mitochondrion-objects.*"))  # its own staging folder is gone
    partial.rename(tmp_path / "out.ome.zarr")
    out = tmp_path / "out.ome.zarr"
    np.testing.assert_array_equal(zarr.open_array(str(out / "labels/mitochondrion-objects/0"), mode="r")[:], reference(mask))
    assert len(read_table(out / "labels" / "mitochondrion-objects")) == reference(mask).max()


def test_object_colours_are_stable_and_distinct():
    from tilefeet.objects.colors import id_colors, outlines

    ids = reference(adversarial())
    rgb = id_colors(ids)
    assert rgb.shape == (*ids.shape, 3) and rgb.dtype == np.uint8
    assert (rgb[ids == 0] == 0).all() and (rgb[ids > 0].max(axis=-1) > 0).all()
    np.testing.assert_array_equal(id_colors(ids[::2, ::2]), rgb[::2, ::2])  # the same colour at every level
    first = id_colors(np.arange(1, 65))
    assert len({tuple(c) for c in first}) == 64  # neighbours in raster order get different colours
    assert np.abs(first[1:].astype(int) - first[:-1].astype(int)).sum(axis=1).min() > 60
    edge = outlines(ids)
    assert edge[ids == 0].sum() == 0 and edge[0, :].all()  # the frame spanning the section is all outline on the edge


def test_objects_graph_chained_behind_the_pixels_it_reads(tmp_path):
    """compute=False + after=: the graph is built from the metadata alone and reads pixels only after
    ``after`` ran, as `segment --objects` chains it behind the segment graph."""
    import dask
    from dask import delayed

    mask = adversarial(64, 96, corner=16)
    prob = probs_for(mask)
    store = make_output(tmp_path / "out.ome.zarr.partial", np.zeros_like(prob), chunk=16)

    def write_pixels() -> str:
        root = zarr.open_group(str(store), mode="r+")
        root["0"][0] = prob
        root["labels/mitochondrion/0"][:] = (prob >= 128).astype(np.uint8)
        return "written"

    graph = write_objects(store, block_size=32, compute=False, after=delayed(write_pixels)())
    (path,) = dask.compute(graph, scheduler="threads", num_workers=2)
    np.testing.assert_array_equal(zarr.open_array(str(Path(path) / "0"), mode="r")[:], reference(mask))
    assert_table_equal(read_table(Path(path)), reference(mask), prob)
