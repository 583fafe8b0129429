"""``tilefeet objects OUT``: objects (or cells) of a segment output as ``labels/<class>-objects``
(``-cells``) with a measurements table, and a summary: count, size distribution, density per µm²
(see :mod:`tilefeet.objects`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ..storage import STORAGE_HELP

if TYPE_CHECKING:
    from ..storage import Url


def register(app: typer.Typer) -> None:
    app.command("objects")(objects_cmd)


def objects_cmd(
    output: str = typer.Argument(
        ..., help="A tilefeet segment output (OME-Zarr with probabilities): a folder, or s3://bucket/out.ome.zarr (read and written there)."
    ),
    class_name: Optional[str] = typer.Option(None, "--class", "-c", help="Class whose objects to find (default: the only one)."),
    threshold: Optional[float] = typer.Option(
        None, help="Probability at and above which a pixel is in the mask (default: the run's, i.e. labels/<class>)."
    ),
    min_size: Optional[str] = typer.Option(
        None, "--min-size", help="Drop objects below this area, e.g. 0.01um2, 2000nm2, 20px (with --cells: smaller cells join a neighbour); a stack's below this volume, e.g. 0.001um3, 20px (voxels). Default: the engine's recipe."
    ),
    connectivity: Optional[int] = typer.Option(
        None, "--connectivity", help="A stack: voxels that join across faces (6), also edges (18), also corners (26, the default: 8-connected within a section)."
    ),
    min_z_extent: Optional[str] = typer.Option(
        None, "--min-z-extent", help="A stack: drop objects spanning fewer sections than this (3) or less z (150nm)."
    ),
    fill_holes: Optional[bool] = typer.Option(
        None, "--fill-holes/--no-fill-holes", help="Fill holes (background enclosed by an object) before labelling; in a stack, in each section. Default: the engine's recipe."
    ),
    cells: bool = typer.Option(
        False, "--cells", help="Cells between membranes (a membrane engine): seeds where the membrane probability is low, a watershed on it, neighbours merged across weak boundaries."
    ),
    seed_threshold: Optional[float] = typer.Option(
        None, "--seed-threshold", help="With --cells: seeds are the regions of membrane probability below this (default: the engine's recipe, else 0.05)."
    ),
    merge_threshold: Optional[float] = typer.Option(
        None, "--merge-threshold", help="With --cells: merge neighbouring cells whose shared boundary's mean probability is below this (0: never; default: the recipe's)."
    ),
    grow: Optional[str] = typer.Option(None, help="With --cells: how far the watershed reaches from a seed, e.g. 120nm (default: the recipe's)."),
    cell_method: str = typer.Option(
        "watershed", "--cell-method", help="With --cells: watershed, or grow (the regions below the label threshold grown --grow nm, default 40nm: the earlier algorithm)."
    ),
    csv: bool = typer.Option(False, "--csv", help="Write the table as CSV instead of Parquet."),
    overwrite: bool = typer.Option(False, help="Replace an existing objects layer (kept until the new one is complete)."),
    resume: bool = typer.Option(False, help="Continue an interrupted objects run."),
    block_size: Optional[str] = typer.Option(
        None, "--block-size", help="Block side of one task (default: up to 4096, whole chunks); a stack's Z,Y,X (default 16,1024,1024)."
    ),
    blocks_in_flight: int = typer.Option(2, "--blocks-in-flight", help="Blocks in memory at once."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; only the summary."),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="Run on the dask.distributed cluster of this scheduler, e.g. tcp://10.0.0.5:8786."
    ),
    scheduler_file: Optional[str] = typer.Option(
        None, "--scheduler-file", help="Run on the cluster whose scheduler wrote this file (dask scheduler --scheduler-file PATH)."
    ),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_HELP),
) -> None:
    """Find the objects of a class (connected components, 8-connected; in a stack 3-D, 26-connected
    by default) or the cells between membranes, write them as an NGFF label image with a table of
    measurements, and summarize them."""
    from .. import console
    from ..cluster import absolute, from_options
    from ..objects import write_objects
    from ..storage import default_storage_options, parse_storage_options

    console.configure(quiet=quiet)
    storage = parse_storage_options(storage_option)
    cluster = from_options(scheduler, scheduler_file)  # None: run here
    options: dict[str, Any] = dict(
        class_name=class_name, threshold=threshold, min_size=min_size, fill_holes=fill_holes, cells=cells,
        grow=grow, block_size=block_size, blocks_in_flight=blocks_in_flight, table_format="csv" if csv else "parquet",
        overwrite=overwrite, resume=resume, connectivity=connectivity, min_z_extent=min_z_extent,
        **{k: v for k, v in (("seed_threshold", seed_threshold), ("merge_threshold", merge_threshold)) if v is not None},
        **({"cell_method": cell_method} if cell_method != "watershed" else {}),
    )
    with default_storage_options(storage):
        if cluster is None:
            result = write_objects(output, progress=console.progress_enabled(), **options)
        else:
            result = _on_cluster(cluster, absolute(output), options, progress=console.progress_enabled())
        table = result.table()
    if result.recipe:
        typer.echo(result.recipe)
    typer.echo(summary(table, result.path, result.section_um2, volume_um3=result.volume_um3))
    console.echo(f"wrote {result.path} ({result.dtype}) and {result.table_path.name} in {result.seconds:.1f} s")


def _on_cluster(cluster: Any, output: str, options: dict, *, progress: bool) -> Any:
    """The same graph as a local run, computed by the cluster's workers (which must see ``output``)."""
    import time

    from ..cluster import OBJECTS_TASKS
    from ..objects import write_objects
    from ..objects.run import finished
    from ..storage import is_url

    if not is_url(output):  # the workers reach a URL themselves (with the options the graph carries)
        cluster.check_reach(write=("the output", Path(output)))
    t0 = time.perf_counter()
    graph = write_objects(output, compute=False, **options)
    path = cluster.compute(
        graph, progress=progress, description="objects", counts=lambda k: str(k).startswith(OBJECTS_TASKS),
        kept=f"the finished tasks are kept in {output}",
    )
    return finished(path, time.perf_counter() - t0)


