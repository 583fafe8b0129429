"""Dask graphs around the block function: one task per output block, each pyramid task after the tasks
under it, then finalize.

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

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dask
import dask.threaded
import numpy as np
from dask import delayed
from dask.base import tokenize

from .block import compute_block, finish_block
from .geometry import BlockGrid, Box, reflect_index
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


#: A task's block: ``(by, bx)`` of a section's block grid, or ``(zb, by, bx)`` for a stack, ``zb``
#: numbering the groups of sections of :meth:`Plan.z_blocks`.
Index = tuple[int, ...]


def block_record(index: Index) -> str:
    return "b" + "_".join(str(i) for i in index)


def task_indices(plan: Plan) -> list[Index]:
    """Every task's block, row-major (a stack: section groups outermost)."""
    if not plan.is_stack:
        return list(plan.blocks)
    return [(zb, by, bx) for zb in range(len(plan.z_blocks())) for by, bx in plan.blocks]


def _sections(plan: Plan, index: Index) -> list[int | None]:
    """The output sections a task computes (``[None]`` for a section's task)."""
    return list(plan.z_blocks()[index[0]]) if plan.is_stack else [None]


def get_runner(spec: RunnerSpec) -> Any:
    """This process's runner for ``spec``; an ``"auto"`` spec is resolved here, where the network runs."""
    from . import runners

    return runners.get_runner(spec)


def _source(run: Run, region: np.ndarray | None, index: tuple[int, int], z: int | None = None) -> Any:
    """What a block reads from: the image (a store; a stack's section ``z``), or its in-memory pixels
    given as the task's input."""
    image = run.image if z is None else run.image.section(run.plan.sections[z])
    if region is None:
        return image
    plan = run.plan
    hull = image.hull(plan.level, plan.block(*index).src_box)
    return Region(plan.level, hull, np.asarray(region), plan.image.levels[plan.level].shape)


def _needed(plan: Plan, index: Index) -> list[int | None]:
    """The sections whose probabilities a task computes: its own, and with ``--z-median N`` the
    N // 2 on either side (reflected at the ends of the selection: its halo in z)."""
    zs = _sections(plan, index)
    half = plan.settings.z_median // 2 if plan.is_stack else 0
    if not half:
        return zs
    return list(dict.fromkeys(int(j) for z in zs for j in reflect_index(np.arange(z - half, z + half + 1), plan.depth)))  # type: ignore[operator]


def _probabilities(run: Run, index: Index, region: Any, runner: Any) -> Iterator[tuple[int | None, Any]]:
    """``(z, probabilities)`` of each section of a task's block on the runner's device (None for a
    block wholly outside a section's tissue mask). With ``--z-median N`` each is the median over the
    N sections around it (reflected at the ends of the selection), whose probabilities the task
    computes too: every section's probabilities are the same bits whichever task computes them, so
    the median is too, for any block depth."""
    import torch

    plan, yx = run.plan, (index[-2], index[-1])
    needed = _needed(plan, index)
    regions = dict(zip(needed, region if plan.is_stack else [region]))
    raw = {}
    for j in needed:
        one = plan.for_section(j)
        raw[j] = compute_block(one, yx, _source(run, regions[j], yx, j), runner) if one.block_active(*yx) else None
    half = plan.settings.z_median // 2 if plan.is_stack else 0
    n = len(plan.engine.classes)
    for z in _sections(plan, index):
        own = raw[z]
        if not half or own is None:
            yield z, own
            continue
        assert z is not None
        window = [int(j) for j in reflect_index(np.arange(z - half, z + half + 1), plan.depth)]
        box = plan.blocks.box(*yx)
        zeros = torch.zeros((n, *box.shape), dtype=torch.float32, device=own.device)  # outside a section's mask: 0
        median = torch.stack([p[:n] if (p := raw[j]) is not None else zeros for j in window]).median(dim=0).values
        yield z, torch.cat([median, own[n:]]) if own.shape[0] > n else median


