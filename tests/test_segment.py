"""The segment pipeline on real zarr stores: tiling invariance, crop-mode exactness, the written store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import tilefeet
from tilefeet.convert import write_image
from tilefeet.errors import TilefeetWarning
from tilefeet.writer import downsample_mean

from .conftest import make_random_engine

BLOCK_KW = dict(chunk_size=128, output_dtype="float32", batch_size=3)


def _probs(src, engine, **kw):
    return tilefeet.segment(src, engine, **{**BLOCK_KW, **kw}).values


def test_bit_identical_across_block_sizes(section, random_engine):
    """Blocks of 1×, 2× and 4× the tile give the same bits (global lattice, fixed batch shapes)."""
    tile = random_engine.tile
    ref = _probs(section, random_engine, block_size=tile)
    assert ref.shape == (1, 1024, 1536) and ref.dtype == np.float32
    assert ref.std() > 0.05  # the random network is not flat: equality below means something
    for block in (2 * tile, 4 * tile):
        np.testing.assert_array_equal(_probs(section, random_engine, block_size=block), ref)


def test_bit_identical_across_input_chunkings(tmp_path, montage_2x3, random_engine):
    ref = None
    for chunk in (64, 256, 1000):
        src = write_image(montage_2x3[0], tmp_path / f"c{chunk}.ome.zarr", (4.0, 4.0), chunk=chunk)
        p = _probs(src, random_engine, block_size=256)
        if ref is None:
            ref = p
        np.testing.assert_array_equal(p, ref)


@pytest.mark.parametrize("pixel_size,grid", [("5nm", "input"), ("2.5nm", "input"), ("5nm", "network"), ("3nm,5nm", "input")])
def test_bit_identical_across_block_sizes_with_resampling(tmp_path, montage_2x3, random_engine, pixel_size, grid):
    """With a non-integer scale to the network grid (and back), block size still changes nothing."""
    src = write_image(montage_2x3[0][:512, :640], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=128)
    kw = dict(pixel_size_nm=pixel_size, output_grid=grid)
    ref = _probs(src, random_engine, block_size=128, **kw)
    for block in (256, 512):
        np.testing.assert_array_equal(_probs(src, random_engine, block_size=block, **kw), ref)


def test_crop_mode_equals_whole_image_inference(tmp_path, montage_2x3):
    """Overlap-tile (crop) with the overlap covering the receptive field reproduces one pass over the
    whole (reflection-padded) image, to float rounding."""
    engine = make_random_engine(tmp_path / "deep", base=4, depth=4)
    rf = engine.receptive_field  # 200 for depth 4
    tile, overlap = 256, 224  # keeps 112 ≥ rf/2 pixels of context; stride 32 is a multiple of 16
    assert overlap // 2 >= rf // 2
    img = montage_2x3[0][:300, :260]
    src = write_image(img, tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=128)
    got = tilefeet.segment(src, engine, tile=tile, overlap=overlap, blend="crop", block_size=128, chunk_size=128,
                           output_dtype="float32", batch_size=8).values

    # Reference: one pass over the image padded by reflection; the pad (≡ overlap/2 mod 16) keeps the
    # network's pooling grid aligned with the tiles' and puts the image beyond reach of zero padding.
    m = overlap // 2
    h, w = img.shape
    ph, pw = m + (-(h + 2 * m) % 16), m + (-(w + 2 * m) % 16)
    padded = np.pad(img.astype(np.float64), ((m, ph), (m, pw)), mode="symmetric")
    x = torch.from_numpy(engine.normalization.to_network(padded).astype(np.float32))[None, None]
    with torch.inference_mode():
        ref = engine.build_model()(x)[0, :, m : m + h, m : m + w].numpy()
    assert np.abs(got - ref).max() <= 1e-5


def test_written_store(tmp_path, section, random_engine, monkeypatch):
    """Every output pixel written exactly once; dtype, shape, chunks, scale metadata; pyramid consistent."""
    from tilefeet.writer import OutputStore

    boxes = []
    original = OutputStore.write_block

    def recording(self, out, *args):
        boxes.append(out.box)
        return original(self, out, *args)

    monkeypatch.setattr(OutputStore, "write_block", recording)
    out = tilefeet.segment_to_zarr(section, tmp_path / "out.ome.zarr", random_engine, chunk_size=128, block_size=256)
    cover = np.zeros((1024, 1536), np.int32)
    for b in boxes:
        cover[b.y0 : b.y1, b.x0 : b.x1] += 1
    assert (cover == 1).all()

    root = zarr.open_group(str(out), mode="r")
    ms = root.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"] and ms["axes"][1]["unit"] == "nanometer"
    levels = [ds["path"] for ds in ms["datasets"]]
    assert levels == ["0", "1", "2", "3", "4"]  # halved until one 128² chunk holds it: 1536 → 96 px wide
    p0 = root["0"]
    assert p0.shape == (1, 1024, 1536) and p0.dtype == np.uint8 and p0.chunks == (1, 128, 128)
    for k, ds in enumerate(ms["datasets"]):
        scale, shift = ds["coordinateTransformations"][0]["scale"], ds["coordinateTransformations"][1]["translation"]
        assert scale == [1.0, 4.0 * 2**k, 4.0 * 2**k]
        assert shift[1] == pytest.approx(4.0 * (2**k - 1) / 2)
    # Same bits as the lazy path, quantized.
    lazy = tilefeet.segment(section, random_engine, chunk_size=128, block_size=256).values
    np.testing.assert_array_equal(p0[:], np.round(lazy * 255).astype(np.uint8))
    # Labels are the thresholded probabilities.
    lab = root["labels/membrane/0"][:]
    assert lab.shape == (1024, 1536) and lab.dtype == np.uint8  # 2-D (y, x): a labels layer in napari, no empty axis
    np.testing.assert_array_equal(lab, (lazy[0] >= 0.5).astype(np.uint8))
    # Each pyramid level is the 2×2 mean of the level below; label levels threshold it.
    for k in (1, 2, 3, 4):
        below, here = root[str(k - 1)][:], root[str(k)][:]
        mean = downsample_mean(below, here.shape[1:])
        np.testing.assert_array_equal(here, np.round(mean).astype(np.uint8))
        np.testing.assert_array_equal(root[f"labels/membrane/{k}"][:], (mean[0] >= 127.5).astype(np.uint8))
    assert not (tmp_path / "out.ome.zarr.partial").exists()
    assert not (out / ".tilefeet").exists()


def test_output_validates_and_opens_with_ome_zarr(tmp_path, section, random_engine):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05 import Image, ImageLabel

    out = tilefeet.segment_to_zarr(section, tmp_path / "out.ome.zarr", random_engine, chunk_size=256, block_size=512)
    img = Image.from_zarr(zarr.open_group(str(out), mode="r"))
    assert img.labels is not None
    ImageLabel.from_zarr(zarr.open_group(str(out / "labels" / "membrane"), mode="r"))
    nodes = list(Reader(parse_url(str(out)))())
    assert nodes[0].data[0].shape == (1, 1024, 1536)
    label_nodes = [n for n in nodes if n.data and "image-label" in str(n.zarr.root_attrs)]
    assert label_nodes and label_nodes[0].data[0].shape == (1024, 1536)


def test_lazy_segment_composes_into_a_dask_graph(section, random_engine):
    """segment() returns a lazy xarray with physical coordinates; nothing runs until asked."""
    import dask.array as da

    p = tilefeet.segment(section, random_engine, chunk_size=256, block_size=512)
    assert isinstance(p.data, da.Array) and p.dims == ("c", "y", "x")
    assert p.chunks == ((1,), (512, 512), (512, 512, 512))
    assert float(p.y[1] - p.y[0]) == 4.0 and list(p.c.values) == ["membrane"]
    fraction = (p.data >= 0.5).mean()  # a larger graph built on top, computed in one go
    assert float(fraction.compute()) == pytest.approx(float((p.values >= 0.5).mean()))


def test_image_smaller_than_one_tile_just_works(tmp_path, montage_2x3, random_engine):
    src = write_image(montage_2x3[0][:37, :50], tmp_path / "tiny.ome.zarr", (4.0, 4.0))
    out = tilefeet.segment_to_zarr(src, tmp_path / "out.ome.zarr", random_engine)
    assert zarr.open_array(str(out / "0"), mode="r").shape == (1, 37, 50)


def test_reads_ngff_04_and_singleton_axes(tmp_path, montage_2x3, random_engine):
    """NGFF 0.4 (zarr v2) input, and a (c=1, y, x) input, give the same result as 0.5 yx."""
    img = montage_2x3[0][:256, :256]
    a = write_image(img, tmp_path / "a.ome.zarr", (4.0, 4.0), version="0.5")
    b = write_image(img, tmp_path / "b.ome.zarr", (4.0, 4.0), version="0.4", unit="micrometer")  # stored as 0.004 um
    c = write_image(img[None], tmp_path / "c.ome.zarr", (4.0, 4.0))  # (z=1, y, x)
    ref = _probs(a, random_engine, block_size=256)
    for s in (b, c):
        np.testing.assert_array_equal(_probs(s, random_engine, block_size=256), ref)


def _resave_without_dimension_names(src, dst):
    """A copy of an OME-Zarr 0.5 image whose arrays lack dimension_names (and are sharded), as some
    writers produce."""
    g = zarr.open_group(str(src), mode="r")
    out = zarr.open_group(str(dst), mode="w", zarr_format=3)
    out.attrs.update(dict(g.attrs))
    for name in g.array_keys():
        a = g[name][:]
        z = out.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(64, 64), shards=(128, 128))
        z[:] = a
    return dst


def test_lenient_about_missing_dimension_names(tmp_path, montage_2x3, random_engine):
    img = montage_2x3[0][:256, :256]
    a = write_image(img, tmp_path / "a.ome.zarr", (4.0, 4.0))
    b = _resave_without_dimension_names(a, tmp_path / "b.ome.zarr")
    with pytest.warns(TilefeetWarning, match="dimension_names"):
        p = _probs(b, random_engine, block_size=256)
    np.testing.assert_array_equal(p, _probs(a, random_engine, block_size=256))


def test_a_level_whose_scale_contradicts_its_shape_is_ignored(tmp_path, montage_2x3):
    import json

    from tilefeet.image import Image

    a = write_image(montage_2x3[0][:512, :512], tmp_path / "a.ome.zarr", (4.0, 4.0), chunk=128)
    meta = json.loads((a / "zarr.json").read_text())
    meta["attributes"]["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] = [12.0, 12.0]
    (a / "zarr.json").write_text(json.dumps(meta))
    with pytest.warns(TilefeetWarning, match=r"a.ome.zarr/1: its scale 12×12 and shape 256 × 256 disagree"):
        image = Image.open(a)
    assert [lv.path for lv in image.meta.levels] == ["0", "2"]
    assert image.meta.levels[1].pixel_size_nm == (16.0, 16.0)


def test_a_torch_module_as_the_network(tmp_path, montage_2x3):
    """segment(model=nn.Module): exported once into a cached bundle, then tiled like any engine:
    bit-identical across block sizes; what cannot be inferred must be declared."""
    from monai.networks.nets import BasicUNet

    from tilefeet.errors import ConfigError

    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(8, 8, 16, 32, 64, 8), norm="batch").eval()
    img = montage_2x3[0][:384, :512]
    kw = dict(model=net, pixel_size_nm="4nm", classes=["membrane"], normalization="meanstd:125,43", chunk_size=128, tile=256, overlap=32)
    ref = tilefeet.segment(img, block_size=128, **kw)
    assert list(ref.c.values) == ["membrane"] and ref.values.std() > 0
    np.testing.assert_array_equal(tilefeet.segment(img, block_size=384, **kw).values, ref.values)
    with pytest.raises(ConfigError, match="classes"):
        tilefeet.segment(img, **{**kw, "classes": None})
    with pytest.raises(ConfigError, match="give model= too"):
        tilefeet.segment(img, "isbi-membrane", classes=["membrane"])
