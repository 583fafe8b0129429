"""The public entry points: plan a run, segment lazily (dask/xarray out), or segment to OME-Zarr.

    plan_segmentation(source, engine, **options)   -> Plan (what --dry-run prints)
    segment(source, engine, **options)             -> lazy xarray.DataArray of probabilities
    segment_to_zarr(source, output, engine, ...)   -> the written OME-Zarr (or, compute=False, a dask Delayed)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .engine import EngineBundle, load_engine
from .geometry import Box
from .image import Image
from .intensity import IntensityWarning, make_intensity_map, mismatch
from .plan import EngineSpec, Plan, make_plan
from .runners import RunnerSpec, get_runner
from .settings import Settings

#: Pixels read once per section for intensity statistics (spread over the section).
STATS_PIXELS = 1 << 24


def open_image(source: Any, pixel_size_nm: Any = None) -> Image:
    """An :class:`Image` from a path, an :class:`Image`, or a numpy / dask / xarray array."""
    if isinstance(source, Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Image.open(source)
    from .units import parse_pixel_size

    px = parse_pixel_size(pixel_size_nm) if pixel_size_nm is not None else None
    return Image.from_array(source, px)


def section_sample(image: Image, level: int, max_pixels: int = STATS_PIXELS) -> np.ndarray:
    """Raw pixels for section statistics, read once: the whole level if small, else chunk-aligned
    windows on a regular grid over it.

    Statistics come from the level the network reads, not a coarser one: 2×2 averaging narrows
    the histogram (noise averages out), which would skew percentile and histogram matching
    against the training data, whose statistics were taken at the network's pixel size.
    """
    lv = image.meta.levels[level]
    h, w = lv.shape
    if h * w <= max_pixels:
        return image.read(level, Box(0, 0, h, w))
    ch, cw = min(lv.chunks[0], h), min(lv.chunks[1], w)
    n_windows = max(1, max_pixels // (ch * cw))
    ny = max(1, min(h // ch, int(np.sqrt(n_windows * h / w))))
    nx = max(1, min(w // cw, n_windows // ny))
    ys = np.linspace(0, h // ch - 1, ny).round().astype(int) * ch
    xs = np.linspace(0, w // cw - 1, nx).round().astype(int) * cw
    return np.concatenate([image.read(level, Box(y, x, min(y + ch, h), min(x + cw, w))).ravel() for y in ys for x in xs])


def plan_segmentation(
    source: Any,
    engine: str | os.PathLike | EngineBundle = "isbi-membrane",
    settings: Settings | None = None,
    *,
    resume_into: str | os.PathLike | None = None,
    **options: Any,
) -> tuple[Plan, Image, EngineBundle]:
    """Open the input and the engine, compute section statistics, and plan the run.

    ``resume_into``: the output of an interrupted run to continue; its backend choice is reused
    (unless one is given), so the remaining blocks run exactly as the finished ones did.
    """
    if resume_into is not None and options.get("backend") in (None, "auto"):
        from .writer import staged_settings

        staged = staged_settings(Path(resume_into))
        if staged:
            options = {**options, "backend": staged["backend"], "backend_options": staged.get("backend_options", ())}
    settings = settings or Settings.create(**options)
    image = open_image(source, settings.pixel_size_nm)
    bundle = load_engine(engine)
    spec = EngineSpec.from_bundle(bundle)
    # A plan with the identity intensity map tells which level is read; statistics come from that level.
    probe = make_plan(image.meta, spec, settings, make_intensity_map("bundle", bundle.normalization, None, dtype=np.dtype(image.meta.dtype)))
    # Read for every mode: "bundle" uses none, but the sample is how a wrong value range (float data
    # in [0, 1] for an engine trained on 8-bit) is caught before a whole section is segmented.
    bundle.check_weights()  # before reading anything: a damaged bundle is the cheaper thing to find
    sample = section_sample(image, probe.level)
    imap = make_intensity_map(settings.intensity, bundle.normalization, sample, dtype=np.dtype(image.meta.dtype), invert=settings.invert)
    problem = mismatch(imap, sample)
    if problem:
        warnings.warn(IntensityWarning(problem), stacklevel=2)
    return choose_backend(replace(probe, intensity=imap), bundle), image, bundle


def choose_backend(plan: Plan, bundle: EngineBundle) -> Plan:
    """Resolve ``--backend auto`` (or check an explicit backend) once, here in the main process, and
    record the concrete backend and options in the plan: workers never decide for themselves, and
    the resume fingerprint covers what actually ran."""
    from .runners.select import resolve_backend

    s = plan.settings
    backend, options, reason = resolve_backend(
        bundle, device=s.device, precision=s.precision, batch_size=s.batch_size, tile=plan.lattice.tile, prefer=s.backend
    )
    merged = tuple(sorted({**dict(options), **dict(s.backend_options)}.items()))
    return replace(plan, settings=s.replace(backend=backend, backend_options=merged), backend_reason=reason)


def runner_spec(plan: Plan, bundle: EngineBundle) -> RunnerSpec:
    s = plan.settings
    options = dict(s.backend_options)
    if s.threads is not None:
        options["threads"] = s.threads
    return RunnerSpec(
        engine=str(bundle.path),
        backend=s.backend,
        device=s.device,
        precision=s.precision,
        batch_size=s.batch_size,
        tile=plan.lattice.tile,
        options=tuple(sorted(options.items())),
    )


def segment(source: Any, engine: str | os.PathLike | EngineBundle = "isbi-membrane", **options: Any) -> Any:
    """Lazy segmentation: an ``xarray.DataArray`` of float32 probabilities ``(c, y, x)`` backed by a
    dask array with one chunk per output block, with physical coordinates (nm) and class names.
    Nothing is computed until you ask (``.compute()``, ``.to_zarr()``, or as part of a larger graph).
    """
    import xarray as xr

    from .schedule import Job, lazy_array

    plan, image, bundle = plan_segmentation(source, engine, **options)
    data = lazy_array(Job(plan, image, runner_spec(plan, bundle)))
    (py, px), (oy, ox) = plan.output.pixel_size_nm, plan.output.origin_nm
    h, w = plan.output.shape
    coords = {
        "c": list(plan.engine.classes),
        "y": xr.Variable("y", oy + py * np.arange(h), {"units": "nm"}),
        "x": xr.Variable("x", ox + px * np.arange(w), {"units": "nm"}),
    }
    attrs = {"engine": bundle.name, "pixel_size_nm": plan.output.pixel_size_nm, "threshold": plan.settings.threshold}
    return xr.DataArray(data, dims=("c", "y", "x"), coords=coords, name="probabilities", attrs=attrs)


def segment_to_zarr(
    source: Any,
    output: str | os.PathLike,
    engine: str | os.PathLike | EngineBundle = "isbi-membrane",
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    compute: bool = True,
    resources: dict | None = None,
    **options: Any,
) -> Path | Any:
    """Segment a section into an OME-Zarr at ``output`` (probabilities + labels, with pyramids).

    With ``compute=False``, returns the dask ``Delayed`` that does the whole job (for a cluster);
    computing it returns the output path. ``resources`` (e.g. ``{"GPU": 1}``) annotates the tasks
    that run the network, for clusters whose GPU workers declare that resource.
    """
    planned = plan_segmentation(source, engine, resume_into=output if resume else None, **options)
    return write_planned(planned, output, overwrite=overwrite, resume=resume, progress=progress, compute=compute, resources=resources)


def write_planned(
    planned: tuple[Plan, Image, EngineBundle],
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    compute: bool = True,
    resources: dict | None = None,
) -> Path | Any:
    """Write a run planned by :func:`plan_segmentation` (the CLI prints the plan first, then writes it)."""
    from .schedule import Job, run, write_graph
    from .writer import OutputStore

    plan, image, bundle = planned
    spec = runner_spec(plan, bundle)
    store = OutputStore.prepare(Path(output), plan, overwrite=overwrite, resume=resume)  # path errors first: cheap
    if not compute:
        return write_graph(Job(plan, image, spec, store), resources)
    graph = write_graph(Job(plan, image, spec, store), resources, in_order=plan.settings.blocks_in_flight)
    try:
        # This process's runner, built before any block: a damaged engine or a backend that
        # cannot start fails here, in one piece (the tasks then reuse it).
        get_runner(spec)
        return Path(run(graph, workers=plan.settings.blocks_in_flight, progress=progress))
    except BaseException:
        store.discard_if_nothing_done()  # nothing to resume: leave no staging folder behind
        raise
