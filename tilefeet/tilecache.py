"""Tiles shared by neighbouring blocks, computed once per process.

A tile that straddles a block border is needed by every block it touches. Each block could (and
without this cache does) run it again: on a large section with 4096² blocks and 512² tiles that
is about a quarter more network work (``--dry-run`` reports it as "block straddling"). The tile's
input does not depend on the block that reads it (global lattice, global reflection and
resampling taps), and runners compute each tile independently of the others in its batch (the
conformance suite checks it), so a tile computed by one block is bit for bit what its neighbour
would compute. The neighbour takes it from here instead.

Entries are keyed by the plan's fingerprint and the tile's lattice index, live on the runner's
device, and count their remaining consumers (the blocks whose tile range contains them): the last
consumer removes the entry. A byte budget bounds the whole (least recently used entries go
first), so memory stays flat whatever the section's size; a miss only costs the recomputation.
Blocks processed by other processes (a dask.distributed cluster) simply compute their own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Entry:
    prediction: Any  # torch.Tensor (C, th, tw) on the runner's device
    uses_left: int


class TileCache:
    """Predictions of shared tiles, with their remaining consumers; thread-safe."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, int, int], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: tuple[str, int, int]) -> Any | None:
        """The cached prediction for ``key`` (and one use of it), or ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            entry.uses_left -= 1
            if entry.uses_left <= 0:
                self._drop(key)
            else:
                self._entries.move_to_end(key)
            return entry.prediction

    def put(self, key: tuple[str, int, int], prediction: Any, consumers: int) -> None:
        """Record that one consumer computed ``key`` itself; keep it for the others."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:  # computed twice (two blocks at once): the bits are the same
                entry.uses_left -= 1
                if entry.uses_left <= 0:
                    self._drop(key)
                return
            size = prediction.numel() * prediction.element_size()
            if consumers <= 1 or size > self.budget:
                return
            while self.used + size > self.budget and self._entries:
                self._drop(next(iter(self._entries)))
            self._entries[key] = _Entry(prediction, consumers - 1)
            self.used += size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[str, int, int]) -> bool:
        with self._lock:
            return key in self._entries

    def _drop(self, key: tuple[str, int, int]) -> None:
        entry = self._entries.pop(key)
        self.used -= entry.prediction.numel() * entry.prediction.element_size()


def cache_for(runner: Any, budget_mb: int) -> TileCache | None:
    """The runner's tile cache (one per runner, so per device and process), or ``None`` when off
    (``budget_mb`` 0: ``Settings.tile_cache_mb``, from ``--tile-cache-mb`` or ``$TILEFEET_TILE_CACHE_MB``)."""
    if budget_mb <= 0:
        return None
    budget = int(budget_mb * 2**20)
    cache = getattr(runner, "_tile_cache", None)
    if cache is None:
        cache = TileCache(budget)
        runner._tile_cache = cache
    cache.budget = budget  # the run's budget (entries beyond it leave as new ones arrive)
    return cache


_consumers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
_consumers_lock = threading.Lock()


def consumers(plan: Any, fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
    """How many blocks need each lattice row and column of tiles: a tile's consumers are
    ``ys[iy] * xs[ix]`` (a block's tiles are one range per axis, each set by its row or column)."""
    with _consumers_lock:
        found = _consumers.get(fingerprint)
        if found is None:
            ny, nx = plan.lattice.counts
            by, bx = plan.blocks.counts
            ys, xs = np.zeros(ny, np.int64), np.zeros(nx, np.int64)
            for i in range(by):
                ys[np.asarray(plan.block(i, 0).tiles[0])] += 1
            for j in range(bx):
                xs[np.asarray(plan.block(0, j).tiles[1])] += 1
            if len(_consumers) >= 8:
                _consumers.pop(next(iter(_consumers)))
            found = _consumers[fingerprint] = (ys, xs)
        return found
