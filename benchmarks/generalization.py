"""Generalization study: the membrane engine (trained at 4 nm on ISBI ssTEM) on data from other
microscopes, with and without resolution normalization, for each intensity mode.

1. EPFL/Lucchi FIB-SEM of mouse CA1 at 5 nm, scored against its membrane masks (pixel F1 and
   boundary F1 at 2 px, on the 5 held-out test slices).
2. The PSSR brain tSEM pair: the same field of view at 2 nm and at 8 nm. No ground truth; scored as
   agreement (F1 of the two membrane maps on a common 4 nm grid).

"Without resolution normalization" forces ``--pixel-size`` to the engine's 4 nm: what a user who
ignores pixel sizes gets. The scoring functions (:func:`score_isbi`, :func:`score_lucchi`,
:func:`score_pssr`) are shared with ``benchmarks/train_ablation.py`` and
``benchmarks/train_measure.py``, so every table scores engines the same way. Run:

    python benchmarks/generalization.py --data ../shared/data/em --out benchmarks/results/generalization.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import tilefeet
from tilefeet.metrics import boundary_metrics, instance_metrics, pixel_metrics, tolerant_metrics

MODES = ("bundle", "percentile", "meanstd", "histogram")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "em"


@dataclass(frozen=True)
class Targets:
    """The project's three scoring targets, in memory."""

    isbi: tuple[np.ndarray, np.ndarray]  #: held-out ISBI slices 24-29 as a 2 x 3 montage (image, membrane mask), 4 nm
    lucchi: tuple[list[np.ndarray], list[np.ndarray]]  #: the 5 Lucchi test slices and their membrane masks, 5 nm
    pssr: tuple[np.ndarray, np.ndarray]  #: the PSSR pair (2 nm, 8 nm)


def load_targets(data: Path = DATA) -> Targets:
    import imageio.v3 as iio
    import tifffile

    from tilefeet.sample import montage

    names = sorted(p.name for p in (data / "lucchi" / "test" / "slices").glob("*.png"))
    imgs = [iio.imread(data / "lucchi" / "test" / "slices" / n) for n in names]
    masks = [iio.imread(data / "lucchi" / "test" / "membranes" / n) > 127 for n in names]
    pssr = (tifffile.imread(data / "pssr" / "HR_2nm.tif"), tifffile.imread(data / "pssr" / "LR_8nm.tif"))
    img, truth = montage(2, 3, mirror=False)
    return Targets((img, truth.astype(bool)), (imgs, masks), pssr)


def _segment(img: np.ndarray, engine: Any, **options: Any) -> np.ndarray:
    return np.asarray(tilefeet.segment(img, engine, **options).values[0])


def score_isbi(targets: Targets, engine: Any, *, intensity: str = "bundle", threads: int | None = None, **options: Any) -> dict:
    """Membrane pixel F1, boundary F1 (2 px) and the cells' adapted Rand error on the held-out ISBI montage;
    ``options`` go to ``tilefeet.segment`` (e.g. ``tta=8``), as in the other scores."""
    img, truth = targets.isbi
    t0 = time.perf_counter()
    pred = _segment(img, engine, pixel_size_nm="4nm", intensity=intensity, threads=threads, **options) >= 0.5
    px, bd = pixel_metrics(pred, truth), boundary_metrics(pred, truth, 2.0)
    inst = instance_metrics(pred, truth, "background")
    return {"f1": px.f1, "f1_1px": tolerant_metrics(pred, truth, 1.0).f1, "boundary_f1": bd.f1,
            "adapted_rand_error": inst.adapted_rand_error, "seconds": time.perf_counter() - t0}


def score_lucchi(
    targets: Targets, engine: Any, *, normalize: bool = True, intensity: str = "bundle", threads: int | None = None, **options: Any
) -> dict:
    """Membrane scores on the 5 Lucchi test slices (true 5 nm, or forced 4 nm without ``normalize``)."""
    imgs, masks = targets.lucchi
    t0 = time.perf_counter()
    px = "5nm" if normalize else "4nm"  # the truth, or what a user who ignores pixel sizes says
    preds = [_segment(img, engine, pixel_size_nm=px, intensity=intensity, threads=threads, **options) >= 0.5 for img in imgs]
    pred, truth = np.concatenate(preds, axis=1), np.concatenate(masks, axis=1)
    p, bd = pixel_metrics(pred, truth), boundary_metrics(pred, truth, 2.0)
    # The regions between membranes (cells), scored per slice: insensitive to how thick a
    # membrane is drawn, which pixel F1 is not (Lucchi's membrane masks are thick).
    inst = [instance_metrics(a, t, "background") for a, t in zip(preds, masks)]
    # within 1 px: per slice, so no tolerance reaches across the seam of the concatenation
    tol = [tolerant_metrics(a, t, 1.0) for a, t in zip(preds, masks)]
    pm, tm = sum(m.predicted_matched for m in tol), sum(m.true_matched for m in tol)
    pn, tn = sum(m.predicted for m in tol), sum(m.true for m in tol)
    f1_1px = 2 * pm * tm / (pm * tn + tm * pn) if pm and tm else 0.0  # the F1 of the summed precision and recall
    return {"f1": p.f1, "f1_1px": f1_1px, "iou": p.iou, "boundary_f1": bd.f1,
            "adapted_rand_error": float(np.mean([i.adapted_rand_error for i in inst])),
            "membrane_fraction": float(pred.mean()), "truth_membrane_fraction": float(truth.mean()),
            "seconds": time.perf_counter() - t0}


