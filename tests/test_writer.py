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
