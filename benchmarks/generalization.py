"""Generalization study: the membrane engine (trained at 4 nm on ISBI ssTEM) on data from other
microscopes, with and without resolution normalization, for each intensity mode.

1. EPFL/Lucchi FIB-SEM of mouse CA1 at 5 nm, scored against its membrane masks (pixel F1 and
   boundary F1 at 2 px, on the 5 held-out test slices).
2. The PSSR brain tSEM pair: the same field of view at 2 nm and at 8 nm. No ground truth; scored as
   agreement (F1 of the two membrane maps on a common 4 nm grid).

"Without resolution normalization" forces ``--pixel-size`` to the engine's 4 nm: what a user who
ignores pixel sizes gets. Run:

    python benchmarks/generalization.py --data ../shared/data/em --out benchmarks/results/generalization.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import tilefeet
from tilefeet.metrics import boundary_metrics, instance_metrics, pixel_metrics

MODES = ("bundle", "percentile", "meanstd", "histogram")


def lucchi(data: Path, engine: str) -> list[dict]:
    import imageio.v3 as iio

    names = sorted(p.name for p in (data / "lucchi" / "test" / "slices").glob("*.png"))
    imgs = [iio.imread(data / "lucchi" / "test" / "slices" / n) for n in names]
    masks = [iio.imread(data / "lucchi" / "test" / "membranes" / n) > 127 for n in names]
    rows = []
    for normalize in (True, False):
        for mode in MODES:
            t0 = time.perf_counter()
            preds = []
            for img in imgs:
                px = "5nm" if normalize else "4nm"  # the truth, or what a user who ignores pixel sizes says
                p = tilefeet.segment(img, engine, pixel_size_nm=px, intensity=mode).values[0]
                preds.append(p >= 0.5)
            pred, truth = np.concatenate(preds, axis=1), np.concatenate(masks, axis=1)
            px, bd = pixel_metrics(pred, truth), boundary_metrics(pred, truth, 2.0)
            # The regions between membranes (cells), scored per slice: insensitive to how thick a
            # membrane is drawn, which pixel F1 is not (Lucchi's membrane masks are thick).
            inst = [instance_metrics(p, t, "background") for p, t in zip(preds, masks)]
            rows.append({"dataset": "lucchi (FIB-SEM, 5 nm)", "resolution_normalization": normalize, "intensity": mode,
                         "f1": px.f1, "iou": px.iou, "boundary_f1": bd.f1,
                         "adapted_rand_error": float(np.mean([i.adapted_rand_error for i in inst])),
                         "membrane_fraction": float(pred.mean()), "truth_membrane_fraction": float(truth.mean()),
                         "seconds": time.perf_counter() - t0})
            print(_row(rows[-1]), flush=True)
    return rows


def pssr(data: Path, engine: str) -> list[dict]:
    import tifffile
    from skimage.transform import resize

    hr = tifffile.imread(data / "pssr" / "HR_2nm.tif")
    lr = tifffile.imread(data / "pssr" / "LR_8nm.tif")
    common = (hr.shape[0] // 2, hr.shape[1] // 2)  # the 4 nm grid over the same field of view
    rows = []
    for normalize in (True, False):
        for mode in MODES:
            t0 = time.perf_counter()
            maps = []
            for img, px in ((hr, "2nm"), (lr, "8nm")):
                kw = {"output_grid": "network"} if normalize else {"pixel_size_nm": "4nm"}
                p = tilefeet.segment(img, engine, **{"pixel_size_nm": px, "intensity": mode, **kw}).values[0]
                if p.shape != common:
                    p = resize(p, common, order=1, anti_aliasing=p.shape[0] > common[0], preserve_range=True)
                maps.append(p >= 0.5)
            agree = pixel_metrics(maps[0], maps[1])
            rows.append({"dataset": "pssr (tSEM, 2 nm vs 8 nm)", "resolution_normalization": normalize, "intensity": mode,
                         "agreement_f1": agree.f1, "agreement_iou": agree.iou,
                         "membrane_fraction_2nm": float(maps[0].mean()), "membrane_fraction_8nm": float(maps[1].mean()),
                         "seconds": time.perf_counter() - t0})
            print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict) -> str:
    scores = {k: v for k, v in r.items() if k in ("f1", "iou", "boundary_f1", "adapted_rand_error", "membrane_fraction", "agreement_f1", "agreement_iou")}
    return f"{r['dataset']:<28} {'on ' if r['resolution_normalization'] else 'off'}  {r['intensity']:<10} " + "  ".join(
        f"{k} {v:.3f}" for k, v in scores.items()
    )


def table(rows: list[dict]) -> str:
    out = ["| data | resolution normalization | intensity | F1 | IoU | boundary F1 (2 px) | cells: adapted Rand error | membrane fraction (truth) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "f1" in r:
            out.append(f"| {r['dataset']} | {'on' if r['resolution_normalization'] else 'off (forced 4 nm)'} | {r['intensity']} "
                       f"| {r['f1']:.3f} | {r['iou']:.3f} | {r['boundary_f1']:.3f} | {r['adapted_rand_error']:.3f} "
                       f"| {r['membrane_fraction']:.3f} ({r['truth_membrane_fraction']:.3f}) |")
    out += ["", "| data | resolution normalization | intensity | agreement F1 | agreement IoU |", "|---|---|---|---|---|"]
    for r in rows:
        if "agreement_f1" in r:
            out.append(f"| {r['dataset']} | {'on' if r['resolution_normalization'] else 'off (forced 4 nm)'} | {r['intensity']} "
                       f"| {r['agreement_f1']:.3f} | {r['agreement_iou']:.3f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "em")
    ap.add_argument("--engine", default="isbi-membrane")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generalization.json")
    args = ap.parse_args()
    rows = lucchi(args.data, args.engine) + pssr(args.data, args.engine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"engine": args.engine, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
