"""``tilefeet evaluate PREDICTION TRUTH``: score a segmentation against ground truth (see :mod:`tilefeet.evaluate`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from ..evaluate import MAX_INSTANCE_PIXELS, Evaluation


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)


def evaluate_cmd(
    prediction: Path = typer.Argument(..., help="tilefeet output store, OME-Zarr image or label image, or PNG/TIFF."),
    truth: Path = typer.Argument(
        ..., help="Ground truth: OME-Zarr label image (e.g. image.ome.zarr/labels/membrane), OME-Zarr image, or PNG/TIFF."
    ),
    class_name: Optional[str] = typer.Option(None, "--class", "-c", help="Class to score in a store with several."),
    threshold: Optional[float] = typer.Option(None, help="Score the prediction's probabilities >= T instead of its labels."),
    truth_foreground: Optional[str] = typer.Option(
        None, "--truth-foreground", help="Truth values inside the class, e.g. 0 for ISBI membranes or 1,2 (default: non-zero)."
    ),
    tolerance: float = typer.Option(2.0, help="Boundary tolerance in pixels."),
    instances: str = typer.Option(
        "none", help="Score objects: foreground (components of the mask), background (regions between membranes), or none."
    ),
    ignore_border: int = typer.Option(0, "--ignore-border", help="Score only the region this many px inside the edges."),
    max_pixels: int = typer.Option(
        MAX_INSTANCE_PIXELS, "--max-pixels", help="Largest region whose instance scores are computed (they need it in memory)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of a table."),
) -> None:
    """Score a prediction against ground truth: pixel F1/Dice and IoU, boundary F1, instance ARE and VI."""
    from ..evaluate import evaluate

    result = evaluate(
        str(prediction),
        str(truth),
        class_name=class_name,
        threshold=threshold,
        truth_foreground=truth_foreground,
        tolerance_px=tolerance,
        instances=instances,
        ignore_border_px=ignore_border,
        max_instance_pixels=max_pixels,
    )
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_table(result))


def format_table(ev: Evaluation) -> str:
    """A plain-text report: inputs, then one row per score family."""
    r, b = ev.region, ev.boundary
    rows = [
        f"prediction  {ev.prediction}",
        f"truth       {ev.truth}",
        f"region      {r.shape[0]} × {r.shape[1]} px (y {r.y0}:{r.y1}, x {r.x0}:{r.x1})",
        "",
        f"{'':24s}{'precision':>10s}{'recall':>10s}{'F1':>10s}{'IoU':>10s}",
        f"{'pixel (F1 = Dice)':24s}{ev.pixel.precision:10.4f}{ev.pixel.recall:10.4f}{ev.pixel.f1:10.4f}{ev.pixel.iou:10.4f}",
        f"{f'boundary (≤ {b.tolerance_px:g} px)':24s}{b.precision:10.4f}{b.recall:10.4f}{b.f1:10.4f}{'':>10s}",
    ]
    i = ev.instances
    if i is None:
        rows += ["", "instances   not scored (--instances foreground|background)"]
    else:
        rows += [
            "",
            f"instances   {i.mode}: {i.true_objects} true, {i.predicted_objects} predicted objects",
            f"{'adapted Rand error':24s}{_num(i.adapted_rand_error)}"
            f"  (Rand precision {_num(i.rand_precision)}, recall {_num(i.rand_recall)})",
            f"{'VI (bits)':24s}{_num(i.vi)}  (split {_num(i.vi_split)}, merge {_num(i.vi_merge)})",
        ]
    return "\n".join(rows)


def _num(v: float) -> str:
    return "n/a (truth has no objects)" if math.isnan(v) else f"{v:.4f}"
