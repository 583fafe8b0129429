"""`tilefeet convert`: TIFF (tiled, striped, uncompressed), PNG, montage folders → OME-Zarr 0.5 pyramids."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import zarr

from tilefeet.cli import main
from tilefeet.convert import grid_positions, lazy_tiff, open_input
from tilefeet.errors import ConfigError, InvalidImageError
from tilefeet.image import Image

from .conftest import isbi_montage


@pytest.fixture(scope="module")
def big():
    img, _ = isbi_montage(3, 4)  # 1536 × 2048 of real texture
    return np.ascontiguousarray(img)


@pytest.mark.parametrize("kind", ["tiled-zstd", "strips-deflate", "uncompressed"])
def test_large_tiff_is_read_lazily_and_converted_exactly(tmp_path, capsys, big, kind):
    path = tmp_path / f"{kind}.tif"
    if kind == "tiled-zstd":
        tifffile.imwrite(path, big, tile=(256, 256), compression="zstd")
    elif kind == "strips-deflate":
        tifffile.imwrite(path, big, rowsperstrip=64, compression="zlib")
    else:
        tifffile.imwrite(path, big)
    lazy = lazy_tiff(path)
    # Lazy: a graph over tiles/strips (or a memory map), not one array read at once.
    assert lazy.numblocks != (1, 1)
    out = tmp_path / f"{kind}.ome.zarr"
    assert main(["-q", "convert", str(path), str(out), "--pixel-size", "0.004um", "--chunk", "512"]) == 0
    img = Image.open(out)
    assert img.meta.pixel_size_nm == pytest.approx((4.0, 4.0))
    assert [lv.shape for lv in img.meta.levels] == [(1536, 2048), (768, 1024), (384, 512)]
    root = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(root["0"][:], big)
    assert root["0"].chunks == (512, 512)
    # Level 1 is the rounded 2×2 mean of level 0.
    l1 = big.reshape(768, 2, 1024, 2).astype(np.float32).mean(axis=(1, 3))
    np.testing.assert_array_equal(root["1"][:], np.round(l1).astype(np.uint8))


def test_png_and_grid_option(tmp_path, capsys):
    from .conftest import isbi_slices

    imgs, _ = isbi_slices()
    iio.imwrite(tmp_path / "one.png", imgs[0])
    assert main(["-q", "convert", str(tmp_path / "one.png"), str(tmp_path / "one.ome.zarr"), "--pixel-size", "5nm"]) == 0
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "one.ome.zarr"), mode="r")["0"][:], imgs[0])
    folder = tmp_path / "plain"
    folder.mkdir()
    for i, a in enumerate(imgs):
        iio.imwrite(folder / f"img{i:02d}.png", a)
    out = tmp_path / "grid.ome.zarr"
    assert main(["-q", "convert", str(folder), str(out), "--pixel-size", "4nm", "--grid", "3x2"]) == 0
    want = np.block([[imgs[0], imgs[1]], [imgs[2], imgs[3]], [imgs[4], imgs[5]]])
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][:], want)


@pytest.mark.parametrize(
    "names,expect",
    [
        (["tile_r0_c0.tif", "tile_r0_c1.tif", "tile_r1_c0.tif"], [(0, 0), (0, 1), (1, 0)]),
        (["row2_col5.png", "row3_col5.png"], [(0, 0), (1, 0)]),
        (["y1_x2.tif", "y1_x3.tif"], [(0, 0), (0, 1)]),
        (["img_0_1.png", "img_1_0.png"], [(0, 1), (1, 0)]),
    ],
)
def test_grid_positions_from_file_names(tmp_path, names, expect):
    assert grid_positions([tmp_path / n for n in names], None) == expect


def test_montage_bad_inputs(tmp_path):
    from .conftest import isbi_slices

    imgs, _ = isbi_slices()
    folder = tmp_path / "m"
    folder.mkdir()
    iio.imwrite(folder / "a.png", imgs[0])
    iio.imwrite(folder / "b.png", imgs[1])
    with pytest.raises(ConfigError, match="--grid ROWSxCOLS"):
        open_input(folder)
    with pytest.raises(ConfigError, match="needs 6 tiles"):
        open_input(folder, grid=(2, 3))
    iio.imwrite(folder / "b.png", imgs[1][:100])
    with pytest.raises(InvalidImageError, match="tiles must match"):
        open_input(folder, grid=(1, 2)).compute()
    rgb = np.stack([imgs[0], imgs[1], imgs[2]], axis=-1)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    with pytest.raises(InvalidImageError, match="colour image"):
        open_input(tmp_path / "rgb.png")


def test_a_montage_with_a_missing_tile_says_so(tmp_path):
    from tilefeet.errors import TilefeetWarning

    from .conftest import isbi_slices

    imgs, _ = isbi_slices()
    folder = tmp_path / "m"
    folder.mkdir()
    for name, img in (("r0_c0", imgs[0]), ("r0_c1", imgs[1]), ("r1_c0", imgs[2])):
        iio.imwrite(folder / f"{name}.png", img)
    with pytest.warns(TilefeetWarning, match=r"2 × 2 but 1 position\(s\) have no tile \(r1_c1\)"):
        data = open_input(folder)
    a = data.compute()
    assert a.shape == (1024, 1024) and not a[512:, 512:].any()
    np.testing.assert_array_equal(a[512:, :512], imgs[2])


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    from .conftest import isbi_slices

    iio.imwrite(tmp_path / "one.png", isbi_slices()[0][0])
    out = tmp_path / "one.ome.zarr"
    assert main(["-q", "convert", str(tmp_path / "one.png"), str(out), "--pixel-size", "4nm"]) == 0
    before = (out / "zarr.json").read_bytes()
    code = main(["convert", str(tmp_path / "one.png"), str(out), "--pixel-size", "4nm"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "zarr.json").read_bytes() == before


def test_a_colour_tiff_is_refused_and_leaves_nothing(tmp_path, capsys):
    """A big TIFF is read lazily, so its colour shows only in the pixels: an RGB TIFF whose channels
    differ (in one piece only) is refused in one line with nothing written; a grey image saved as
    RGB converts to its grey plane."""
    grey = isbi_montage(1, 1)[0][:300, :200]
    rgb = np.stack([grey] * 3, axis=-1)
    tifffile.imwrite(tmp_path / "grey-rgb.tif", rgb, tile=(64, 64))
    assert main(["convert", str(tmp_path / "grey-rgb.tif"), str(tmp_path / "g.ome.zarr"), "--pixel-size", "4nm", "--chunk", "128"]) == 0
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "g.ome.zarr"), mode="r")["0"][:], grey)
    rgb[250:, 150:, 2] //= 2  # colour in the last piece only
    tifffile.imwrite(tmp_path / "colour.tif", rgb, tile=(64, 64))
    capsys.readouterr()
    code = main(["convert", str(tmp_path / "colour.tif"), str(tmp_path / "c.ome.zarr"), "--pixel-size", "4nm", "--chunk", "128", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "colour image" in err[0], err
    assert not list(tmp_path.glob("c.ome.zarr*"))


def test_a_failed_conversion_raises_only_once_no_task_still_writes():
    """settled_compute waits for the tasks still running when one fails (dask's threaded scheduler
    raises at once, and a late chunk write recreated a staging folder just deleted)."""
    import threading
    import time

    import dask

    from tilefeet.convert import settled_compute

    running, lock = [0], threading.Lock()

    def slow(i):
        with lock:
            running[0] += 1
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return i

    def fail(i):
        time.sleep(0.05)
        raise ValueError("bad pixels")

    tasks = [dask.delayed(slow)(i) for i in range(3)] + [dask.delayed(fail)(0)]
    with pytest.raises(ValueError, match="bad pixels"):
        settled_compute(*tasks)
    assert running[0] == 0
