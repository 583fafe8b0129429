"""The same graphs on a real dask.distributed cluster (worker processes): same bits as local threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import tilefeet


@pytest.fixture
def small_section(tmp_path, montage_2x3):
    from tilefeet.convert import write_image

    return write_image(montage_2x3[0][:512, :768], tmp_path / "small.ome.zarr", (4.0, 4.0), chunk=256)


@pytest.fixture(scope="module")
def client():
    """A LocalCluster with two worker processes. Starting one sets OMP_NUM_THREADS=1 (and MKL/OpenBLAS)
    in *this* process's environment for good; it is restored afterwards, or every later subprocess
    of the session would run the network single-threaded (and round differently)."""
    import os

    distributed = pytest.importorskip("distributed")
    environ = dict(os.environ)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")
def test_segment_to_zarr_on_a_cluster_matches_local(tmp_path, small_section, random_engine, client):
    """Tasks carry the plan and a runner spec, never a model: each worker process builds its runner once.

    oneDNN's rounding depends on the CPU thread count (dask starts workers with OMP_NUM_THREADS=1),
    so both sides pin it with ``threads``: that is what makes cluster and local runs agree bit for bit.
    """
    kw = dict(chunk_size=256, block_size=512, threads=torch.get_num_threads())
    graph = tilefeet.segment_to_zarr(small_section, tmp_path / "dist.ome.zarr", random_engine, compute=False, **kw)
    out = client.compute(graph).result()
    local = tilefeet.segment_to_zarr(small_section, tmp_path / "local.ome.zarr", random_engine, **kw)
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(str(local), mode="r")
    for name in ("0", "1", "labels/membrane/0"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_block_tasks_carry_resource_annotations(tmp_path, section, random_engine):
    """Block tasks (the ones that run the network) ask for a GPU slot; pyramid tasks do not."""
    graph = tilefeet.segment_to_zarr(section, tmp_path / "a.ome.zarr", random_engine, compute=False,
                                     resources={"GPU": 1}, chunk_size=256, block_size=512)
    layers = graph.__dask_graph__().layers
    annotated = {k: layer.annotations for k, layer in layers.items() if "tilefeet-block" in str(k)}
    assert annotated and all(a == {"resources": {"GPU": 1}} for a in annotated.values())
    assert all(not layer.annotations for k, layer in layers.items() if "tilefeet-p" in str(k))


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")
def test_lazy_segment_on_a_cluster(small_section, random_engine, client):
    p = tilefeet.segment(small_section, random_engine, chunk_size=256, block_size=512, threads=torch.get_num_threads())
    np.testing.assert_array_equal(client.compute(p.data).result(), p.values)


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_a_worker_killed_mid_job_changes_nothing(tmp_path, small_section, random_engine, client):
    """SIGKILL one worker process while blocks are being written: dask reruns its tasks elsewhere,
    the blocks it left half-written are rewritten whole (blocks own their chunks, records come
    last), and the output equals a local run's; its provenance says which backend ran the blocks."""
    import os
    import signal
    import time

    kw = dict(chunk_size=128, block_size=128, threads=torch.get_num_threads())
    out = tmp_path / "dist.ome.zarr"
    future = client.compute(tilefeet.segment_to_zarr(small_section, out, random_engine, compute=False, **kw))
    done = tmp_path / "dist.ome.zarr.partial" / ".tilefeet" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and not (done.exists() and len(list(done.iterdir())) >= 3):
        time.sleep(0.05)
    assert not future.done(), "the job finished before a worker could be killed; make the section bigger"
    pid = next(iter(client.run(os.getpid).values()))
    os.kill(pid, signal.SIGKILL)
    result = future.result(timeout=300)
    local = tilefeet.segment_to_zarr(small_section, tmp_path / "local.ome.zarr", random_engine, **kw)
    a, b = zarr.open_group(str(result), mode="r"), zarr.open_group(str(local), mode="r")
    for name in ("0", "1", "labels/membrane/0"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    backends = a.attrs["ome"]["multiscales"][0]["metadata"]["backends"]
    assert sum(backends.values()) == 24 and set(backends) <= {"torch", "onnxruntime", "openvino"}


def _pyramid_deps(tmp_path, montage_2x3, random_engine, **kw):
    """name -> the block and pyramid tasks it depends on, for a 1024 × 1536 section; and the graph's deps."""
    from tilefeet.convert import write_image

    src = write_image(montage_2x3[0], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=256)
    graph = tilefeet.segment_to_zarr(src, tmp_path / "a.ome.zarr", random_engine, compute=False, **kw)
    deps = graph.__dask_graph__().get_all_dependencies()

    def name(key):  # "tilefeet-p1_0_2-<token>" -> "p1_0_2", "tilefeet-block-<token>-0-2" -> "b0_2"
        parts = str(key).split("-")
        return f"b{parts[-2]}_{parts[-1]}" if parts[1] == "block" else parts[1]

    on = {name(k): {name(d) for d in v if "tilefeet-block" in str(d) or "tilefeet-p" in str(d)}
          for k, v in deps.items() if str(k).startswith("tilefeet-p")}
    written = next(k for k in deps if str(k).startswith("tilefeet-written"))
    final = next(k for k in deps if str(k).startswith("tilefeet-finalize"))
    assert written in deps[final]  # finalize still waits for every block and pyramid task
    return on, {name(d) for d in deps[written]}


BLOCKS = {f"b{y}_{x}" for y in range(2) for x in range(3)}


def test_each_pyramid_task_waits_only_for_the_tasks_under_it(tmp_path, montage_2x3, random_engine):
    """Found on the H200: with a barrier per pyramid level, the pyramid (the largest CPU stage of a
    gigapixel run) ran as a tail after the last block, the GPU idle. A task of level L now depends on
    the tasks of level L−1 under its region only (the output's bits are the same: test_segment).
    Chunks of 512 = blocks of 512: a level-1 task (512² of level 1) covers 2 × 2 blocks."""
    on, written = _pyramid_deps(tmp_path, montage_2x3, random_engine, chunk_size=512, block_size=512)
    assert on["p1_0_0"] == {"b0_0", "b0_1", "b1_0", "b1_1"} and on["p1_0_1"] == {"b0_2", "b1_2"}
    assert on["p2_0_0"] == {"p1_0_0", "p1_0_1"}
    assert written == BLOCKS | set(on)


def test_blocks_write_pyramid_level_1_where_a_level_1_task_is_one_block(tmp_path, montage_2x3, random_engine):
    """Chunks of 256, blocks of 512: each level-1 task (256² of level 1) is exactly one block, which
    writes it from memory (no re-read of level 0); level 2 waits for the blocks under it."""
    on, written = _pyramid_deps(tmp_path, montage_2x3, random_engine, chunk_size=256, block_size=512)
    assert not any(k.startswith("p1_") for k in on)
    # Level 2 (256 × 384, tasks of 256²): the blocks under 512² of level 1, and under the last 512 × 256.
    assert on["p2_0_0"] == {"b0_0", "b0_1", "b1_0", "b1_1"} and on["p2_0_1"] == {"b0_2", "b1_2"}
    assert written == BLOCKS | set(on)
