"""3-D objects of a stack of sections: ids equal to scikit-image's ``label`` and to ``cc3d`` of the
whole volume (raster order of first voxels), for any block shape in z, y and x, any connectivity and
any number of workers; a table equal to ``regionprops_table`` with the anisotropic spacing; size and
z-extent filters, per-section hole filling, flat memory, and the command line on a stack that
``tilefeet segment`` wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cc3d
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from scipy import ndimage as ndi
from skimage.measure import label, regionprops_table

from tilefeet.errors import ConfigError, InvalidImageError
from tilefeet.ngff import LABEL_COLORS, multiscales, pyramid_shapes
from tilefeet.objects import label_objects, write_objects
from tilefeet.objects.store import read_table
from tilefeet.objects.volume import TABLE_COLUMNS_3D

from .helpers import cli_command, peak_rss_mb

SPACING = (50.0, 5.0, 4.0)  # (z, y, x) nm: sections ten times thicker than the pixels
LUCCHI = Path(__file__).resolve().parents[2] / "shared" / "data" / "em" / "lucchi" / "test" / "mitochondrion"
SK = {6: 1, 18: 2, 26: 3}


# ------------------------------------------------------------------------------------- fixtures


def make_stack_output(path: Path, probs: np.ndarray, *, cls: str = "mitochondrion", chunk: int = 16, threshold: float = 0.5,
                      spacing=SPACING, origin=(0.0, 0.0, 0.0), levels: int | None = None) -> Path:
    """A store laid out as ``tilefeet segment`` writes a stack: (c, z, y, x) uint8 probabilities,
    chunks (1, 1, chunk, chunk), scale (1, dz, py·2^k, px·2^k), z in nm; ``labels/<class>`` (z, y, x)
    = probabilities ≥ threshold, chunks (1, chunk, chunk); pyramids in y and x only."""
    probs = np.asarray(probs)
    _, h, w = probs.shape
    shapes = pyramid_shapes((h, w), (chunk, chunk))[: levels or None]
    meta = {"method": "tilefeet.segment", "settings": {"threshold": threshold, "output_dtype": "uint8"}, "every_chunk_written": True}
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    z_axis = {"name": "z", "type": "space", "unit": "nanometer"}
    for k in range(len(shapes)):
        f = 2**k
        level = probs[:, ::f, ::f][None]  # subsampled: enough for a fixture, objects read level 0 only
        root.create_array(str(k), data=level, chunks=(1, 1, chunk, chunk), dimension_names=["c", "z", "y", "x"], config={"write_empty_chunks": True})
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [multiscales("probabilities", spacing[1:], len(shapes), origin_nm=origin[1:],
                                    lead_axes=[{"name": "c", "type": "channel"}, z_axis], lead_scale=[1.0, spacing[0]],
                                    lead_origin=[0.0, origin[0]], metadata=meta)],
        "omero": {"channels": [{"label": cls, "color": "FFFFFF"}]},
    }
    g = root.create_group("labels")
    g.attrs["ome"] = {"version": "0.5", "labels": [cls]}
    lab = g.create_group(cls)
    for k in range(len(shapes)):
        f = 2**k
        mask = (probs[:, ::f, ::f] >= threshold * 255).astype(np.uint8)
        lab.create_array(str(k), data=mask, chunks=(1, chunk, chunk), dimension_names=["z", "y", "x"], config={"write_empty_chunks": True})
    lab.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [multiscales(cls, spacing[1:], len(shapes), origin_nm=origin[1:], lead_axes=[z_axis], lead_scale=[spacing[0]],
                                    lead_origin=[origin[0]])],
        "image-label": {"version": "0.5", "source": {"image": "../../"}, "colors": [{"label-value": 1, "rgba": [*LABEL_COLORS[0], 255]}]},
    }
    return path


def blobs(shape, seed: int = 0, fraction: float = 0.3, sigma=(0.7, 2.0, 2.0)) -> np.ndarray:
    """Smooth random blobs (mitochondria-like shapes that span several sections and blocks)."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, 1 - fraction)


