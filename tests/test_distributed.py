"""The same graphs on a real dask.distributed cluster (worker processes): same bits as local threads."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import zarr

import tilefeet


@contextlib.contextmanager
def torch_threads(n: int):
    """dask's nanny starts workers with OMP_NUM_THREADS=1; oneDNN's rounding depends on the thread
    count, so the local reference runs with the workers' thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            yield c


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")
def test_segment_to_zarr_on_a_cluster_matches_local(tmp_path, section, random_engine, client):
    """Tasks carry the plan and a runner spec, never a model: each worker process builds its runner once."""
    kw = dict(chunk_size=256, block_size=512)
    graph = tilefeet.segment_to_zarr(section, tmp_path / "dist.ome.zarr", random_engine, compute=False, **kw)
    out = client.compute(graph).result()
    with torch_threads(1):
        local = tilefeet.segment_to_zarr(section, tmp_path / "local.ome.zarr", random_engine, **kw)
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(local), mode="r")
    for name in ("0", "1", "labels/membrane/0"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")
def test_lazy_segment_on_a_cluster(section, random_engine, client):
    p = tilefeet.segment(section, random_engine, chunk_size=256, block_size=512)
    with torch_threads(1):
        local = p.values
    np.testing.assert_array_equal(client.compute(p.data).result(), local)
