"""Dask graphs around the block function: one task per output block, then the pyramid, then finalize.

The graph is thin: each task is plain Python over arrays, carries only the plan, the image handle
and a :class:`~tilefeet.runners.RunnerSpec` (never a model: each process builds its runner once),
and returns a tiny record instead of data. Run locally with dask's threaded scheduler and
``blocks_in_flight`` workers, at most that many blocks exist in memory at once, whatever the
section's size; reading and writing of some blocks overlap with the device computing another.
The same graph runs unchanged on ``dask.distributed``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import dask
import numpy as np
from dask import delayed

from .block import compute_block, finish_block
from .plan import Plan
from .runners import RunnerSpec, get_runner
from .writer import OutputStore

log = logging.getLogger("tilefeet")


class Job:
    """What every task of one run shares; travels once per graph (a single dask leaf)."""

    def __init__(self, plan: Plan, image: Any, spec: RunnerSpec, store: OutputStore | None = None):
        self.plan, self.image, self.spec, self._store = plan, image, spec, store

    @property
    def store(self) -> OutputStore:
        if self._store is None:
            raise RuntimeError("this job computes blocks lazily and has no output store")
        return self._store


def block_record(index: tuple[int, int]) -> str:
    return f"b{index[0]}_{index[1]}"


def _write_block(job: Job, index: tuple[int, int], *_after: Any) -> str:
    runner = get_runner(job.spec)
    t0 = time.perf_counter()
    p = compute_block(job.plan, index, job.image, runner)
    out = finish_block(p, job.plan, job.plan.blocks.box(*index))
    t1 = time.perf_counter()
    record = block_record(index)
    job.store.write_block(out, record)
    if log.isEnabledFor(logging.DEBUG):
        geo = job.plan.block(*index)
        log.debug(
            "block %s %s: %d tiles, computed in %.2f s, written in %.2f s",
            index, geo.out_box, geo.n_tiles, t1 - t0, time.perf_counter() - t1,
        )
    return record


def _compute_block(job: Job, index: tuple[int, int]) -> np.ndarray:
    runner = get_runner(job.spec)
    return compute_block(job.plan, index, job.image, runner).cpu().numpy()


def _pyramid_block(job: Job, level: int, box: Any, record: str, *_after: Any) -> str:
    job.store.write_pyramid_block(level, box, record)
    return record


def _barrier(*records: Any) -> int:
    return len(records)


def _finalize(job: Job, *_after: Any) -> str:
    return str(job.store.finalize())


def write_graph(job: Job, resources: dict | None = None, *, in_order: int | None = None) -> Any:
    """A dask ``Delayed`` that writes every unfinished block, builds the pyramid and finalizes the store.

    ``resources`` (e.g. ``{"GPU": 1}``) annotates the block tasks, the ones that run the network, so
    that a ``dask.distributed`` cluster whose workers declare that resource runs them only there.

    ``in_order=n`` makes block ``k`` (row-major) wait for block ``k - n``: at most ``n`` blocks are
    ready at a time, in row-major order. dask's own order over independent tasks is arbitrary;
    row-major order is what lets neighbouring blocks share tiles through the tile cache (a block's
    neighbours run soon after it, while its border tiles are still cached). For the local run with
    ``n`` workers; a cluster gets the unchained graph (its parallelism is the point).
    """
    store, plan = job.store, job.plan
    leaf = delayed(job, traverse=False)
    token = plan.fingerprint()[:12]
    tasks: list[Any] = []
    with dask.annotate(**({"resources": resources} if resources else {})):
        for index in plan.blocks:  # row-major
            if block_record(index) in store.done:
                continue
            after = tasks[-in_order:][:1] if in_order and len(tasks) >= in_order else []
            name = f"tilefeet-block-{token}-{index[0]}-{index[1]}"
            tasks.append(delayed(_write_block, pure=False)(leaf, index, *after, dask_key_name=name))
    after = delayed(_barrier)(*tasks, dask_key_name=f"tilefeet-level0-{token}")
    for level in range(1, store.levels()):
        level_tasks = [
            delayed(_pyramid_block, pure=False)(leaf, level, box, record, after, dask_key_name=f"tilefeet-{record}-{token}")
            for record, box in store.pyramid_tasks(level)
            if record not in store.done
        ]
        after = delayed(_barrier)(after, *level_tasks, dask_key_name=f"tilefeet-level{level}-{token}")
    return delayed(_finalize, pure=False)(leaf, after, dask_key_name=f"tilefeet-finalize-{token}")


def lazy_array(job: Job) -> Any:
    """Float32 probabilities ``(C, H, W)`` as a dask array with one chunk per output block (not computed)."""
    import dask.array as da

    plan = job.plan
    leaf = delayed(job, traverse=False)
    token = plan.fingerprint()[:12]
    n = len(plan.engine.classes)
    ny, nx = plan.blocks.counts
    rows = []
    for by in range(ny):
        row = []
        for bx in range(nx):
            box = plan.blocks.box(by, bx)
            d = delayed(_compute_block, pure=True)(leaf, (by, bx), dask_key_name=f"tilefeet-lazy-{token}-{by}-{bx}")
            row.append(da.from_delayed(d, (n, *box.shape), dtype=np.float32))
        rows.append(row)
    return da.block(rows)


def run(graph: Any, *, workers: int, progress: bool, description: str = "segment") -> Any:
    """Compute ``graph`` with the threaded scheduler, ``workers`` tasks at a time, with a progress bar."""
    with _ProgressBar(description, enabled=progress):
        (result,) = dask.compute(graph, scheduler="threads", num_workers=workers)
    return result


class _ProgressBar(dask.callbacks.Callback):
    """A tqdm bar over the output blocks (the tasks that run the network); the pyramid that follows
    shows as a note on the finished bar, so "1/1 block" means one block, not one block and a level."""

    def __init__(self, description: str, enabled: bool):
        super().__init__()
        self.description, self.enabled, self.bar = description, enabled, None
        self.pyramid_shown = False

    def _start_state(self, dsk: Any, state: Any) -> None:
        from tqdm.auto import tqdm

        total = sum(1 for k in state["ready"] + list(state["waiting"]) if _is_block(k))
        self.bar = tqdm(total=total, desc=self.description, unit="block", disable=not self.enabled, dynamic_ncols=True)

    def _pretask(self, key: Any, dsk: Any, state: Any) -> None:
        if self.bar is not None and self.enabled and _is_pyramid(key) and not self.pyramid_shown:
            self.bar.set_postfix_str("pyramid")
            self.pyramid_shown = True

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if self.bar is not None and _is_block(key):
            self.bar.update(1)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_block(key: Any) -> bool:
    return str(key).startswith("tilefeet-block-")


def _is_pyramid(key: Any) -> bool:
    return str(key).startswith("tilefeet-p")
