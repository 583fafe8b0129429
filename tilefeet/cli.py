"""The ``tilefeet`` command line. Each flag maps one to one onto :class:`tilefeet.settings.Settings`.

Errors a user can fix (:class:`tilefeet.errors.TilefeetError`) print as one line on stderr and exit
with status 2, never with a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import inspect
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import typer

from . import DEFAULT_ENGINE, console
from .console import echo as _echo
from .errors import TilefeetError, TilefeetWarning
from .storage import STORAGE_HELP

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Segment whole EM sections stored as OME-Zarr.",
    context_settings={"help_option_names": ["-h", "--help"]},
)



def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(console.format_warning(message), err=True)


# -q/-v work before the command (``tilefeet -q segment``) and after it (``tilefeet segment ... -q``),
# where users put them; either place turns them on.
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="More detail (the full plan, per-block timings).")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"tilefeet {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    console.reset()
    set_verbosity(quiet, verbose)


def set_verbosity(quiet: bool, verbose: bool) -> None:
    console.configure(quiet=quiet, verbose=verbose)


@app.command()
def segment(
    input: str = typer.Argument(..., help="OME-Zarr image of the section (NGFF 0.5 or 0.4): a path, or an http(s):// or s3:// URL."),
    output: str = typer.Argument(..., help="Output OME-Zarr (probabilities + labels): a path, or an s3:// URL."),
    engine: str = typer.Option(DEFAULT_ENGINE, "--engine", "-e", help="Engine bundle name or folder."),
    tile: Optional[int] = typer.Option(None, help="Tile side in network pixels (default: the engine's)."),
    overlap: Optional[int] = typer.Option(None, help="Overlap between tiles in network pixels (default: the engine's)."),
    blend: str = typer.Option("gaussian", help="gaussian, cosine, constant, or crop (overlap-tile)."),
    block_size: Optional[int] = typer.Option(
        None, "--block-size", help="Output block side; a multiple of --chunk-size (default: up to 4096, less when upsampling)."
    ),
    chunk_size: int = typer.Option(1024, "--chunk-size", help="Output chunk side."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Zarr v3 shard side (optional)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per network call."),
    threshold: float = typer.Option(0.5, help="Probability at and above which pixels are labelled."),
    dtype: str = typer.Option("uint8", "--dtype", help="Stored probabilities: uint8, float16 or float32 (neuroglancer has no float16 type and cannot open it)."),
    output_grid: str = typer.Option("input", "--output-grid", help="input (level 0 of the input) or network."),
    pixel_size: Optional[str] = typer.Option(None, "--pixel-size", help="Input pixel size, e.g. 4nm or 5,4nm (overrides metadata)."),
    intensity: str = typer.Option(
        "auto", help="Intensity normalization: auto (bundle, or percentile when the values differ), bundle, percentile, meanstd, histogram."
    ),
    invert: Optional[bool] = typer.Option(
        None, "--invert/--no-invert", help="The section's contrast is inverted relative to the training data (default: auto detects it)."
    ),
    backend: Optional[str] = typer.Option(
        None, help="auto (default: the fastest that works here, measured once), torch, onnxruntime, openvino, tensorrt."
    ),
    backend_option: list[str] = typer.Option([], "--backend-option", help="Backend option KEY=VALUE, e.g. compile=true (repeatable)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    precision: Optional[str] = typer.Option(
        None, help="auto (default: fp16 on a GPU with tensor cores where the accuracy guard passes, else fp32; on a CPU the fastest of fp32, bf16 (where native) and int8 (OpenVINO, calibrated on the engine's check slices) that passes the accuracy guard), fp32, fp16, bf16, int8 (asked for: run without the guard)."
    ),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the network (default: all)."),
    blocks_in_flight: int = typer.Option(2, "--blocks-in-flight", help="Blocks in memory at once."),
    tile_cache_mb: Optional[int] = typer.Option(
        None, "--tile-cache-mb", help="Device memory (MiB) for tiles shared by neighbouring blocks; 0 = off (default 512, or $TILEFEET_TILE_CACHE_MB)."
    ),
    labels: bool = typer.Option(True, "--labels/--no-labels", help="Also write labels/<class>."),
    tta: int = typer.Option(1, "--tta", help="Test-time augmentation: average each tile over 1 (off), 2, 4 or 8 flips/turns."),
    uncertainty: bool = typer.Option(
        False, "--uncertainty", help="Also write uncertainty/: where the TTA members disagree (turns on --tta 8 if off)."
    ),
    mask: str = typer.Option(
        "none", "--mask", help="Run the network only on tissue: none, auto (found in the section), or a label image path."
    ),
    allow_missing_chunks: bool = typer.Option(
        False, "--allow-missing-chunks", help="Run although chunk files of the input are missing (they read as its fill value: a hole)."
    ),
    z: Optional[str] = typer.Option(None, "--z", help="A stack: the sections to segment, START:STOP (stop excluded), START: or N (default: all)."),
    block_depth: int = typer.Option(1, "--block-depth", help="A stack: sections per task (the same bits for any depth)."),
    z_median: int = typer.Option(
        1, "--z-median", help="A stack: replace each probability by the median over this many neighbouring sections (odd; 1 = off)."
    ),
    objects: bool = typer.Option(False, "--objects", help="Also find the objects of each class and measure them (see tilefeet objects)."),
    cells: bool = typer.Option(False, "--cells", help="With --objects: the cells between membranes (a membrane engine)."),
    min_size: Optional[str] = typer.Option(None, "--min-size", help="With --objects: drop objects smaller than this, e.g. 0.01um2 (default: the engine's recipe)."),
    fill_holes: Optional[bool] = typer.Option(
        None, "--fill-holes/--no-fill-holes", help="With --objects: fill holes in objects first (default: the engine's recipe)."
    ),
    connectivity: Optional[int] = typer.Option(
        None, "--connectivity", help="With --objects on a stack: voxels join across faces (6), also edges (18), also corners (26, the default)."
    ),
    min_z_extent: Optional[str] = typer.Option(
        None, "--min-z-extent", help="With --objects on a stack: drop objects spanning fewer sections than this (3) or less z (150nm)."
    ),
    overwrite: bool = typer.Option(
        False, help="Replace an existing output (a folder is kept until the new one is complete; an S3 output is deleted first)."
    ),
    resume: bool = typer.Option(False, help="Continue an interrupted run into the same output."),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_HELP),
    output_storage_option: list[str] = typer.Option(
        [], "--output-storage-option", help="A storage option for the output only, overriding --storage-option (repeatable)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit."),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="Run on the dask.distributed cluster of this scheduler, e.g. tcp://10.0.0.5:8786 (README: On a cluster)."
    ),
    scheduler_file: Optional[str] = typer.Option(
        None, "--scheduler-file", help="Run on the cluster whose scheduler wrote this file (dask scheduler --scheduler-file PATH)."
    ),
    resources: list[str] = typer.Option(
        [], "--resources", help="On a cluster: worker resources each block task takes, e.g. GPU=1 (as dask worker --resources declares)."
    ),
    quiet: bool = QUIET,
    verbose: bool = VERBOSE,
) -> None:
    """Segment a section, or every section of a stack: probabilities and labels, written as OME-Zarr."""
    from . import pipeline
    from .cluster import absolute, from_options
    from .storage import default_storage_options, output_location, parse_storage_options
    from .writer import check_output, check_paths

    set_verbosity(quiet, verbose)
    if scheduler or scheduler_file:  # the workers open these paths from working folders of their own
        input, output, engine = absolute(input), absolute(output), absolute(engine) if Path(engine).exists() else engine
    storage = parse_storage_options(storage_option)
    output_storage = {**storage, **parse_storage_options(output_storage_option, "--output-storage-option")}
    location = output_location(output, output_storage)
    # Before any work: an output that cannot be written, or that the flags do not allow, is said at once.
    check_paths(str(input), location.final)
    location.check_writable()
    check_output(location, overwrite=overwrite, resume=resume)
    cluster = from_options(scheduler, scheduler_file, resources)  # None: run here

    options: dict[str, Any] = dict(
        tile=tile,
        overlap=overlap,
        blend=blend,
        block_size=block_size,
        chunk_size=chunk_size,
        shard_size=shard_size,
        batch_size=batch_size,
        threshold=threshold,
        output_dtype=dtype,
        output_grid=output_grid,
        pixel_size_nm=pixel_size,
        intensity=intensity,
        invert=invert,
        backend=backend,
        backend_options=backend_option or None,
        device=device,
        precision=precision,
        threads=threads,
        blocks_in_flight=blocks_in_flight,
        tile_cache_mb=tile_cache_mb,
        labels=labels,
        tta=tta,
        uncertainty=uncertainty,
        mask=mask,
        allow_missing_chunks=allow_missing_chunks,
        z_range=z,
        block_depth=block_depth,
        z_median=z_median,
    )
    t0 = time.perf_counter()
    with default_storage_options(storage):  # for what else the run opens by URL (a --mask label image)
        run = pipeline.plan_segmentation(
            input, engine, resume_into=location if resume else None, resolve_backend=cluster is None, storage_options=storage, **options
        )
    if cluster is not None:  # each worker sees the input, the engine and the output as this process does
        cluster.check_segment(run, location)
    if dry_run:
        _check_output(run, location, overwrite=overwrite, resume=resume)
        typer.echo(run.describe())
        if objects:
            typer.echo(_recipe_line(run.plan.engine, {"cells": cells, "min_size": min_size, "fill_holes": fill_holes}))
        return
    _echo(run.describe())
    if (cells or min_size or fill_holes is not None) and not objects:
        from .errors import ConfigError

        raise ConfigError("--cells, --min-size and --fill-holes shape the objects: add --objects (or run `tilefeet objects` later)")
    if (connectivity or min_z_extent) and not objects:
        from .errors import ConfigError

        raise ConfigError("--connectivity and --min-z-extent shape the objects of a stack: add --objects (or run `tilefeet objects` later)")
    found: dict[str, Any] | None = {"cells": cells, "min_size": min_size, "fill_holes": fill_holes} if objects else None
    if found is not None:
        _echo(_recipe_line(run.plan.engine, found))
    if found is not None:
        found |= {k: v for k, v in (("connectivity", connectivity), ("min_z_extent", min_z_extent)) if v is not None}
    if cluster is None:
        out = pipeline.write_planned(run, location, overwrite=overwrite, resume=resume, progress=console.progress_enabled(), objects=found)
    else:  # the same graph, less the local run's ordering of blocks
        graph = pipeline.write_planned(
            run, location, overwrite=overwrite, resume=resume, compute=False, resources=cluster.resources or None, objects=found
        )
        out = cluster.write_segment(graph, location, progress=console.progress_enabled())
    dt = time.perf_counter() - t0
    h, w = run.plan.output.shape
    n = run.plan.depth
    _echo(f"wrote {out} in {dt:.1f} s ({h * w * n / dt / 1e6:.2f} Mpx/s" + (f", {n} sections)" if run.plan.is_stack else ")"))
    if found is not None:
        _echo(_objects_summary(out, run.plan.engine.classes, bool(cells), output_storage))


def _recipe_line(engine: Any, found: dict[str, Any]) -> str:
    """The objects' rules per class (the engine's recipe, unless flags say otherwise), for the plan."""
    from .objects.options import ObjectSettings, engine_recipes, resolve_recipe

    lines = []
    recipes = engine_recipes(engine.path)
    for cls in engine.classes:
        table = recipes.get(cls)
        settings = ObjectSettings.create(**{k: v for k, v in found.items() if k in ("cells", "min_size", "fill_holes")})
        lines.append(f"objects {cls}: {resolve_recipe(settings, table, engine.name)[1]}")
    return "\n".join(lines)


def _objects_summary(out: Any, classes: tuple[str, ...], cells: bool, storage_options: Any = None) -> str:
    """One line: how many objects (or cells) of each class ``segment --objects`` found, and where
    each table is (``tilefeet objects OUT`` prints the full summary); ``out`` a folder or a URL."""
    import pyarrow.parquet as pq

    from .errors import InputNotFoundError
    from .objects.store import TABLE_NAMES, layer_name, layer_path, read_table
    from .storage import is_url

    parts = []
    for cls in classes:
        name = layer_name(cls, cells)
        if is_url(out):
            layer = f"{str(out).rstrip('/')}/labels/{name}"
            try:
                n = len(read_table(layer, storage_options))
            except InputNotFoundError:
                continue
            where = f"{layer}/{TABLE_NAMES['parquet']}"
        else:
            table = layer_path(out, name) / TABLE_NAMES["parquet"]
            if not table.is_file():
                continue
            n, where = pq.ParquetFile(table).metadata.num_rows, str(table)
        parts.append(f"{n} {'cells' if cells else cls + (' object' if n == 1 else ' objects')} in {where}")
    return "objects: " + "; ".join(parts) if parts else "objects: none written"


def _check_output(run: Any, location: Any, *, overwrite: bool, resume: bool) -> None:
    """What ``segment`` would refuse about the output (an OutputLocation), said by ``--dry-run`` too
    (nothing is left written)."""
    from .writer import check_output, check_paths

    check_paths(run.plan.image.source if run.plan.image.version else None, location.final)
    location.check_writable()
    check_output(location, overwrite=overwrite, resume=resume)


@app.command()
def info(
    path: str = typer.Argument(..., help="An OME-Zarr image: a path, or an http(s):// or s3:// URL."),
    engine: Optional[str] = typer.Option(None, "--engine", "-e", help="Also show what segmenting with this engine would read."),
    pixel_size: Optional[str] = typer.Option(None, "--pixel-size", help="Override the input's pixel size."),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_HELP),
) -> None:
    """Levels, shapes, chunks, pixel size and dtype of an OME-Zarr image (and its labels)."""
    from .image import Image
    from .storage import parse_storage_options

    storage = parse_storage_options(storage_option)
    image = Image.open(path, sections_only=engine is not None, stacks=True, storage_options=storage)
    typer.echo(image.meta.describe())
    _describe_labels(path, storage)
    if engine:
        from . import pipeline

        typer.echo(pipeline.plan_segmentation(path, engine, pixel_size_nm=pixel_size, storage_options=storage).describe())


def _describe_labels(path: str, storage: dict) -> None:
    from .errors import TilefeetError
    from .ngff import open_group, read_multiscale

    try:
        ms = read_multiscale(path, storage_options=storage)
        root: Any = open_group(ms.path, storage_options=storage) if ms.labels else None
    except TilefeetError:
        return
    for name in ms.labels:
        try:
            arr = root[f"labels/{name}/0"]
            typer.echo(f"  labels/{name}: {' × '.join(str(s) for s in arr.shape)} {arr.dtype}")
        except (KeyError, FileNotFoundError, ValueError):
            typer.echo(f"  labels/{name}: (missing)")


@app.command()
def convert(
    input: str = typer.Argument(
        ..., help="A TIFF/PNG file, or a folder of tiles (montage) or slices (--stack); or an OME-Zarr http(s):// or s3:// URL to copy."
    ),
    output: str = typer.Argument(..., help="OME-Zarr to write, a path or an s3:// URL (or, with --labels, the local image to add labels to)."),
    pixel_size: Optional[str] = typer.Option(
        None, "--pixel-size", help="Pixel size, e.g. 4nm or 0.004um (required for images); a stack's Z,Y,X voxel size, e.g. 50,4,4nm."
    ),
    grid: Optional[str] = typer.Option(None, help="Montage layout ROWSxCOLS when file names do not say it."),
    stack: bool = typer.Option(False, help="A folder of slices → a (z, y, x) stack of sections, not a montage."),
    z_spacing: Optional[str] = typer.Option(
        None, "--z-spacing", help="With --stack: the distance between sections (section thickness), e.g. 50nm (or --pixel-size 50,4,4nm)."
    ),
    chunk: int = typer.Option(1024, help="Chunk side."),
    ngff_version: str = typer.Option("0.5", "--ngff-version", help="0.5 (zarr v3) or 0.4 (zarr v2)."),
    labels: Optional[str] = typer.Option(None, help="Write INPUT as the binary label image labels/NAME of OUTPUT."),
    foreground: Optional[str] = typer.Option(None, help="With --labels: mask values inside the class, e.g. 0 or 1,2 (default: non-zero)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_HELP),
    quiet: bool = QUIET,
) -> None:
    """Convert TIFF/PNG images, montage folders or slice stacks to an OME-Zarr pyramid (or copy a
    remote OME-Zarr section into a fresh pyramid)."""
    set_verbosity(quiet, False)
    from . import convert as conv
    from .errors import ConfigError
    from .settings import pair
    from .storage import Url, is_url, parse_storage_options
    from .units import format_nm, parse_length_nm, parse_voxel_size

    storage = parse_storage_options(storage_option)
    if is_url(input):
        data, found_px = conv.open_ome_zarr(input, storage_options=storage)
        name = Url(input).name.split(".")[0]
    else:
        data, found_px = conv.open_input(Path(input), grid=pair(grid, "grid") if grid else None, stack=stack), None
        name = Path(input).stem
    if labels:
        from .evaluate import parse_values

        if is_url(output):
            raise ConfigError(f"--labels adds a label image to a local OME-Zarr image, not to {output}; write the labels locally first")
        fg = list(parse_values(foreground, "--foreground") or []) or None
        _echo(f"wrote {conv.write_labels(data, output, labels, foreground=fg, overwrite=overwrite)}")
        return
    dz: float | None = None
    if pixel_size is not None:
        dz, px = parse_voxel_size(pixel_size, where="--pixel-size")
    elif found_px is not None:
        px = found_px
    else:
        raise ConfigError("give the pixel size of the input with --pixel-size, e.g. --pixel-size 4nm (a stack: 50,4,4nm)")
    if z_spacing is not None:
        dz = parse_length_nm(z_spacing, where="--z-spacing")
    if data.ndim == 2 and dz is not None:
        raise ConfigError(f"{input} is a single image, not a stack: give its pixel size as one or two values (y,x), e.g. --pixel-size {format_nm(px[0]).replace(' ', '')}")
    if data.ndim == 3 and dz is None:
        dz = px[0]
        import warnings

        from .image import ZSpacingWarning

        warnings.warn(ZSpacingWarning(
            f"no section spacing given: z recorded at the pixel size, {format_nm(dz)} (isotropic, as FIB-SEM); for serial sections "
            f"give the thickness: --pixel-size 50,{px[0]:g},{px[1]:g}nm or --z-spacing 50nm"
        ), stacklevel=1)
    out = conv.write_image(
        data, output, px, chunk=chunk, version=ngff_version, name=name, overwrite=overwrite, progress=console.progress_enabled(),
        storage_options=storage, z_spacing_nm=dz,
    )
    _echo(f"wrote {out}")
    from .image import Image

    _echo(Image.open(out, sections_only=False, stacks=True, storage_options=storage).meta.describe())


@app.command()
def sample(
    output: Path = typer.Argument(Path("sample.ome.zarr"), help="Where to write the sample OME-Zarr."),
    rows: int = typer.Option(2, help="Montage rows of 512² slices."),
    cols: int = typer.Option(3, help="Montage columns."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
) -> None:
    """Write the bundled real EM sample (held-out ISBI 2012 slices, 4 nm TEM) as an OME-Zarr montage,
    with its ground-truth membranes as labels/membrane."""
    from .convert import write_image, write_labels
    from .sample import PIXEL_SIZE_NM, montage

    img, mem = montage(rows, cols, mirror=False)
    out = write_image(img, output, PIXEL_SIZE_NM, chunk=512, name="isbi-sample", overwrite=overwrite)
    write_labels(mem, out, "membrane")
    _echo(f"wrote {out} ({img.shape[0]} × {img.shape[1]} px at 4 nm, ground truth in labels/membrane)")


@app.command()
def preview(
    output: str = typer.Argument(..., help="A tilefeet output OME-Zarr: a path, or an http(s):// or s3:// URL."),
    png: Path = typer.Argument(..., help="PNG to write."),
    image: Optional[str] = typer.Option(None, help="The input image, a path or URL (default: the one recorded in the output)."),
    max_size: int = typer.Option(2048, "--max-size", help="Largest side of the preview (picks the pyramid level)."),
    objects: bool = typer.Option(False, "--objects", help="Draw the objects (each id its colour) instead of the class mask."),
    z: Optional[str] = typer.Option(
        None, "--z", help="A stack's section to draw (of the output, 0 its first; default the middle one), or several side by side: 0,5,10."
    ),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_HELP),
) -> None:
    """A PNG of a segmentation: the input with labels (or objects) overlaid, beside the probability map."""
    from .preview import render_preview
    from .storage import default_storage_options, parse_storage_options

    with default_storage_options(parse_storage_options(storage_option)):
        _echo(f"wrote {render_preview(output, png, image=image, max_size=max_size, objects=objects, z=z)}")


@app.command()
def bench(
    size: int = typer.Option(4096, help="Side of the square test section (real EM texture, mirror-tiled)."),
    engine: str = typer.Option("isbi-membrane", "--engine", "-e"),
    workdir: Path = typer.Option(Path("bench-work"), help="Scratch folder for the section and outputs."),
    baseline: list[str] = typer.Option(
        ["io", "pipeline", "backends", "monai", "monai-runner"],
        help="Baselines timed in the same run: io (read + write floor), pipeline (tilefeet with a near-free network), "
        "backends (tilefeet with each backend and precision that runs here), monai (its plain nn.Module), monai-runner.",
    ),
    tile: Optional[int] = typer.Option(None),
    overlap: Optional[int] = typer.Option(None),
    batch_size: int = typer.Option(4, "--batch-size"),
    block_size: int = typer.Option(4096, "--block-size"),
    backend: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("auto", help="auto (tilefeet's default), fp32, fp16, bf16, int8."),
    blocks_in_flight: int = typer.Option(2, "--blocks-in-flight"),
    repeats: int = typer.Option(1, help="Runs per job, the jobs alternating; the median run counts."),
    profile: bool = typer.Option(False, "--profile", help="Also time tilefeet stage by stage (a second, synchronized run) and the device's busy fraction."),
    tta: int = typer.Option(1, "--tta", help="Test-time augmentation for tilefeet's job (1, 2, 4, 8): its cost against the baselines."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """End-to-end throughput (Mpx/s, peak memory) against baselines measured in the same run."""
    import json

    from .bench import benchmark, format_report

    opts = {"batch_size": batch_size, "block_size": block_size, "backend": backend, "device": device,
            "precision": precision, "blocks_in_flight": blocks_in_flight, "profile": profile}
    if tta > 1:
        opts["tta"] = tta
    opts.update({k: v for k, v in (("tile", tile), ("overlap", overlap)) if v is not None})
    report = benchmark(size, engine, workdir, options=opts, baselines=tuple(baseline), repeats=repeats)
    typer.echo(format_report(report))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))


@app.command("engines")
def engines_cmd() -> None:
    """List the engine bundles tilefeet can find (the one `segment` runs without -e is marked)."""
    from .engine import engine_search_path, list_engines, load_engine
    from .units import format_nm

    for name in list_engines():
        b = load_engine(name)
        mark = "  (default)" if name == DEFAULT_ENGINE else ""
        typer.echo(f"{name:20s} {format_nm(b.pixel_size_nm):>8s}  classes: {', '.join(b.classes)}  ({b.path}){mark}")
    if not list_engines():
        typer.echo("no engines found in: " + ", ".join(str(p) for p in engine_search_path()))


from .commands import register_commands  # noqa: E402

register_commands(app)


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point: user errors become one line and exit status 2 (usage errors: click's, also 2)."""
    try:
        return _main_once(argv)
    finally:
        # ``-q`` and ``-v`` are this invocation's: a library call later in the same process (a
        # notebook, a test) prints its notes again.
        console.reset()


