"""Dask graphs around the block function: one task per output block, then the pyramid, then finalize.

The graph is thin: each task is plain Python over arrays, carries only the :class:`Run` (the plan,
the image handle, a :class:`~tilefeet.runners.RunnerSpec`; never a model: each process builds its
runner once) and returns a tiny record instead of data. Run locally with dask's threaded scheduler
and ``blocks_in_flight`` workers, at most that many blocks exist in memory at once, whatever the
section's size; reading and writing of some blocks overlap with the device computing another.
The same graph runs unchanged on ``dask.distributed``.

Keys identify the whole job: the plan's fingerprint (input path or in-memory data token, engine,
every setting that changes bits), the runner spec and the output path, so any number of jobs
compose into one graph. An in-memory input reaches each block task as the dask array of the
pixels it needs (the scheduler computes it: no ``compute`` inside a task, nothing pickled whole).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
from dask import delayed
from dask.base import tokenize

from .block import compute_block, finish_block
from .image import Image, Region
from .plan import Plan
from .profile import PROFILE
from .runners import RunnerSpec
from .writer import OutputStore

log = logging.getLogger("tilefeet")


@dataclass(frozen=True)
class Run:
    """One planned segmentation: what every task of its graph shares (a single dask leaf).

    ``runner.backend`` is concrete for runs computed here, or ``"auto"`` for graphs that may run
    elsewhere (``compute=False``, the lazy array): each process then chooses where the network runs.
    """

    plan: Plan
    image: Image
    bundle: Any  #: the EngineBundle (metadata; its weights load in each process's runner)
    runner: RunnerSpec
    backend_reason: str = ""

    def token(self, *extra: Any) -> str:
        """Identifies the job (and ``extra``: an output path) in dask keys."""
        return tokenize(self.plan.fingerprint(), self.runner, *extra)

    def describe(self) -> str:
        r = self.runner
        options = "".join(f", {k}={v}" for k, v in r.options)
        backend = f"{r.backend}{options} on {r.device}, {r.precision}" + (f" ({self.backend_reason})" if self.backend_reason else "")
        return self.plan.describe(backend)


def block_record(index: tuple[int, int]) -> str:
    return f"b{index[0]}_{index[1]}"


def get_runner(spec: RunnerSpec) -> Any:
    """This process's runner for ``spec``; an ``"auto"`` spec is resolved here, where the network runs."""
    from . import runners

    return runners.get_runner(spec)


def _source(run: Run, region: np.ndarray | None, index: tuple[int, int]) -> Any:
    """What the block reads from: the image (a store), or its in-memory pixels given as the task's input."""
    if region is None:
        return run.image
    plan = run.plan
    hull = run.image.hull(plan.level, plan.block(*index).src_box)
    return Region(plan.level, hull, np.asarray(region), plan.image.levels[plan.level].shape)


def _write_block(run: Run, store: OutputStore, index: tuple[int, int], region: Any, *_after: Any) -> str:
    if not run.plan.block_active(*index):  # wholly outside the tissue mask: no chunk written (reads as 0)
        store.mark_done(block_record(index), skipped=1)
        return block_record(index)
    try:
        runner = get_runner(run.runner)
        t0 = time.perf_counter()
        p = compute_block(run.plan, index, _source(run, region, index), runner)
        out = finish_block(p, run.plan, run.plan.blocks.box(*index))
        t1 = time.perf_counter()
        record = block_record(index)
        with PROFILE.stage("write"):
            store.write_block(out, record, runner.spec.backend)
    except OSError as e:
        raise store.write_error(e) from None
    if log.isEnabledFor(logging.DEBUG):
        geo = run.plan.block(*index)
        log.debug(
            "block %s %s: %d tiles, computed in %.2f s, written in %.2f s",
            index, geo.out_box, geo.n_tiles, t1 - t0, time.perf_counter() - t1,
        )
    return record


def _compute_block(run: Run, index: tuple[int, int], region: Any) -> np.ndarray:
    runner = get_runner(run.runner)
    return compute_block(run.plan, index, _source(run, region, index), runner).cpu().numpy()


def _pyramid_block(store: OutputStore, level: int, box: Any, record: str, *_after: Any) -> str:
    try:
        with PROFILE.stage("pyramid"):
            store.write_pyramid_block(level, box, record)
    except OSError as e:
        raise store.write_error(e) from None
    return record


def _barrier(*records: Any) -> int:
    return len(records)


