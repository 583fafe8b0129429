"""torch's intra-op thread count is process-wide, and oneDNN's rounding depends on it: a run with
``threads=`` sets it for its network calls and restores it after each, so it never changes the bits
of a later run in the same process."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
import zarr

import tilefeet
from tilefeet.convert import write_image

#: The "default" count of this test's process and of the fresh one: not 1, whatever the machine
#: (xdist's workers run one thread), so that a leaked ``threads=1`` would show.
DEFAULT = 2
KW = dict(backend="torch", output_dtype="float32", chunk_size=128, block_size=256, invert=False)

FRESH = """
import sys, numpy as np, torch, zarr, tilefeet
assert torch.get_num_threads() == {default}, torch.get_num_threads()
out = tilefeet.segment_to_zarr(sys.argv[1], sys.argv[2], sys.argv[3], **{kw!r})
np.save(sys.argv[4], zarr.open_group(str(out), mode="r")["0"][:])
"""


def test_a_run_with_one_thread_leaves_a_later_default_run_the_bits_of_a_fresh_process(tmp_path, montage_2x3, random_engine):
    """A run at ``threads=1``, then one with the default, in a process whose count is DEFAULT: the
    second has the bits of a fresh process's default run. Also after a run at another count had
    started dask's pool threads (ATen gives a thread its count once: they would keep the old one)."""
    src = write_image(montage_2x3[0][:256, :256], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=128)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        tilefeet.segment_to_zarr(src, tmp_path / "first.ome.zarr", random_engine, **KW)  # pool threads start at 1
        torch.set_num_threads(DEFAULT)
        tilefeet.segment_to_zarr(src, tmp_path / "one.ome.zarr", random_engine, threads=1, **KW)
        assert torch.get_num_threads() == DEFAULT
        later = tilefeet.segment_to_zarr(src, tmp_path / "later.ome.zarr", random_engine, **KW)
        assert torch.get_num_threads() == DEFAULT
    finally:
        torch.set_num_threads(before)

    env = {**os.environ, "OMP_NUM_THREADS": str(DEFAULT), "MKL_NUM_THREADS": str(DEFAULT)}
    script = FRESH.format(default=DEFAULT, kw=KW)
    fresh = tmp_path / "fresh.npy"
    r = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "fresh.ome.zarr"), str(random_engine.path), str(fresh)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = zarr.open_group(str(later), mode="r")["0"][:]
    assert got.std() > 0.05  # the random network is not flat: equality means something
    np.testing.assert_array_equal(got, np.load(fresh))