def probs_for(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(mask, rng.integers(128, 256, mask.shape), rng.integers(0, 128, mask.shape)).astype(np.uint8)


def reference(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    lab = label(mask, connectivity=SK[connectivity])
    np.testing.assert_array_equal(lab, cc3d.connected_components(mask, connectivity=connectivity))  # the two references agree
    return lab


def lazy_ids(mask: np.ndarray, block, connectivity: int = 26, **kw) -> np.ndarray:
    objs = label_objects(mask, pixel_size_nm=SPACING, block_size=block, connectivity=connectivity, measure=False, **kw)
    return objs.labels.compute()


# ------------------------------------------------------------------------------ ids, in memory


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=hs.tuples(hs.integers(1, 6), hs.integers(1, 10), hs.integers(1, 10)),
    block=hs.tuples(hs.integers(1, 4), hs.integers(2, 6), hs.integers(2, 6)),
    density=hs.floats(0.05, 0.7),
    connectivity=hs.sampled_from([6, 18, 26]),
    seed=hs.integers(0, 2**16),
)
def test_ids_equal_skimage_and_cc3d_for_any_block_shape_and_connectivity(shape, block, density, connectivity, seed):
    mask = np.random.default_rng(seed).random(shape) < density
    np.testing.assert_array_equal(lazy_ids(mask, block, connectivity), reference(mask, connectivity))


@pytest.mark.parametrize("block", [(1, 96, 128), (3, 64, 100), (4, 192, 40)])
def test_ids_of_real_lucchi_mitochondria_equal_skimage_and_cc3d(block):
    """The five Lucchi test masks (768 × 1024, 5 nm) as a stack, every 4th pixel (192 × 256), mirrored
    in z to ten sections: real mitochondria that cross sections and blocks."""
    import imageio.v3 as iio

    paths = sorted(LUCCHI.glob("*.png"))
    if not paths:
        pytest.skip(f"no Lucchi masks under {LUCCHI}")
    masks = np.stack([iio.imread(p)[::4, ::4] > 127 for p in paths])
    stack = np.concatenate([masks, masks[::-1]])
    for c in (6, 26):
        ref = reference(stack, c)
        assert ref.max() > 20
        np.testing.assert_array_equal(lazy_ids(stack, block, c), ref)


def test_adversarial_volume_diagonals_across_block_edges_and_corners():
    """Voxels that touch only across a block edge or corner (18/26 neighbours in different blocks),
    a 1-voxel snake crossing every block, and objects spanning the whole volume."""
    m = np.zeros((8, 12, 12), bool)
    c = 4  # blocks of 4 × 4 × 4
    m[c - 1, c - 1, c - 1] = m[c, c, c] = True  # corner diagonal: 26 only
    m[c - 1, c - 1, 8] = m[c, c, 8] = True  # edge diagonal along x: 18 and 26
    m[2, c - 1, c] = m[2, c, c - 1] = True  # anti-diagonal across a y/x edge
    m[c - 1, 9, c] = m[c, 10, c - 1] = True  # corner, mixed signs
    m[:, 11, 11] = True  # a column through every section
    m[0, 0, :] = True
    m[1, 1::2, 0] = True
    for conn in (6, 18, 26):
        for block in ((4, 4, 4), (2, 4, 4), (4, 3, 5)):
            np.testing.assert_array_equal(lazy_ids(m, block, conn), reference(m, conn), err_msg=f"{conn} {block}")


# ------------------------------------------------------------------------------ the table


def assert_table_equal(df, lab: np.ndarray, prob: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> None:
    """The table against ``regionprops_table`` on the whole volume (spacing in nm) and a direct
    count of exposed voxel faces."""
    props = ["label", "area", "centroid", "bbox", "equivalent_diameter_area", "axis_major_length", "axis_minor_length",
             "intensity_mean", "intensity_max"]
    rp = regionprops_table(lab, intensity_image=prob / 255.0, spacing=spacing, properties=props)
    assert list(df.columns) == list(TABLE_COLUMNS_3D)
    assert len(df) == lab.max() == len(rp["label"])
    np.testing.assert_array_equal(df["id"].to_numpy(), rp["label"])
    np.testing.assert_array_equal(df["volume_voxels"].to_numpy(), np.bincount(lab.ravel())[1:])
    np.testing.assert_allclose(df["volume_nm3"], rp["area"], rtol=1e-12)
    for i, a in enumerate("zyx"):
        np.testing.assert_allclose(df[f"centroid_{a}_nm"], np.asarray(rp[f"centroid-{i}"]) + origin[i], rtol=1e-10)
        np.testing.assert_array_equal(df[f"bbox_{a}0_px"], rp[f"bbox-{i}"])
        np.testing.assert_array_equal(df[f"bbox_{a}1_px"], rp[f"bbox-{i + 3}"])
        np.testing.assert_allclose(df[f"bbox_{a}0_nm"], origin[i] + (rp[f"bbox-{i}"] - 0.5) * spacing[i])
    np.testing.assert_array_equal(df["z_sections"], rp["bbox-3"] - rp["bbox-0"])
    np.testing.assert_allclose(df["z_extent_nm"], (rp["bbox-3"] - rp["bbox-0"]) * spacing[0])
    np.testing.assert_allclose(df["equivalent_diameter_nm"], rp["equivalent_diameter_area"], rtol=1e-10)
    np.testing.assert_allclose(df["major_axis_nm"], rp["axis_major_length"], rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(df["minor_axis_nm"], rp["axis_minor_length"], rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(df["mean_probability"], rp["intensity_mean"], rtol=1e-10)
    np.testing.assert_allclose(df["max_probability"], rp["intensity_max"], rtol=1e-12)
    # surface: every voxel face whose neighbour across it is another label, background, or outside
    padded = np.pad(lab, 1)
    area = np.zeros(lab.max() + 1)
    face = (spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1])
    for axis in range(3):
        for shift in (1, -1):
            other = np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
            exposed = lab != other
            area += np.bincount(lab[exposed], minlength=lab.max() + 1) * face[axis]
    np.testing.assert_allclose(df["surface_area_nm2"], area[1:], rtol=1e-12)
    touches = (rp["bbox-0"] == 0) | (rp["bbox-1"] == 0) | (rp["bbox-2"] == 0) | (rp["bbox-3"] == lab.shape[0]) \
        | (rp["bbox-4"] == lab.shape[1]) | (rp["bbox-5"] == lab.shape[2])
    np.testing.assert_array_equal(df["touches_border"], touches)


@pytest.mark.parametrize("block", [(3, 10, 12), (5, 13, 9)])
@pytest.mark.parametrize("connectivity", [6, 26])
def test_table_equals_regionprops_with_the_spacing(block, connectivity):
    mask = blobs((9, 40, 36), seed=3)
    prob = probs_for(mask)
    objs = label_objects(prob, pixel_size_nm=SPACING, block_size=block, connectivity=connectivity)
    lab = reference(mask, connectivity)
    np.testing.assert_array_equal(objs.labels.compute(), lab)
    assert_table_equal(objs.table, lab, prob)


# ------------------------------------------------------------------------------ the store


@pytest.mark.parametrize("block", ["3,16,16", "1,32,16", "9,48,48"])
def test_write_objects_on_a_stack_store_equals_skimage_and_regionprops(tmp_path, block):
    mask = blobs((9, 40, 44), seed=5)
    prob = probs_for(mask, 1)
    origin = (100.0, 20.0, -8.0)
    store = make_stack_output(tmp_path / "out.ome.zarr", prob, origin=origin)
    r = write_objects(store, block_size=block)
    lab = reference(mask)
    layer = zarr.open_group(str(r.path), mode="r")
    np.testing.assert_array_equal(layer["0"][:], lab)
    assert layer["0"].shape == (9, 40, 44) and layer["0"].chunks == (1, 16, 16)
    assert [layer[str(k)].shape for k in range(3)] == [(9, 40, 44), (9, 20, 22), (9, 10, 11)]
    np.testing.assert_array_equal(layer["2"][:], lab[:, ::4, ::4])
    assert_table_equal(read_table(r.path), lab, prob, origin=origin)
    assert r.n_objects == lab.max() and r.volume_um3 == pytest.approx(9 * 50 * 40 * 5 * 44 * 4 / 1e9)


def test_the_layer_is_valid_ngff_with_z_in_nanometres(tmp_path):
    from ome_zarr_models.v05 import ImageLabel

    from tilefeet.ngff import read_multiscale

    store = make_stack_output(tmp_path / "out.ome.zarr", probs_for(blobs((4, 32, 32))), origin=(150.0, 0.0, 0.0))
    r = write_objects(store)
    ImageLabel.from_zarr(zarr.open_group(str(r.path), mode="r"))
    ms = read_multiscale(r.path)
    assert ms.names == ("z", "y", "x") and ms.axes[0].unit == "nanometer"
    assert ms.datasets[1].scale == (50.0, 10.0, 8.0) and ms.datasets[0].translation[0] == 150.0
    assert ms.metadata["connectivity"] == 26 and ms.metadata["dimensions"] == 3
    assert "mitochondrion-objects" in read_multiscale(store).labels


def test_min_size_in_um3_and_min_z_extent(tmp_path):
    mask = blobs((10, 48, 48), seed=8, fraction=0.25)
    prob = probs_for(mask)
    lab = reference(mask)
    voxels = np.bincount(lab.ravel())
    sl = ndi.find_objects(lab)
    sections = np.array([0] + [s[0].stop - s[0].start for s in sl])
    voxel_nm3 = np.prod(SPACING)
    for kw, keep in (
        ({"min_size": "0.0005um3"}, voxels * voxel_nm3 >= 0.0005e9),
        ({"min_size": "40px"}, voxels >= 40),
        ({"min_z_extent": 3}, sections >= 3),
        ({"min_z_extent": "150nm"}, sections * 50 >= 150),
        ({"min_z_extent": "0.2um", "min_size": 1e5}, (sections * 50 >= 200) & (voxels * voxel_nm3 >= 1e5)),
    ):
        keep[0] = False
        want = label(keep[lab], connectivity=3)  # the kept objects, numbered again in raster order
        assert 0 < want.max() < lab.max(), kw
        objs = label_objects(prob, pixel_size_nm=SPACING, block_size=(3, 16, 16), **kw)
        np.testing.assert_array_equal(objs.labels.compute(), want, err_msg=str(kw))
        assert_table_equal(objs.table, want, prob)
    store = make_stack_output(tmp_path / "o.ome.zarr", prob)
    r = write_objects(store, block_size="4,16,16", min_size="0.0005um3", min_z_extent=3)
    keep = (voxels * voxel_nm3 >= 0.0005e9) & (sections >= 3)
    keep[0] = False
    np.testing.assert_array_equal(zarr.open_array(str(r.path / "0"), mode="r")[:], label(keep[lab], connectivity=3))


def test_fill_holes_per_section():
    """Holes are filled in each section on its own (scipy's binary_fill_holes of every section),
    across blocks; an object's cavity open to the next section is filled too."""
    mask = blobs((6, 40, 40), seed=11, fraction=0.45)
    mask[2, 10:20, 10:20] = True
    mask[2, 13:17, 13:17] = False  # a hole in section 2, open to sections 1 and 3
    filled = np.stack([ndi.binary_fill_holes(s) for s in mask])
    assert filled.sum() > mask.sum() and filled[2, 14, 14]
    for block in ((1, 14, 14), (4, 16, 24)):
        got = lazy_ids(mask, block, fill_holes=True)
        np.testing.assert_array_equal(got, reference(filled), err_msg=str(block))


def test_fill_holes_in_a_store_with_6_connectivity(tmp_path):
    mask = blobs((5, 36, 36), seed=12, fraction=0.5)
    store = make_stack_output(tmp_path / "o.ome.zarr", probs_for(mask))
    r = write_objects(store, block_size="2,16,16", fill_holes=True, connectivity=6)
    # 6-connected objects: 4-connected in a section, so their holes are the 8-connected background
    filled = np.stack([ndi.binary_fill_holes(s, structure=np.ones((3, 3), bool)) for s in mask])
    np.testing.assert_array_equal(zarr.open_array(str(r.path / "0"), mode="r")[:], reference(filled, 6))


# ------------------------------------------------------------------------------ workers


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")
def test_distributed_worker_processes_give_the_same_ids_and_table(tmp_path):
    from distributed import Client, LocalCluster

    mask = blobs((6, 48, 48), seed=21)
    prob = probs_for(mask)
    store = make_stack_output(tmp_path / "o.ome.zarr", prob)
    environ = dict(os.environ)  # starting a cluster sets OMP_NUM_THREADS=1 here for good: restored below
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as client:
            graph = write_objects(store, block_size="2,16,16", compute=False)
            path = client.compute(graph).result()
            lazy = label_objects(store, block_size=(3, 16, 32))  # the lazy call on the cluster's client
            lazy_ids = lazy.labels.compute()
    finally:
        os.environ.clear()
        os.environ.update(environ)
    lab = reference(mask)
    np.testing.assert_array_equal(zarr.open_array(str(Path(path) / "0"), mode="r")[:], lab)
    np.testing.assert_array_equal(lazy_ids, lab)
    assert_table_equal(read_table(Path(path)), lab, prob)
    assert_table_equal(lazy.table, lab, prob)


# ------------------------------------------------------------------------------ errors


def test_stack_options_are_checked_in_one_line(tmp_path):
    store = make_stack_output(tmp_path / "o.ome.zarr", probs_for(blobs((3, 16, 16))))
    for kw, words in (
        ({"min_size": "0.01um2"}, "is an area; give a volume"),
        ({"cells": True}, "--cells"),
        ({"connectivity": 8}, "6, 18 or 26"),
        ({"block_size": "2,10,16", "chunk_size": 16}, "multiple of the chunk size"),
    ):
        with pytest.raises(ConfigError, match=words):
            write_objects(store, **kw)
    with pytest.raises(ConfigError, match="whole number of sections"):
        write_objects(store, min_z_extent="2.5")
    with pytest.raises(ConfigError, match="6, 18 or 26"):
        write_objects(store, connectivity=7)
    mask2d = np.zeros((8, 8), bool)
    with pytest.raises(ConfigError, match="is a volume but this output is one section"):
        label_objects(mask2d, pixel_size_nm="5nm", min_size="0.001um3")
    with pytest.raises(ConfigError, match="for stacks"):
        label_objects(mask2d, pixel_size_nm="5nm", min_z_extent=2)
    with pytest.raises(ConfigError, match="voxel size"):
        label_objects(np.zeros((3, 8, 8), bool), pixel_size_nm="5nm")
    # a stack whose z axis has no unit: volumes cannot be measured
    root = zarr.open_group(str(store), mode="r+")
    ome = dict(root.attrs["ome"])
    ome["multiscales"][0]["axes"][1].pop("unit")
    root.attrs["ome"] = ome
    with pytest.raises(InvalidImageError, match="--pixel-size Z,Y,X"):
        write_objects(store)


def test_a_stack_that_lost_a_chunk_file_is_refused(tmp_path):
    """A segment output says it wrote every chunk: a chunk file lost in section 2 would read as
    background (no objects there), so the run is refused, naming the section's chunk."""
    from tilefeet.errors import MissingDataError

    store = make_stack_output(tmp_path / "o.ome.zarr", probs_for(blobs((4, 32, 32))))
    lost = store / "labels" / "mitochondrion" / "0" / "c" / "2" / "1" / "0"
    assert lost.exists()
    lost.unlink()
    with pytest.raises(MissingDataError, match=r"labels/mitochondrion.*missing.*2/1/0"):
        write_objects(store)
    assert not (store / "labels" / "mitochondrion-objects").exists()


# ------------------------------------------------------------------------------ memory


def test_peak_memory_is_flat_in_the_volume(tmp_path):
    """A stack 4× larger (twice the sections, twice the width), same blocks: peak memory within 15 %
    plus 20 MB; the larger volume's int32 labels alone are 32 MB."""
    rss = {}
    for n in (1, 2):
        depth, side = 8 * n, 512
        store = tmp_path / f"s{n}.ome.zarr"
        mask = np.zeros((depth, side, side * n), bool)
        for z in range(0, depth, 4):
            mask[z : z + 4] = blobs((4, side, side * n), seed=z, fraction=0.2, sigma=(1, 6, 6))
        make_stack_output(store, probs_for(mask), chunk=256)
        code = (f"from tilefeet.objects import write_objects; write_objects({str(store)!r}, block_size='4,256,256', blocks_in_flight=2)")
        rss[n] = peak_rss_mb([sys.executable, "-c", code], {"OMP_NUM_THREADS": "1"})
    assert rss[2] <= 1.15 * rss[1] + 20, rss


# ------------------------------------------------------------------------------ command line


def test_cli_on_a_stack_that_segment_wrote(tmp_path, random_engine):
    """`tilefeet segment` on a (z, y, x) stack, then `tilefeet objects` with 3-D options: the ids
    equal scikit-image's labelling of the written probabilities at that threshold; the summary
    speaks of volumes; an area for --min-size is one line and exit 2."""
    from tilefeet.convert import write_image

    rng = np.random.default_rng(0)
    stack = (ndi.gaussian_filter(rng.random((4, 96, 96)), (0.5, 3, 3)) * 255 * 4 - 380).clip(0, 255).astype(np.uint8)
    src = tmp_path / "stack.ome.zarr"
    try:
        write_image(stack, src, (5.0, 5.0), chunk=64, z_spacing_nm=40.0)
    except TypeError:
        pytest.skip("convert cannot write a stack's z spacing here")
    out = tmp_path / "out.ome.zarr"
    seg = subprocess.run(cli_command("-q", "segment", src, out, "-e", random_engine.path, "--tile", "64", "--overlap", "16"),
                         capture_output=True, text=True)
    assert seg.returncode == 0, seg.stderr
    root = zarr.open_group(str(out), mode="r")
    prob = root["0"][0]
    assert prob.shape == (4, 96, 96)
    t = float(np.quantile(prob, 0.8)) / 255  # a threshold that leaves many objects
    r = subprocess.run(cli_command("objects", out, "--threshold", f"{t:.4f}", "--connectivity", "18", "--min-z-extent", "2",
                                   "--block-size", "2,64,64", "-q"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lab = label(prob >= round(t, 4) * 255, connectivity=2)
    spans = np.array([0] + [s[0].stop - s[0].start for s in ndi.find_objects(lab)])
    keep = spans >= 2
    keep[0] = False
    assert keep.sum() > 3 and (spans[1:] < 2).any()
    ids = zarr.open_array(str(next((out / "labels").glob("*-objects")) / "0"), mode="r")[:]
    np.testing.assert_array_equal(ids, label(keep[lab], connectivity=2))
    assert "µm³" in r.stdout and f"{int(keep.sum())} 3-D objects" in r.stdout
    bad = subprocess.run(cli_command("objects", out, "--min-size", "0.01um2", "--overwrite"), capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "give a volume" in bad.stderr