def _main_once(argv: Optional[list[str]]) -> int:
    try:
        with warnings.catch_warnings():
            # The command line is the top level: our warnings are shown, once, as one line each
            # (catch_warnings restores both the filters and showwarning afterwards).
            warnings.simplefilter("default", TilefeetWarning)
            warnings.showwarning = _show_warning
            app(args=argv, prog_name="tilefeet")  # standalone: exits through SystemExit
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except TilefeetError as e:
        typer.echo(f"tilefeet: error: {e}", err=True)
        quiet_abandoned_io()
        return e.exit_code
    except KeyboardInterrupt:
        typer.echo("tilefeet: interrupted", err=True)
        quiet_abandoned_io()
        return 130
    except OSError as e:
        # The operating system refused something tilefeet did not expect to fail (reading an input,
        # a cache folder): still one line, naming the path.
        where = f": {e.filename}" if e.filename else ""
        typer.echo(f"tilefeet: error: {e.strerror or e}{where}", err=True)
        quiet_abandoned_io()
        return 1
    return 0


def quiet_abandoned_io() -> None:
    """After the one-line error: drop what the I/O it interrupted prints when Python finalizes it.

    An aborted remote read leaves coroutines behind (zarr's, s3fs's); when the interpreter collects
    them at exit, aiobotocore's context reset fails in another context and Python prints "Exception
    ignored in: <coroutine ...>" with a traceback under the error line. Only exceptions raised while
    finalizing a coroutine are dropped; anything else still reaches the previous hook."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not inspect.iscoroutine(unraisable.object):
            previous(unraisable)

    sys.unraisablehook = hook


if __name__ == "__main__":
    sys.exit(main())