def _write_block(run: Run, store: OutputStore, index: Index, region: Any, *_after: Any) -> str:
    record = block_record(index)
    yx = (index[-2], index[-1])
    try:
        runner = get_runner(run.runner)
        t0 = time.perf_counter()
        outs = []
        for z, p in _probabilities(run, index, region, runner):
            if p is None:  # wholly outside the tissue mask: no chunk written (reads as 0)
                continue
            plan = run.plan.for_section(z)
            out = finish_block(p, plan, plan.blocks.box(*yx))
            out.z = z
            outs.append(out)
        t1 = time.perf_counter()
        if store.fuses_level1():  # before level 0's record: a resumed block rewrites both (same bits)
            with PROFILE.stage("pyramid"):
                store.write_level1(outs, store.level1_task(index))
        if not outs:
            store.mark_done(record, skipped=1)
            return record
        with PROFILE.stage("write"):
            store.write_block(outs if run.plan.is_stack else outs[0], record, runner.spec.backend)
    except OSError as e:
        raise store.write_error(e) from None
    if log.isEnabledFor(logging.DEBUG):
        geo = run.plan.block(*yx)
        log.debug(
            "block %s %s: %d tiles × %d sections, computed in %.2f s, written in %.2f s",
            index, geo.out_box, geo.n_tiles, len(outs), t1 - t0, time.perf_counter() - t1,
        )
    return record


def _compute_block(run: Run, index: Index, region: Any) -> np.ndarray:
    runner = get_runner(run.runner)
    box = run.plan.blocks.box(index[-2], index[-1])
    planes = [
        p.cpu().numpy() if p is not None else np.zeros((run.plan.channels, *box.shape), dtype=np.float32)
        for _, p in _probabilities(run, index, region, runner)
    ]
    return np.stack(planes, axis=1) if run.plan.is_stack else planes[0]  # (C, sections, h, w) or (C, h, w)


def _pyramid_block(store: OutputStore, level: int, box: Any, record: str, zs: range | None, *_after: Any) -> str:
    try:
        with PROFILE.stage("pyramid"):
            store.write_pyramid_block(level, box, record, zs)
    except OSError as e:
        raise store.write_error(e) from None
    return record