def summary(df: Any, layer: Path | Url, area_um2: float, *, volume_um3: float | None = None) -> str:
    """Count, density and size distribution of a table's objects, as a few lines of text (a
    stack's: of volumes, per µm³)."""
    import numpy as np

    if volume_um3 is not None:
        return _summary_3d(df, layer, volume_um3)
    n = len(df)
    kind = "cells" if layer.name.endswith("-cells") else "objects"
    what = str(df["class"].iloc[0]) if n else layer.name.rsplit("-", 1)[0]
    rows = [
        f"{layer}",
        f"{n} {kind}{'' if kind == 'cells' else f' of {what}'} in {area_um2:.4g} µm²: {n / area_um2 if area_um2 else math.nan:.4g} per µm²",
    ]
    if n:
        q = [0, 25, 50, 75, 100]
        area = np.percentile(df["area_nm2"].to_numpy() / 1e6, q)
        diam = np.percentile(df["equivalent_diameter_nm"].to_numpy(), q)
        head = f"{'':22s}" + "".join(f"{h:>11s}" for h in ("min", "25 %", "median", "75 %", "max", "mean"))
        rows += [
            head,
            f"{'area (µm²)':22s}" + "".join(f"{v:11.4g}" for v in area) + f"{df['area_nm2'].mean() / 1e6:11.4g}",
            f"{'diameter (nm)':22s}" + "".join(f"{v:11.4g}" for v in diam) + f"{df['equivalent_diameter_nm'].mean():11.4g}",
            f"touching the section's edge: {int(df['touches_border'].sum())}; total area {df['area_nm2'].sum() / 1e6:.4g} µm² "
            f"({df['area_nm2'].sum() / 1e6 / area_um2:.1%} of the section)",
        ]
    return "\n".join(rows)


def _summary_3d(df: Any, layer: Path | Url, volume_um3: float) -> str:
    import numpy as np

    n = len(df)
    what = str(df["class"].iloc[0]) if n else layer.name.rsplit("-", 1)[0]
    rows = [f"{layer}", f"{n} 3-D objects of {what} in {volume_um3:.4g} µm³: {n / volume_um3 if volume_um3 else math.nan:.4g} per µm³"]
    if n:
        q = [0, 25, 50, 75, 100]
        cols = (("volume (µm³)", df["volume_nm3"].to_numpy() / 1e9), ("surface (µm²)", df["surface_area_nm2"].to_numpy() / 1e6),
                ("diameter (nm)", df["equivalent_diameter_nm"].to_numpy()), ("sections", df["z_sections"].to_numpy()))
        rows.append(f"{'':22s}" + "".join(f"{h:>11s}" for h in ("min", "25 %", "median", "75 %", "max", "mean")))
        rows += [f"{name:22s}" + "".join(f"{v:11.4g}" for v in np.percentile(values, q)) + f"{values.mean():11.4g}" for name, values in cols]
        total = df["volume_nm3"].sum() / 1e9
        rows.append(f"touching the stack's edge: {int(df['touches_border'].sum())}; total volume {total:.4g} µm³ ({total / volume_um3:.1%} of the stack)")
    return "\n".join(rows)