def score_pssr(
    targets: Targets, engine: Any, *, normalize: bool = True, intensity: str = "bundle", threads: int | None = None, **options: Any
) -> dict:
    """Agreement of the membrane maps of the 2 nm and the 8 nm image on a common 4 nm grid."""
    from skimage.transform import resize

    hr, lr = targets.pssr
    common = (hr.shape[0] // 2, hr.shape[1] // 2)  # the 4 nm grid over the same field of view
    t0 = time.perf_counter()
    maps, probs = [], []
    for img, px in ((hr, "2nm"), (lr, "8nm")):
        kw = {"output_grid": "network"} if normalize else {"pixel_size_nm": "4nm"}
        p = _segment(img, engine, **{"pixel_size_nm": px, "intensity": intensity, "threads": threads, **kw, **options})
        if p.shape != common:
            p = resize(p, common, order=1, anti_aliasing=p.shape[0] > common[0], preserve_range=True)
        maps.append(p >= 0.5)
        probs.append(p.ravel().astype(np.float64))
    agree = pixel_metrics(maps[0], maps[1])
    # F1 of the two label maps rewards a bias shared by both (membrane everywhere agrees with itself);
    # the correlation of the probabilities measures whether the same structures come out at both sizes.
    return {"agreement_f1": agree.f1, "agreement_iou": agree.iou, "probability_correlation": float(np.corrcoef(*probs)[0, 1]),
            "membrane_fraction_2nm": float(maps[0].mean()), "membrane_fraction_8nm": float(maps[1].mean()),
            "seconds": time.perf_counter() - t0}


def score_all(targets: Targets, engine: Any, *, threads: int | None = None, **options: Any) -> dict:
    """The headline score of each target, flat (what the training tables compare engines by)."""
    isbi = score_isbi(targets, engine, threads=threads, **options)
    luc = score_lucchi(targets, engine, threads=threads, **options)
    ps = score_pssr(targets, engine, threads=threads, **options)
    return {"isbi_f1": isbi["f1"], "isbi_boundary_f1": isbi["boundary_f1"],
            "lucchi_f1": luc["f1"], "lucchi_boundary_f1": luc["boundary_f1"], "lucchi_are": luc["adapted_rand_error"],
            "lucchi_membrane_fraction": luc["membrane_fraction"], "pssr_agreement_f1": ps["agreement_f1"],
            "pssr_membrane_fraction_2nm": ps["membrane_fraction_2nm"], "pssr_membrane_fraction_8nm": ps["membrane_fraction_8nm"],
            "pssr_correlation": ps["probability_correlation"]}


def lucchi(targets: Targets, engine: str, modes: tuple[str, ...] = MODES) -> list[dict]:
    rows = []
    for normalize in (True, False):
        for mode in modes:
            rows.append({"dataset": "lucchi (FIB-SEM, 5 nm)", "resolution_normalization": normalize, "intensity": mode,
                         **score_lucchi(targets, engine, normalize=normalize, intensity=mode)})
            print(_row(rows[-1]), flush=True)
    return rows


def pssr(targets: Targets, engine: str, modes: tuple[str, ...] = MODES) -> list[dict]:
    rows = []
    for normalize in (True, False):
        for mode in modes:
            rows.append({"dataset": "pssr (tSEM, 2 nm vs 8 nm)", "resolution_normalization": normalize, "intensity": mode,
                         **score_pssr(targets, engine, normalize=normalize, intensity=mode)})
            print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict) -> str:
    scores = {k: v for k, v in r.items() if k in ("f1", "f1_1px", "iou", "boundary_f1", "adapted_rand_error", "membrane_fraction", "agreement_f1", "agreement_iou")}
    return f"{r['dataset']:<28} {'on ' if r['resolution_normalization'] else 'off'}  {r['intensity']:<10} " + "  ".join(
        f"{k} {v:.3f}" for k, v in scores.items()
    )


def table(rows: list[dict]) -> str:
    out = ["| data | resolution normalization | intensity | F1 | F1 within 1 px | IoU | boundary F1 (2 px) | cells: adapted Rand error | membrane fraction (truth) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "f1" in r:
            out.append(f"| {r['dataset']} | {'on' if r['resolution_normalization'] else 'off (forced 4 nm)'} | {r['intensity']} "
                       f"| {r['f1']:.3f} | {r.get('f1_1px', float('nan')):.3f} | {r['iou']:.3f} | {r['boundary_f1']:.3f} | {r['adapted_rand_error']:.3f} "
                       f"| {r['membrane_fraction']:.3f} ({r['truth_membrane_fraction']:.3f}) |")
    out += ["", "| data | resolution normalization | intensity | agreement F1 | agreement IoU |", "|---|---|---|---|---|"]
    for r in rows:
        if "agreement_f1" in r:
            out.append(f"| {r['dataset']} | {'on' if r['resolution_normalization'] else 'off (forced 4 nm)'} | {r['intensity']} "
                       f"| {r['agreement_f1']:.3f} | {r['agreement_iou']:.3f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--engine", default="isbi-membrane")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generalization.json")
    ap.add_argument("--modes", default=",".join(MODES), help="intensity modes to run (comma-separated)")
    ap.add_argument("--skip-pssr", action="store_true", help="Lucchi only (the PSSR pair has no labels to score F1 on)")
    args = ap.parse_args()
    modes = tuple(m for m in args.modes.split(",") if m)
    targets = load_targets(args.data)
    rows = lucchi(targets, args.engine, modes) + ([] if args.skip_pssr else pssr(targets, args.engine, modes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"engine": args.engine, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
