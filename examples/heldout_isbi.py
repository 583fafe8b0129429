"""Score engines/isbi-membrane on its six held-out ISBI slices, through the real pipeline.

The slices (24–29 of the ISBI 2012 training set, never seen in training or validation) are the
bundled sample: a 2 × 3 montage is written as OME-Zarr, segmented with ``tilefeet.segment_to_zarr``
and scored with ``tilefeet.evaluate``. Also reports the error rate along tile seams against the
interior, which is how the engine's recommended overlap was chosen.

    python examples/heldout_isbi.py                    # default settings (the engine's tile/overlap)
    python examples/heldout_isbi.py --overlap 128      # another overlap
    python examples/heldout_isbi.py --record           # write the scores into engine.toml [metrics]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

import tilefeet
from tilefeet.convert import write_image
from tilefeet.evaluate import evaluate
from tilefeet.sample import montage

#: The recipe of the README number (tests/test_real_data.py uses the same).
CHUNK, BLOCK = 256, 768


def seam_errors(err: np.ndarray, stride: int, width: int = 8) -> tuple[float, float]:
    """Error rate within ``width`` px of tile seams, and in the interior (montage slice borders excluded)."""
    h, w = err.shape
    def bands(positions, axis):
        m = np.zeros(err.shape, bool)
        for p in positions:
            sl = slice(max(p - width, 0), p + width)
            m[(sl, slice(None)) if axis == 0 else (slice(None), sl)] = True
        return m
    slices = bands(range(512, h, 512), 0) | bands(range(512, w, 512), 1)
    seams = (bands(range(stride, h, stride), 0) | bands(range(stride, w, stride), 1)) & ~slices
    return float(err[seams].mean()), float(err[~seams & ~slices].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="isbi-membrane")
    ap.add_argument("--tile", type=int)
    ap.add_argument("--overlap", type=int)
    ap.add_argument("--blend", default="gaussian")
    ap.add_argument("--record", action="store_true", help="write the scores into the engine's engine.toml")
    args = ap.parse_args()

    img, truth = montage(2, 3, mirror=False)
    opts = {k: v for k, v in (("tile", args.tile), ("overlap", args.overlap)) if v is not None}
    with tempfile.TemporaryDirectory() as d:
        src = write_image(img, Path(d) / "heldout.ome.zarr", (4.0, 4.0), chunk=CHUNK)
        t0 = time.perf_counter()
        out = tilefeet.segment_to_zarr(src, Path(d) / "seg.ome.zarr", args.engine, chunk_size=CHUNK, block_size=BLOCK, blend=args.blend, **opts)
        seconds = time.perf_counter() - t0
        plan, _, bundle = tilefeet.plan_segmentation(src, args.engine, **opts)
        ev = evaluate(str(out), truth, class_name="membrane", instances="background", tolerance_px=2)
        pred = zarr.open_group(str(out), mode="r")["labels/membrane/0"][0].astype(bool)
    seam, interior = seam_errors(pred != truth.astype(bool), plan.lattice.stride[0])
    scores = {
        "heldout_f1": round(ev.pixel.f1, 4),
        "heldout_iou": round(ev.pixel.iou, 4),
        "heldout_boundary_f1_2px": round(ev.boundary.f1, 4),
        "heldout_adapted_rand_error": round(ev.instances.adapted_rand_error, 4),
        "heldout_vi_split": round(ev.instances.vi_split, 4),
        "heldout_vi_merge": round(ev.instances.vi_merge, 4),
    }
    report = {**scores, "tile": plan.lattice.tile[0], "overlap": plan.lattice.overlap[0], "blend": args.blend,
              "seam_error": round(seam, 4), "interior_error": round(interior, 4), "seconds": round(seconds, 1),
              "pixels": int(truth.size)}
    print(json.dumps(report, indent=1))
    if args.record:
        from tilefeet.train import record_metrics

        record_metrics(bundle.path, {**scores, "heldout_set": "ISBI 2012 training slices 24-29 (2x3 montage, 1024x1536 px)",
                                     "heldout_settings": f"tile {report['tile']}, overlap {report['overlap']}, {args.blend}"})
        print(f"recorded in {bundle.path / 'engine.toml'}")


if __name__ == "__main__":
    main()
