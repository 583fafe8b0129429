"""Tiles shared by neighbouring blocks are computed once per process, and nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilefeet
from tilefeet.runners import clear_runners
from tilefeet.runners.torch_runner import TorchRunner
from tilefeet.tilecache import TileCache

KW = dict(chunk_size=128, output_dtype="float32", batch_size=3, backend="torch", block_size=256)


@pytest.fixture
def count_batches(monkeypatch):
    calls = []
    original = TorchRunner.__call__

    def counted(self, batch):
        calls.append(batch.shape[0])
        return original(self, batch)

    monkeypatch.setattr(TorchRunner, "__call__", counted)
    return calls


def _run(section, engine, monkeypatch, budget_mb: str, **kw):
    monkeypatch.setenv("TILEFEET_TILE_CACHE_MB", budget_mb)
    clear_runners()  # the cache belongs to the runner: a fresh one reads the budget
    try:
        return tilefeet.segment(section, engine, **{**KW, **kw}).values
    finally:
        clear_runners()


@pytest.mark.filterwarnings("ignore::tilefeet.plan.SeamWarning")  # small tiles on purpose: much straddling
@pytest.mark.parametrize("blend", ["gaussian", "crop"])
def test_shared_tiles_run_once_and_the_bits_do_not_change(section, random_engine, monkeypatch, count_batches, blend):
    plan = tilefeet.plan_segmentation(section, random_engine, **KW, blend=blend).plan
    lattice_tiles = plan.lattice.n_tiles
    evaluations = sum(plan.block(*b).n_tiles for b in plan.blocks)
    assert evaluations > 1.3 * lattice_tiles  # small blocks: much straddling to save

    without = _run(section, random_engine, monkeypatch, "0", blend=blend)
    batches_without = len(count_batches)
    count_batches.clear()
    with_cache = _run(section, random_engine, monkeypatch, "512", blend=blend)
    np.testing.assert_array_equal(with_cache, without)
    # One thread per block in flight may compute a shared tile at the same moment as its
    # neighbour, and batches are padded: allow a little above one evaluation per lattice tile.
    assert batches_without >= evaluations / 3
    assert len(count_batches) * 3 <= 1.1 * lattice_tiles + 3 * plan.blocks.counts[0] * plan.blocks.counts[1]
    assert len(count_batches) < 0.8 * batches_without


def test_a_tiny_budget_only_costs_recomputation(section, random_engine, monkeypatch):
    full = _run(section, random_engine, monkeypatch, "512")
    tiny = _run(section, random_engine, monkeypatch, "0.3")  # room for one or two tiles
    np.testing.assert_array_equal(tiny, full)


def test_entries_leave_with_their_last_consumer_and_the_budget_holds():
    cache = TileCache(budget=3 * 4 * 8 * 8)  # three 8×8 float32 tiles
    t = torch.ones(1, 8, 8)
    cache.put(("k", 0, 0), t, consumers=3)  # two more blocks want it
    assert cache.take(("k", 0, 0)) is t and len(cache) == 1
    assert cache.take(("k", 0, 0)) is t and len(cache) == 0  # the last consumer removed it
    assert cache.take(("k", 0, 0)) is None
    cache.put(("k", 1, 1), t, consumers=1)  # nobody else needs it: not kept
    assert len(cache) == 0
    for i in range(5):
        cache.put(("k", 2, i), t, consumers=2)
    assert len(cache) == 3 and cache.used == 3 * t.numel() * 4  # oldest went first
    assert ("k", 2, 0) not in cache and ("k", 2, 4) in cache
    cache.put(("k", 2, 4), t, consumers=2)  # a neighbour computed it too: that was its use
    assert ("k", 2, 4) not in cache


def test_the_local_run_takes_blocks_in_row_major_order(tmp_path, section, random_engine, monkeypatch):
    """dask's order over independent blocks is arbitrary; the local run chains block k to block
    k - blocks_in_flight, so neighbours run close together (and share tiles through the cache)."""
    import tilefeet.schedule

    seen = []
    original = tilefeet.schedule._write_block
    monkeypatch.setattr(
        tilefeet.schedule, "_write_block", lambda run, store, index, *rest: seen.append(index) or original(run, store, index, *rest)
    )
    kw = {k: v for k, v in KW.items() if k != "output_dtype"}
    plan = tilefeet.plan_segmentation(section, random_engine, **kw, blocks_in_flight=1).plan
    tilefeet.segment_to_zarr(section, tmp_path / "o.ome.zarr", random_engine, **kw, blocks_in_flight=1)
    assert seen == list(plan.blocks) and len(seen) > 8
    seen.clear()
    tilefeet.segment_to_zarr(section, tmp_path / "o2.ome.zarr", random_engine, **kw, blocks_in_flight=2)
    rank = {b: i for i, b in enumerate(plan.blocks)}
    assert all(abs(rank[b] - i) <= 1 for i, b in enumerate(seen))  # at most two at a time, in order
