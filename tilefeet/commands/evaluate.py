"""``tilefeet evaluate PREDICTION TRUTH``: score a segmentation against ground truth (see :mod:`tilefeet.evaluate`)."""

from __future__ import annotations

import json
import math
from typing import Optional

import typer

from ..evaluate import MAX_INSTANCE_PIXELS, Evaluation
from ..storage import STORAGE_HELP


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)


def evaluate_cmd(
    prediction: str = typer.Argument(
        ..., help="tilefeet output store, OME-Zarr image or label image (a path or an http(s):// or s3:// URL), or PNG/TIFF."
    ),
    truth: str = typer.Argument(
        ..., help="Ground truth: OME-Zarr label image (e.g. image.ome.zarr/labels/membrane; or a URL), OME-Zarr image, or PNG/TIFF."
    ),
    class_name: Optional[str] = typer.Option(None, "--class", "-c", help="Class to score in a store with several."),
    threshold: Optional[float] = typer.Option(None, help="Score the prediction's probabilities >= T instead of its labels."),
    truth_foreground: Optional[str] = typer.Option(
        None, "--truth-foreground", help="Truth values inside the class, e.g. 0 for ISBI membranes or 1,2 (default: non-zero)."
    ),
    tolerance: float = typer.Option(2.0, help="Boundary tolerance in pixels."),
    pixel_tolerance: float = typer.Option(
        1.0, "--pixel-tolerance", help="Tolerant pixel scores: class pixels this close (px) to the other's count as right (thin membranes)."
    ),
    instances: str = typer.Option(
        "none", help="Score objects: foreground (components of the mask), background (regions between membranes), or none."
    ),
    ignore_border: int = typer.Option(0, "--ignore-border", help="Score only the region this many px inside the edges."),
    max_pixels: int = typer.Option(
        MAX_INSTANCE_PIXELS, "--max-pixels", help="Largest region whose instance scores are computed (they need it in memory)."
    ),
    objects: bool = typer.Option(
        False, "--objects", help="Match objects by IoU >= 0.5: precision, recall, F1, mean matched IoU, AP 0.5:0.95."
    ),
    cells: bool = typer.Option(False, "--cells", help="Score cells between membranes: object matching plus ARE and VI."),
    connectivity: Optional[int] = typer.Option(
        None, "--connectivity",
        help="A stack's 3-D objects: 6 (faces), 18 or 26 (default 26, as `tilefeet objects`; cells and regions between membranes 6).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_HELP),
) -> None:
    """Score a prediction against ground truth: pixel F1/Dice and IoU, pixel F1 within a pixel, boundary F1, instance ARE and VI."""
    from ..evaluate import evaluate
    from ..storage import default_storage_options, parse_storage_options

    with default_storage_options(parse_storage_options(storage_option)):
        result = evaluate(
            prediction,
            truth,
            class_name=class_name,
            threshold=threshold,
            truth_foreground=truth_foreground,
            tolerance_px=tolerance,
            pixel_tolerance_px=pixel_tolerance,
            instances=instances,
            ignore_border_px=ignore_border,
            max_instance_pixels=max_pixels,
            objects=objects,
            cells=cells,
            connectivity=connectivity,
        )
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_table(result))


def format_table(ev: Evaluation) -> str:
    """A plain-text report: inputs, then one row per score family."""
    r, b = ev.region, ev.boundary
    stack = ev.is_stack
    region = (f"{ev.sections} sections × {r.shape[0]} × {r.shape[1]} px, scored in 3-D" if stack else f"{r.shape[0]} × {r.shape[1]} px")
    pixel = "voxel (F1 = Dice)" if stack else "pixel (F1 = Dice)"
    boundary = f"boundary/section ≤ {b.tolerance_px:g}px" if stack else f"boundary (≤ {b.tolerance_px:g} px)"
    rows = [
        f"prediction  {ev.prediction}",
        f"truth       {ev.truth}",
        f"region      {region} (y {r.y0}:{r.y1}, x {r.x0}:{r.x1})",
        "",
        f"{'':24s}{'precision':>10s}{'recall':>10s}{'F1':>10s}{'IoU':>10s}",
        f"{pixel:24s}{ev.pixel.precision:10.4f}{ev.pixel.recall:10.4f}{ev.pixel.f1:10.4f}{ev.pixel.iou:10.4f}",
        *([f"{pixel.split(' (')[0] + f' (≤ {ev.tolerant.tolerance_px:g} px)':24s}{ev.tolerant.precision:10.4f}{ev.tolerant.recall:10.4f}"
           f"{ev.tolerant.f1:10.4f}{'':>10s}"] if ev.tolerant else []),
        f"{boundary:24s}{b.precision:10.4f}{b.recall:10.4f}{b.f1:10.4f}{'':>10s}",
    ]
    i = ev.instances
    if i is None:
        rows += ["", "instances   not scored (--instances foreground|background)"]
    else:
        rows += [
            "",
            f"instances   {i.mode}{' (3-D)' if stack else ''}: {i.true_objects} true, {i.predicted_objects} predicted objects",
            f"{'adapted Rand error':24s}{_num(i.adapted_rand_error)}"
            f"  (Rand precision {_num(i.rand_precision)}, recall {_num(i.rand_recall)})",
            f"{'VI (bits)':24s}{_num(i.vi)}  (split {_num(i.vi_split)}, merge {_num(i.vi_merge)})",
        ]
    if ev.objects is not None:
        rows += ["", *format_objects(ev)]
    return "\n".join(rows)


def format_objects(ev: Evaluation) -> list[str]:
    """The object-level rows: matching at IoU ≥ 0.5, AP over 0.5:0.95, and for cells ARE/VI."""
    o = ev.objects
    iou = "n/a" if math.isnan(o.mean_matched_iou) else f"{o.mean_matched_iou:.4f}"
    kind = f"3-D objects ({ev.connectivity}-connected)" if ev.is_stack else "objects"
    rows = [
        f"objects     {o.true_objects} true, {o.predicted_objects} predicted {kind}: {ev.objects_source}",
        f"{'':24s}{'precision':>10s}{'recall':>10s}{'F1':>10s}{'mean IoU':>10s}",
        f"{'matched at IoU ≥ 0.5':24s}{o.precision:10.4f}{o.recall:10.4f}{o.f1:10.4f}{iou:>10s}",
        f"{'AP 0.5:0.95':24s}{o.ap:10.4f}  (AP50 {o.ap_at(0.5):.4f}, AP75 {o.ap_at(0.75):.4f}; AP = TP / (TP + FP + FN))",
    ]
    c = ev.cells
    if c is not None:
        rows += [
            f"{'cells: adapted Rand err':24s}{_num(c.adapted_rand_error)}  (Rand precision {_num(c.rand_precision)}, recall {_num(c.rand_recall)})",
            f"{'cells: VI (bits)':24s}{_num(c.vi)}  (split {_num(c.vi_split)}, merge {_num(c.vi_merge)})",
        ]
        if ev.truth_cells_join:
            where = ("its regions between membranes join across sections (a cell's profile overlaps other cells' in the next "
                     "section: sections far apart, as in serial-section TEM)" if ev.is_stack else "its membranes do not close")
            rows.append(f"caution     the truth's largest cell holds {ev.largest_true_cell:.0%} of its cell pixels: {where}; "
                        f"ARE and VI say little about the prediction here")
    return rows


def _num(v: float) -> str:
    return "n/a (truth has no objects)" if math.isnan(v) else f"{v:.4f}"