def cells_under(grid: BlockGrid, region: Box) -> Iterator[tuple[int, int]]:
    """The cells of ``grid`` that ``region`` (in the grid's pixels) overlaps."""
    (ny, nx), (sy, sx) = grid.counts, grid.block
    rows = range(region.y0 // sy, min(-(-region.y1 // sy), ny))
    cols = range(region.x0 // sx, min(-(-region.x1 // sx), nx))
    return itertools.product(rows, cols)


def _barrier(*records: Any) -> int:
    return len(records)


def _finalize(store: OutputStore, *_after: Any) -> str:
    try:
        with PROFILE.stage("finalize"):
            return str(store.finalize())
    except OSError as e:
        raise store.write_error(e) from None


def _region(run: Run, index: Index) -> Any:
    """An in-memory input's pixels a task needs, as lazy dask arrays (a list, one per section, for a
    stack); None for a store (its tasks read) and for blocks outside the tissue mask."""
    plan, yx = run.plan, (index[-2], index[-1])
    if not plan.is_stack:
        return run.image.lazy_region(plan.level, plan.block(*yx).src_box) if plan.block_active(*yx) else None
    box = plan.block(*yx).src_box
    return [
        run.image.section(plan.sections[z]).lazy_region(plan.level, box) if plan.for_section(z).block_active(*yx) else None
        for z in _needed(plan, index)
        if z is not None
    ]


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
    below: dict[tuple[int | None, int, int], Any] = {}  # the unfinished tasks of the level below, by (section group, cell)
    with dask.annotate(**({"resources": resources} if resources else {})):
        for index in task_indices(plan):  # row-major
            if block_record(index) in store.done:
                continue
            after = tasks[-in_order:][:1] if in_order and len(tasks) >= in_order else []
            name = f"tilefeet-block-{token}-{'-'.join(map(str, index))}"
            tasks.append(delayed(_write_block, pure=False)(leaf, store_leaf, index, _region(run, index), *after, dask_key_name=name))
            below[(index[0] if plan.is_stack else None, index[-2], index[-1])] = tasks[-1]
    # Each pyramid task waits only for the tasks of the level below under its region, not for the
    # whole level: the pyramid then overlaps the network instead of running as a tail after the last
    # block (on the H200 the pyramid was the largest CPU stage of a gigapixel run, with the GPU idle).
    # The same tasks write the same chunks from the same data: the output is unchanged.
    # Where blocks write level 1 themselves (OutputStore.fuses_level1), an unfinished block's task
    # stands for its level-1 task; a level-1 task is left only where its block finished in an earlier
    # run and the level did not.
    group = {zs: i for i, zs in enumerate(plan.z_blocks())} if plan.is_stack else {}
    grid_below, fused = plan.blocks, store.fuses_level1()
    for level in range(1, len(store.shapes)):
        grid, level_tasks = store.pyramid_grid(level), {}
        for task in store.pyramid_tasks(level):
            record, box, zs = task[0], task[1], task[2] if len(task) > 2 else None
            if record in store.done:
                continue
            zb = group[zs] if zs is not None else None
            cell = (zb, box.y0 // grid.block[0], box.x0 // grid.block[1])
            if level == 1 and fused and cell in below:  # the block under it writes it
                level_tasks[cell] = below[cell]
                continue
            under = Box(2 * box.y0, 2 * box.x0, 2 * box.y1, 2 * box.x1)
            deps = [below[k] for yx in cells_under(grid_below, under) if (k := (zb, *yx)) in below]
            level_tasks[cell] = delayed(_pyramid_block, pure=False)(
                store_leaf, level, box, record, zs, *deps, dask_key_name=f"tilefeet-{record}-{token}"
            )
        seen = {id(t) for t in tasks}
        tasks += [t for t in level_tasks.values() if id(t) not in seen]
        below, grid_below = level_tasks, grid
    after = delayed(_barrier)(*tasks, dask_key_name=f"tilefeet-written-{token}")
    if before_finalize is not None:
        after = before_finalize(after)
    return delayed(_finalize, pure=False)(store_leaf, after, dask_key_name=f"tilefeet-finalize-{token}")


def lazy_array(run: Run) -> Any:
    """Float32 probabilities ``(C, H, W)`` (a stack: ``(C, Z, H, W)``) as a dask array with one chunk
    per task's block (not computed); with ``--uncertainty`` one more channel, the TTA members'
    disagreement (0..1)."""
    import dask.array as da

    plan = run.plan
    token = run.token()
    leaf = delayed(run, traverse=False, name=f"tilefeet-run-{token}")
    n = plan.channels
    ny, nx = plan.blocks.counts
    zblocks = plan.z_blocks() if plan.is_stack else [None]
    slabs = []
    for zb, zs in enumerate(zblocks):
        rows = []
        for by in range(ny):
            row = []
            for bx in range(nx):
                index = (zb, by, bx) if zs is not None else (by, bx)
                box = plan.blocks.box(by, bx)
                d = delayed(_compute_block, pure=True)(
                    leaf, index, _region(run, index), dask_key_name=f"tilefeet-lazy-{token}-{'-'.join(map(str, index))}"
                )
                shape = (n, len(zs), *box.shape) if zs is not None else (n, *box.shape)
                row.append(da.from_delayed(d, shape, dtype=np.float32))
            rows.append(row)
        slabs.append(rows)
    if zblocks[0] is None:
        return da.block(slabs[0])
    return da.block(slabs)  # nested three deep: along Z, H, W of (C, Z, H, W)


def run_graph(graph: Any, *, workers: int, progress: bool, description: str = "segment") -> Any:
    """Compute ``graph`` with the threaded scheduler, ``workers`` tasks at a time, with a progress bar
    over the output blocks (the tasks that run the network); the pyramid that follows shows as a
    note on the bar, so "1/1 block" means one block, not one block and a level."""
    from .console import dask_progress

    bar = dask_progress(description, enabled=progress, counts=_is_block, unit="block", note=_pyramid_note)
    with bar:
        # the function, not the name "threads": a named scheduler makes dask import distributed (0.2 s a process)
        (result,) = dask.compute(graph, scheduler=dask.threaded.get, num_workers=workers)
    return result


def _is_block(key: Any) -> bool:
    return str(key).startswith("tilefeet-block-")


def _pyramid_note(key: Any) -> str | None:
    return "pyramid" if str(key).startswith("tilefeet-p") else None
