"""The public entry points: plan a run, segment lazily (dask/xarray out), or segment to OME-Zarr.

    plan_segmentation(source, engine, **options)   -> Run (what --dry-run prints: run.describe())
    segment(source, engine, **options)             -> lazy xarray.DataArray of probabilities
    segment_to_zarr(source, output, engine, ...)   -> the written OME-Zarr (or, compute=False, a dask Delayed)

Planning is one pass: open the input and the engine, choose the level to read (refusing a pixel
size far from the engine's before anything is read), sample the section's statistics at that
level, build the intensity map and the plan once, and put the backend choice in the runner spec.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import DEFAULT_ENGINE
from .chunks import ChunkCheck
from .engine import EngineBundle, load_engine
from .errors import ConfigError, Interrupted, TilefeetError
from .geometry import Box
from .image import Image
from .intensity import IntensityWarning, make_intensity_map, mismatch
from .mask import TissueMask, auto_mask, mask_from_labels
from .plan import EngineSpec, Plan, grids, make_plan
from .polarity import Polarity, PolarityWarning
from .profile import PROFILE
from .runners import RunnerSpec
from .schedule import Run, get_runner, lazy_array, run_graph, write_graph
from .settings import Settings
from .storage import OutputLocation, output_location

#: Pixels read once per section for intensity statistics (spread over the section).
STATS_PIXELS = 1 << 24


def open_image(source: Any, pixel_size_nm: Any = None, storage_options: Mapping[str, Any] | None = None) -> Image:
    """An :class:`Image` from a path or URL (reached with ``storage_options``), an :class:`Image`, or
    a numpy / dask / xarray array."""
    if isinstance(source, Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Image.open(source, stacks=True, storage_options=storage_options)
    from .units import parse_voxel_size

    dz, px = parse_voxel_size(pixel_size_nm) if pixel_size_nm is not None else (None, None)
    return Image.from_array(source, px, z_spacing_nm=dz)


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
    engine: str | os.PathLike | EngineBundle = DEFAULT_ENGINE,
    settings: Settings | None = None,
    *,
    resume_into: str | os.PathLike | OutputLocation | None = None,
    resolve_backend: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> Run:
    """Open the input and the engine, compute section statistics, and plan the run (one pass).

    ``resolve_backend``: choose ``--backend auto`` here (the network runs in this process); off,
    the runner spec keeps ``"auto"`` and each process that runs the network chooses for itself
    (cluster workers may have other hardware than the client). ``resume_into``: the output of an
    interrupted run to continue; its recorded runner is reused, so the remaining blocks run
    exactly as the finished ones did. ``storage_options`` reach a URL ``source`` (``anon``,
    ``endpoint_url``, credentials: :mod:`tilefeet.storage`; default: the environment's).

    ``model=`` a ``torch.nn.Module`` instead of an engine, with what a bundle would declare:
    ``classes``, ``normalization`` (e.g. ``"meanstd:125,43"``), ``activation`` (``sigmoid``,
    ``softmax``, ``none``) and ``model_pixel_size_nm`` (default: the section's own, so nothing is
    resampled). It is exported once (``torch.export``) into a bundle in the user cache
    (:func:`tilefeet.engine.bundle_from_module`), which is what every task and worker loads.
    """
    declared = {k: options.pop(k) for k in MODEL_OPTIONS if k in options}
    settings = settings or Settings.create(**options)
    if declared.get("model") is not None:
        engine = _module_bundle(declared, source, settings, storage_options)
    elif declared:
        raise ConfigError(f"{', '.join(sorted(declared))} describe a model=; give model= too (or an engine bundle)")
    image = open_image(source, settings.pixel_size_nm, storage_options)
    if settings.z_spacing_nm is not None and image.meta.is_stack:
        image = replace(image, meta=replace(image.meta, z_spacing_nm=settings.z_spacing_nm))
    bundle = load_engine(engine)
    spec = EngineSpec.from_bundle(bundle)
    g = grids(image.meta, spec, settings)  # refuses impossible pixel sizes before reading
    bundle.check_weights()  # before reading pixels: a damaged bundle is the cheaper thing to find
    if image.meta.is_stack:
        return _plan_stack(image, bundle, spec, g, settings, resume_into, resolve_backend)
    if settings.z_range not in (None, (0, 1), (0, None)):
        raise ConfigError(f"--z selects sections of a stack; {image.meta.source} is a single section")
    chunks = input_chunks(image, g, settings)
    sample = section_sample(image, g.level)
    imap = make_intensity_map(settings.intensity, bundle.normalization, sample, dtype=np.dtype(image.meta.dtype), invert=bool(settings.invert))
    plan = make_plan(image.meta, spec, settings, imap, tissue_mask(settings.mask, image, g), chunks)
    runner, reason = _runner_spec(plan, bundle, resume_into, resolve_backend)
    plan, decision = _polarity(plan, image, bundle, runner, sample)
    if decision.warning:
        warnings.warn(PolarityWarning(decision.warning), stacklevel=2)
    problem = mismatch(plan.intensity, sample)
    if problem:
        warnings.warn(IntensityWarning(problem), stacklevel=2)
    return Run(plan, image, bundle, runner, reason)


#: Sections whose statistics (and tissue masks) are read at once while a stack is planned.
STACK_PLANNING_THREADS = 4


def _plan_stack(image: Image, bundle: EngineBundle, spec: EngineSpec, g: Any, settings: Settings, resume_into: Any, resolve: bool) -> Run:
    """Plan a stack: every section through the same 2-D plan, each with its own intensity map and
    tissue mask (what segmenting it alone gives, so its output bits are the same), the contrast
    polarity decided once, on the middle section (:func:`_polarity`), and applied to all."""
    from concurrent.futures import ThreadPoolExecutor

    sections = select_sections(image.meta, settings)
    dtype, norm = np.dtype(image.meta.dtype), bundle.normalization
    mid = sections[len(sections) // 2]
    chunks = _merge_checks([c for z in sections for c in input_chunks(image.section(z), g, settings)], len(sections))
    middle = image.section(mid)
    sample = section_sample(middle, g.level)
    imap = make_intensity_map(settings.intensity, norm, sample, dtype=dtype, invert=bool(settings.invert))
    plan = make_plan(image.meta, spec, settings, imap, tissue_mask(settings.mask, middle, g, mid), ())
    runner, reason = _runner_spec(plan, bundle, resume_into, resolve)
    plan, decision = _polarity(plan, middle, bundle, runner, sample)
    del sample
    if decision.warning:
        warnings.warn(PolarityWarning(f"section {mid} of the stack (the contrast of every section follows it): {decision.warning}"), stacklevel=3)
    invert = plan.intensity.invert_max is not None

    def one(z: int) -> tuple[Any, Any, str | None]:
        section = image.section(z)
        sample = section_sample(section, g.level)
        m = make_intensity_map(settings.intensity, norm, sample, dtype=dtype, invert=invert)
        return m, tissue_mask(settings.mask, section, g, z), mismatch(m, sample)

    with ThreadPoolExecutor(STACK_PLANNING_THREADS) as pool:
        per = list(pool.map(one, sections))
    problems = [(z, why) for z, (_, _, why) in zip(sections, per) if why]
    if problems:
        z, why = problems[0]
        more = f" (and {len(problems) - 1} more section{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        warnings.warn(IntensityWarning(f"section {z}{more}: {why}"), stacklevel=3)
    polarity = f"{plan.polarity} (decided on section {mid}, applied to every section)"
    plan = replace(
        plan, intensity=per[0][0], mask=per[0][1], chunks=chunks, polarity=polarity,
        sections=tuple(sections), section_maps=tuple(m for m, _, _ in per),
        section_masks=tuple(k for _, k, _ in per) if settings.mask not in ("", "none") else (),
    )
    return Run(plan, image, bundle, runner, reason)


def _merge_checks(checks: list[ChunkCheck], n_sections: int) -> tuple[ChunkCheck, ...]:
    """One report per array for the sections of a stack (counts summed; the first missing keys)."""
    merged: dict[str, ChunkCheck] = {}
    for c in checks:
        m = merged.get(c.path)
        if m is None:
            merged[c.path] = replace(c, what=f"{c.what} of {n_sections} section{'s' if n_sections > 1 else ''}")
            continue
        merged[c.path] = replace(
            m, chunks=m.chunks + c.chunks, missing=m.missing + c.missing, keys=(m.keys + c.keys)[: max(len(m.keys), 5)],
            files_missing=m.files_missing + c.files_missing, empty=m.empty + c.empty, listed=m.listed and c.listed,
            reason=m.reason or c.reason,
        )
    return tuple(merged.values())


def select_sections(meta: Any, settings: Settings) -> list[int]:
    """The sections of a stack ``--z`` selects (all by default), refusing a range outside the stack."""
    if settings.z_range is None:
        return list(range(meta.depth))
    start, stop = settings.z_range
    stop = meta.depth if stop is None else stop
    if start >= meta.depth or stop > meta.depth:
        raise ConfigError(
            f"--z {start}:{stop} is outside the stack: {meta.source} has sections 0 to {meta.depth - 1}; "
            f"e.g. --z 0:{meta.depth} (stop excluded)"
        )
    return list(range(start, stop))


def _polarity(plan: Plan, image: Image, bundle: EngineBundle, runner: RunnerSpec, sample: np.ndarray) -> tuple[Plan, Polarity]:
    """The plan with the contrast polarity decided (:mod:`tilefeet.polarity`): as the user said, or
    from what the network makes of a few tiles as they are and inverted, and the histogram."""
    from .intensity import polarity as histogram_distances
    from .polarity import OutputStats, decide
    from .probe import probe, probe_tiles

    s = plan.settings
    if s.invert is not None:
        decision = Polarity(bool(s.invert), "given")
        return replace(plan, polarity=decision.describe()), decision
    norm = bundle.normalization
    inverted = make_intensity_map(s.intensity, norm, sample, dtype=np.dtype(image.meta.dtype), invert=True)
    tiles = probe_tiles(plan, image)
    stats: list[Any] = [None, None]
    if tiles:
        net = get_runner(runner)
        with PROFILE.stage("probe"):
            stats = probe(plan, image, net, [plan.intensity, inverted], tiles)
    reference = OutputStats.from_toml(bundle.raw.get("reference"))
    decision = decide(stats[0], stats[1], histogram_distances(norm, sample), reference=reference, tiles=len(tiles))
    return replace(plan, intensity=inverted if decision.invert else plan.intensity, polarity=decision.describe()), decision


#: What ``model=`` takes besides the module (a bundle's declarations).
MODEL_OPTIONS = ("model", "classes", "activation", "normalization", "model_pixel_size_nm")


def _module_bundle(declared: dict, source: Any, settings: Settings, storage_options: Any = None) -> EngineBundle:
    from .engine import bundle_from_module
    from .units import parse_pixel_size

    px = declared.get("model_pixel_size_nm")
    if px is None:
        px = settings.pixel_size_nm or open_image(source, settings.pixel_size_nm, storage_options).meta.pixel_size_nm
    if px is None:
        raise ConfigError("model= needs a pixel size: the section records none; give pixel_size_nm= (or model_pixel_size_nm=)")
    if not declared.get("classes"):
        raise ConfigError('model= needs the classes its output channels are, e.g. classes=["membrane"]')
    return bundle_from_module(
        declared["model"],
        pixel_size_nm=parse_pixel_size(px, where="model_pixel_size_nm"),
        classes=list(declared["classes"]),
        activation=declared.get("activation", "sigmoid"),
        normalization=declared.get("normalization"),
    )


def input_chunks(image: Image, g: Any, settings: Settings) -> tuple[ChunkCheck, ...]:
    """The stored chunks of each level the run reads (the level segmented, and the tissue mask's),
    each from one listing of the store (:mod:`tilefeet.chunks`). Missing ones (lost, not left out as
    empty) are refused unless ``allow_missing_chunks``: they would read as the fill value and leave
    a hole with no segmentation. An in-memory array has nothing missing."""
    levels = [g.level] + ([mask_level(g)[0]] if settings.mask == "auto" else [])
    checks = tuple(c for c in (image.check_chunks(k) for k in dict.fromkeys(levels)) if c is not None)
    for c in checks:
        if c.missing and not settings.allow_missing_chunks:
            allow = "pass --allow-missing-chunks (in Python: allow_missing_chunks=True)"
            raise c.error(
                "a hole with no segmentation",
                "restore them (copy or convert the input again), or "
                + (f"if they are empty on purpose, {allow}" if c.reason == "pixels" else f"{allow} to segment anyway, with a hole there"),
            )
    return checks


def tissue_mask(option: str, image: Image, g: Any, section: int | None = None) -> TissueMask | None:
    """``--mask``: none, auto (found in the section, :func:`tilefeet.mask.auto_mask`), or a label
    image (for section ``section`` of a stack: that plane of a (z, y, x) label image)."""
    if option in ("", "none"):
        return None
    if option == "auto":
        level, grid = mask_level(g)
        return auto_mask(image, level, grid, g.network)
    return mask_from_labels(option, g.network, g.level0, section=section, depth=image.meta.depth)


def mask_level(g: Any) -> tuple[int, Any]:
    """The level the tissue statistics are read from: the coarsest at least as fine as the read level
    that still gives a cell 16 × 16 pixels (2×2 means keep white noise white, constants constant and
    tissue correlated; fewer pixels would make the whiteness test too noisy), which makes finding the
    mask cheaper on a pyramid."""
    from .mask import CELL_PX
    from .resolution import Grid

    cell = CELL_PX * min(g.network.pixel_size_nm)
    best, best_px = g.level, min(g.source.pixel_size_nm)
    for k, lv in enumerate(g.image.levels):
        px = lv.pixel_size_nm
        if px is not None and best_px < min(px) <= cell / 16 and k > g.level:
            best, best_px = k, min(px)
    if best == g.level:
        return g.level, g.source
    lv = g.image.levels[best]
    return best, Grid(lv.shape, lv.pixel_size_nm, lv.origin_nm)


def _runner_spec(plan: Any, bundle: EngineBundle, resume_into: Any, resolve: bool) -> tuple[RunnerSpec, str]:
    """The runner spec of a run: the backend asked for, the one an interrupted run recorded, or
    (``auto``, resolved here) the fastest that works here, with the reason."""
    s = plan.settings
    options = dict(s.backend_options)
    if s.threads is not None:
        options["threads"] = s.threads
    backend, precision, reason = s.backend, s.precision, ""
    if resume_into is not None and backend == "auto":
        from .writer import staged_runner

        staged = staged_runner(resume_into)
        if staged and staged.get("backend") not in (None, "auto"):
            backend, reason = staged["backend"], "the backend the interrupted run used"
            options = {**dict(map(tuple, staged.get("options", []))), **options}
            precision = staged.get("precision", "fp32") if precision == "auto" else precision
    spec = RunnerSpec(
        engine=str(bundle.path),
        backend=backend,
        device=s.device,
        precision=precision,
        batch_size=s.batch_size,
        tile=plan.lattice.tile,
        options=tuple(sorted(options.items())),
    )
    if "auto" in (backend, precision) and not resolve:
        return spec, "chosen by each process that runs the network"
    from .runners.select import choose

    choice = choose(bundle, device=s.device, precision=precision, batch_size=s.batch_size, tile=plan.lattice.tile, prefer=backend)
    merged = tuple(sorted({**dict(choice.options), **dict(spec.options)}.items()))
    return RunnerSpec(spec.engine, choice.backend, spec.device, choice.precision, spec.batch_size, spec.tile, merged), reason or choice.reason


def segment(source: Any, engine: str | os.PathLike | EngineBundle = DEFAULT_ENGINE, **options: Any) -> Any:
    """Lazy segmentation: an ``xarray.DataArray`` of float32 probabilities ``(c, y, x)`` (a stack:
    ``(c, z, y, x)``) backed by a dask array with one chunk per output block, with physical
    coordinates (nm; a stack's z in nm when it says its spacing, else in section numbers) and class
    names. Nothing is computed until you ask (``.compute()``, ``.to_zarr()``, or as part of a larger
    graph, here or on a cluster: with ``backend="auto"`` each process chooses its own backend).
    """
    import xarray as xr

    run = plan_segmentation(source, engine, resolve_backend=False, **options)
    plan = run.plan
    data = lazy_array(run)
    (py, px), (oy, ox) = plan.output.pixel_size_nm, plan.output.origin_nm
    h, w = plan.output.shape
    coords = {
        "c": list(plan.engine.classes) + (["uncertainty"] if plan.settings.uncertainty else []),
        "y": xr.Variable("y", oy + py * np.arange(h), {"units": "nm"}),
        "x": xr.Variable("x", ox + px * np.arange(w), {"units": "nm"}),
    }
    attrs: dict[str, Any] = {"engine": run.bundle.name, "pixel_size_nm": plan.output.pixel_size_nm, "threshold": plan.settings.threshold}
    if not plan.is_stack:
        return xr.DataArray(data, dims=("c", "y", "x"), coords=coords, name="probabilities", attrs=attrs)
    meta = plan.image
    dz = meta.z_spacing_nm
    z = meta.z_origin_nm + (dz or 1.0) * np.asarray(plan.sections, dtype=np.float64)
    coords["z"] = xr.Variable("z", z, {"units": "nm"} if dz else {"units": "section"})
    coords["section"] = ("z", np.asarray(plan.sections))
    attrs["z_spacing_nm"] = dz
    return xr.DataArray(data, dims=("c", "z", "y", "x"), coords=coords, name="probabilities", attrs=attrs)


def segment_to_zarr(
    source: Any,
    output: str | os.PathLike,
    engine: str | os.PathLike | EngineBundle = DEFAULT_ENGINE,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    compute: bool = True,
    resources: dict | None = None,
    storage_options: Mapping[str, Any] | None = None,
    output_storage_options: Mapping[str, Any] | None = None,
    objects: bool | dict | None = None,
    **options: Any,
) -> Path | Any:
    """Segment a section into an OME-Zarr at ``output`` (probabilities + labels, with pyramids).

    ``objects``: also find the objects of every class (``True``), or with options of
    :func:`tilefeet.objects.write_objects` (``{"min_size": "0.01um2", "fill_holes": True}``,
    ``{"cells": True}`` for a membrane engine), in the same run, before the output is moved into
    place: ``labels/<class>-objects`` (or ``-cells``) and a measurements table.

    ``source`` and ``output`` may be URLs: the input ``http(s)://`` or ``s3://``, the output
    ``s3://`` (written in place, published last: :mod:`tilefeet.storage`). ``storage_options``
    reach both; ``output_storage_options`` override them for the output (read a public bucket
    with ``{"anon": True}``, write with credentials: ``{"anon": False}``).

    With ``compute=False``, returns the dask ``Delayed`` that does the whole job (for a cluster);
    computing it returns the output path. Its ``backend="auto"`` (the default) is then chosen by
    each worker process for itself, and the output's provenance lists what ran. ``resources``
    (e.g. ``{"GPU": 1}``) annotates the tasks that run the network, for clusters whose GPU workers
    declare that resource.
    """
    location = output_location(output, output_options(storage_options, output_storage_options))
    with PROFILE.stage("plan"):
        run = plan_segmentation(
            source, engine, resume_into=location if resume else None, resolve_backend=compute, storage_options=storage_options, **options
        )
    return write_planned(
        run, location, overwrite=overwrite, resume=resume, progress=progress, compute=compute, resources=resources, objects=objects
    )


def output_options(storage_options: Mapping[str, Any] | None, output_storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The storage options of the output: the run's, updated by the output's own (None: the command's defaults)."""
    if storage_options is None and output_storage_options is None:
        return None
    return {**(storage_options or {}), **(output_storage_options or {})}


def _objects_chain(run: Run, store: Any, objects: bool | dict, resume: bool) -> Any:
    """A function that chains the objects of every class (or the chosen one) behind a graph's
    pyramid, into the staging store, before it is finalized."""
    from .objects import write_objects
    from .objects.store import layer_location, layer_name

    options = dict(objects) if isinstance(objects, dict) else {}
    options.setdefault("blocks_in_flight", run.plan.settings.blocks_in_flight)
    chosen = options.pop("class_name", None)
    classes = [chosen] if chosen else list(run.plan.engine.classes)

    def chain(after: Any) -> Any:
        for cls in classes:
            if resume:
                layer = layer_location(store.location, layer_name(cls, bool(options.get("cells"))))
                layer.recover()
                if layer.exists() and not layer.has_staging():
                    continue  # finished before the interruption
            after = write_objects(store.location, class_name=cls, resume=resume, compute=False, after=after, **options)
        return after

    return chain


def write_planned(
    run: Run,
    output: str | os.PathLike | OutputLocation,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    compute: bool = True,
    resources: dict | None = None,
    objects: bool | dict | None = None,
) -> Path | Any:
    """Write a run planned by :func:`plan_segmentation` (the CLI prints the plan first, then writes it)
    to a path, an ``s3://`` URL (reached with the command's storage options) or a location;
    ``objects`` as in :func:`segment_to_zarr`."""
    from .writer import OutputStore

    location = output_location(output)
    location.check_writable()
    runner = {
        "backend": run.runner.backend, "options": [list(kv) for kv in run.runner.options], "precision": run.runner.precision,
        "reason": run.backend_reason,
    }
    store = OutputStore.prepare(location, run.plan, runner=runner, overwrite=overwrite, resume=resume)  # path errors first: cheap
    chain = _objects_chain(run, store, objects, resume) if objects else None
    if not compute:
        return write_graph(run, store, resources, before_finalize=chain)
    graph = write_graph(run, store, resources, in_order=run.plan.settings.blocks_in_flight, before_finalize=chain)
    try:
        # This process's runner, built before any block: a damaged engine or a backend that
        # cannot start fails here, in one piece (the tasks then reuse it).
        get_runner(run.runner)
        run_graph(graph, workers=run.plan.settings.blocks_in_flight, progress=progress)
        return location.final
    except KeyboardInterrupt:
        if store.discard_if_nothing_done():
            raise Interrupted(f"interrupted before any block was finished; nothing of {location.final} was kept") from None
        raise Interrupted(
            f"interrupted: the finished blocks are kept in {store.staging}; rerun the same command with --resume to continue"
        ) from None
    except TilefeetError:
        store.discard_if_nothing_done()
        raise
    except OSError as e:
        raise store.write_error(e) from None
    except BaseException:
        store.discard_if_nothing_done()  # nothing to resume: leave no staging folder behind
        raise