def _finalize(store: OutputStore, *_after: Any) -> str:
    try:
        with PROFILE.stage("finalize"):
            return str(store.finalize())
    except OSError as e:
        raise store.write_error(e) from None


def _region(run: Run, index: tuple[int, int]) -> Any:
    plan = run.plan
    if not plan.block_active(*index):
        return None
    return run.image.lazy_region(plan.level, plan.block(*index).src_box)


def write_graph(
    run: Run, store: OutputStore, resources: dict | None = None, *, in_order: int | None = None, before_finalize: Any = None
) -> Any:
    """A dask ``Delayed`` that writes every unfinished block, builds the pyramid and finalizes the store.

    ``resources`` (e.g. ``{"GPU": 1}``) annotates the block tasks, the ones that run the network, so
    that a ``dask.distributed`` cluster whose workers declare that resource runs them only there.

    ``in_order=n`` makes block ``k`` (row-major) wait for block ``k - n``: at most ``n`` blocks are
    ready at a time, in row-major order. dask's own order over independent tasks is arbitrary;
    row-major order is what lets neighbouring blocks share tiles through the tile cache (a block's
    neighbours run soon after it, while its border tiles are still cached). For the local run with
    ``n`` workers; a cluster gets the unchained graph (its parallelism is the point).

    ``before_finalize(after) -> Delayed`` chains more work (objects) behind the pyramid, into the
    staging store, before it is moved into place.
    """
    plan = run.plan
    token = run.token(store.location.identity)
    leaf = delayed(run, traverse=False, name=f"tilefeet-run-{token}")
    store_leaf = delayed(store, traverse=False, name=f"tilefeet-store-{token}")
    tasks: list[Any] = []
    with dask.annotate(**({"resources": resources} if resources else {})):
        for index in plan.blocks:  # row-major
            if block_record(index) in store.done:
                continue
            after = tasks[-in_order:][:1] if in_order and len(tasks) >= in_order else []
            name = f"tilefeet-block-{token}-{index[0]}-{index[1]}"
            tasks.append(delayed(_write_block, pure=False)(leaf, store_leaf, index, _region(run, index), *after, dask_key_name=name))
    after = delayed(_barrier)(*tasks, dask_key_name=f"tilefeet-level0-{token}")
    for level in range(1, len(store.shapes)):
        level_tasks = [
            delayed(_pyramid_block, pure=False)(store_leaf, level, box, record, after, dask_key_name=f"tilefeet-{record}-{token}")
            for record, box in store.pyramid_tasks(level)
            if record not in store.done
        ]
        after = delayed(_barrier)(after, *level_tasks, dask_key_name=f"tilefeet-level{level}-{token}")
    if before_finalize is not None:
        after = before_finalize(after)
    return delayed(_finalize, pure=False)(store_leaf, after, dask_key_name=f"tilefeet-finalize-{token}")


def lazy_array(run: Run) -> Any:
    """Float32 probabilities ``(C, H, W)`` as a dask array with one chunk per output block (not computed);
    with ``--uncertainty`` one more channel, the TTA members' disagreement (0..1)."""
    import dask.array as da

    plan = run.plan
    token = run.token()
    leaf = delayed(run, traverse=False, name=f"tilefeet-run-{token}")
    n = plan.channels
    ny, nx = plan.blocks.counts
    rows = []
    for by in range(ny):
        row = []
        for bx in range(nx):
            box = plan.blocks.box(by, bx)
            d = delayed(_compute_block, pure=True)(leaf, (by, bx), _region(run, (by, bx)), dask_key_name=f"tilefeet-lazy-{token}-{by}-{bx}")
            row.append(da.from_delayed(d, (n, *box.shape), dtype=np.float32))
        rows.append(row)
    return da.block(rows)


def run_graph(graph: Any, *, workers: int, progress: bool, description: str = "segment") -> Any:
    """Compute ``graph`` with the threaded scheduler, ``workers`` tasks at a time, with a progress bar
    over the output blocks (the tasks that run the network); the pyramid that follows shows as a
    note on the bar, so "1/1 block" means one block, not one block and a level."""
    from .console import dask_progress

    bar = dask_progress(description, enabled=progress, counts=_is_block, unit="block", note=_pyramid_note)
    with bar:
        (result,) = dask.compute(graph, scheduler="threads", num_workers=workers)
    return result


def _is_block(key: Any) -> bool:
    return str(key).startswith("tilefeet-block-")


def _pyramid_note(key: Any) -> str | None:
    return "pyramid" if str(key).startswith("tilefeet-p") else None
