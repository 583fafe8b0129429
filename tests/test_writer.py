"""The output store: what resume compares, the crash-safe move into place, the pyramid's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from tilefeet.storage import old_path, recover, replace_dir, staging_path
from tilefeet.writer import describe_difference, downsample_mean


def test_resume_names_what_differs():
    old = {"fingerprint": "a", "settings": {"tile": [256, 256], "threshold": 0.5, "blend": "gaussian"}, "input": "x", "engine": "e", "intensity": "i"}
    new = {"fingerprint": "b", "settings": {"tile": [512, 512], "threshold": 0.5, "blend": "cosine"}, "input": "x", "engine": "f", "intensity": "i"}
    text = describe_difference(old, new)
    assert "--tile 256 (now 512)" in text and "--blend gaussian (now cosine)" in text and "another engine" in text
    assert "threshold" not in text and describe_difference(old, {**old}) == ""


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 7, 9)])
def test_uint8_pyramid_means_equal_the_float_path(shape):
    a = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    out = ((shape[1] + 1) // 2, (shape[2] + 1) // 2)
    np.testing.assert_array_equal(downsample_mean(a, out), downsample_mean(a.astype(np.float32), out))


def _folder(path, text):
    path.mkdir()
    (path / "x").write_text(text)


def test_replace_dir_and_recover_from_every_crash_point(tmp_path):
    out = tmp_path / "o.ome.zarr"
    _folder(out, "old")
    _folder(staging_path(out), "new")
    assert replace_dir(staging_path(out), out) == out and (out / "x").read_text() == "new"
    assert not old_path(out).exists() and not staging_path(out).exists()
    # Died after setting the old output aside, before the rename: recover puts it back.
    _folder(staging_path(out), "newer")
    out.rename(old_path(out))
    recover(out)
    assert (out / "x").read_text() == "new" and staging_path(out).exists()
    # Died after the rename, before deleting the old one: recover deletes it.
    _folder(old_path(out), "stale")
    recover(out)
    assert not old_path(out).exists() and (out / "x").read_text() == "new"


SECTION = (383, 449)  # odd: partial edge blocks and pyramid levels with a padded last row and column
FUSED = dict(tile=128, overlap=32, chunk_size=64, block_size=128, batch_size=2, threads=1)  # level-1 task = one block


def _stores(tmp_path, random_engine, monkeypatch, src, **kw):
    """The same run twice: blocks writing pyramid level 1 from memory, and pyramid tasks reading level 0
    back from the store (the behaviour before); both stores, opened."""
    import zarr

    import tilefeet
    from tilefeet.writer import OutputStore

    fused = tilefeet.segment_to_zarr(src, tmp_path / "fused.ome.zarr", random_engine, **FUSED, **kw)
    with monkeypatch.context() as m:
        m.setattr(OutputStore, "fuses_level1", lambda self: False)
        read_back = tilefeet.segment_to_zarr(src, tmp_path / "read.ome.zarr", random_engine, **FUSED, **kw)
    return zarr.open_group(str(fused), mode="r"), zarr.open_group(str(read_back), mode="r")


def _assert_same_levels(a, b, expect=("1", "labels/membrane/1")):
    import zarr

    names = sorted(name for name, node in a.members(max_depth=None) if isinstance(node, zarr.Array))
    assert set(expect) <= set(names), names
    for name in names:
        x, y = a[name][:], b[name][:]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("kw", [dict(), dict(output_dtype="float16"), dict(tta=2, uncertainty=True)], ids=["uint8", "float16", "uncertainty"])
def test_level_1_written_from_memory_equals_level_1_read_back(tmp_path, random_engine, monkeypatch, kw):
    """Blocks write pyramid level 1 from the arrays they have just written (no re-read of level 0):
    every level of every array has the bits of the pyramid read back from the store."""
    from tilefeet.convert import write_image

    from .conftest import isbi_montage

    src = write_image(isbi_montage(1, 1)[0][: SECTION[0], : SECTION[1]], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=64)
    expect = ("1", "labels/membrane/1", *(("uncertainty/1",) if kw.get("uncertainty") else ()))
    _assert_same_levels(*_stores(tmp_path, random_engine, monkeypatch, src, **kw), expect=expect)


def test_level_1_from_memory_with_a_mask_and_in_a_stack(tmp_path, random_engine, monkeypatch):
    """Blocks outside a tissue mask write level 1 as the pyramid task would (the fill value read
    back); a stack's block writes level 1 of each of its sections."""
    from tilefeet.convert import write_image

    from .conftest import isbi_montage

    img = isbi_montage(1, 1)[0][: SECTION[0], : SECTION[1]]
    src = write_image(img, tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=64)
    coarse = np.zeros((6, 7), np.uint8)
    coarse[:, :3] = 1  # the left part only, at 64 nm
    mask = write_image(coarse, tmp_path / "mask.ome.zarr", (64.0, 64.0), chunk=8)
    _assert_same_levels(*_stores(tmp_path / "m", random_engine, monkeypatch, src, mask=str(mask)))
    stack = write_image(np.stack([img, img[::-1], img[:, ::-1]]), tmp_path / "stack.ome.zarr", (4.0, 4.0), chunk=64, z_spacing_nm=50.0)
    _assert_same_levels(*_stores(tmp_path / "z", random_engine, monkeypatch, stack, block_depth=2))
