"""The segment pipeline on a CUDA GPU: the same guarantees as on the CPU (marked ``gpu``: skipped,
with the reason, where torch sees no GPU).

Written without a GPU at hand (none was lent while this was built): run ``pytest -m gpu`` first
on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest

import tilefeet
from tilefeet.convert import write_image

pytestmark = pytest.mark.gpu

KW = dict(chunk_size=128, output_dtype="float32", batch_size=3, device="cuda", backend="torch")


def _probs(src, engine, **kw):
    return tilefeet.segment(src, engine, **{**KW, **kw}).values


@pytest.mark.parametrize("options", [(), ("compile=true",), ("cuda_graphs=true",)])
def test_bit_identical_across_block_sizes_on_the_gpu(section, random_engine, options):
    """Deterministic cuDNN, fixed batch shapes and the global lattice: block size changes nothing."""
    tile = random_engine.tile
    ref = _probs(section, random_engine, block_size=tile, backend_options=list(options) or None)
    assert ref.std() > 0.05
    for block in (2 * tile, 4 * tile):
        np.testing.assert_array_equal(_probs(section, random_engine, block_size=block, backend_options=list(options) or None), ref)


def test_resampling_on_the_gpu_is_block_invariant(tmp_path, montage_2x3, random_engine):
    src = write_image(montage_2x3[0][:512, :640], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=128)
    ref = _probs(src, random_engine, block_size=128, pixel_size_nm="5nm")
    np.testing.assert_array_equal(_probs(src, random_engine, block_size=512, pixel_size_nm="5nm"), ref)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("fp16", 1e-2), ("bf16", 3e-2)])
def test_gpu_agrees_with_the_cpu(section, random_engine, precision, tolerance):
    cpu = tilefeet.segment(section, random_engine, **{**KW, "device": "cpu"}, block_size=512).values
    gpu = _probs(section, random_engine, block_size=512, precision=precision)
    assert np.abs(gpu - cpu).max() <= tolerance


def test_gpu_written_store_equals_the_lazy_result(tmp_path, section, random_engine):
    import zarr

    out = tilefeet.segment_to_zarr(section, tmp_path / "o.ome.zarr", random_engine, block_size=512, **KW)
    written = zarr.open_group(str(out), mode="r")["0"][:]
    np.testing.assert_array_equal(written, _probs(section, random_engine, block_size=512))
