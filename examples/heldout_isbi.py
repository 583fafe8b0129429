"""Score engines/isbi-membrane on its six held-out ISBI slices, through the real pipeline.

The slices (24–29 of the ISBI 2012 training set, never seen in training or validation) are the
bundled sample: a 2 × 3 montage is written as OME-Zarr, segmented with ``tilefeet.segment_to_zarr``
and scored with ``tilefeet.evaluate``. Also reports the error rate along tile seams against the
same pixels in mid-tile (a second run on the section padded so that they fall mid-tile), which is how the
engine's recommended overlap was chosen: comparing seam bands with "the interior" would compare
different image content.

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


def seam_band(shape: tuple[int, int], ys: list[int], xs: list[int], width: int = 8) -> np.ndarray:
    """Pixels within ``width`` of the seam rows ``ys`` and columns ``xs``."""
    m = np.zeros(shape, bool)
    for p in ys:
        m[max(p - width, 0) : p + width] = True
    for p in xs:
        m[:, max(p - width, 0) : p + width] = True
    return m


def mid_tile_padding(lattice, axis: int) -> int:
    """Padding that moves this lattice's seams farthest from the seams of the padded image's lattice."""
    from tilefeet.geometry import TileLattice

    seams = lattice.seams(axis)
    best = (-1, 0)
    for d in range(0, lattice.stride[axis], 4):
        shape = list(lattice.shape)
        shape[axis] += d
        other = [p - d for p in TileLattice(tuple(shape), lattice.tile, lattice.overlap, lattice.fitted).seams(axis)]
        gap = min((min(abs(a - b) for b in other) for a in seams), default=0) if other else 10**6
        best = max(best, (gap, d))
    return best[1]


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
        run = tilefeet.plan_segmentation(src, args.engine, **opts)
        plan, bundle = run.plan, run.bundle
        ev = evaluate(str(out), truth, class_name="membrane", instances="background", tolerance_px=2)
        pred = zarr.open_group(str(out), mode="r")["labels/membrane/0"][:].astype(bool)
        lat = plan.lattice
        dy, dx = mid_tile_padding(lat, 0), mid_tile_padding(lat, 1)
        shifted = write_image(np.pad(img, ((dy, 0), (dx, 0)), mode="symmetric"), Path(d) / "shifted.ome.zarr", (4.0, 4.0), chunk=CHUNK)
        out2 = tilefeet.segment_to_zarr(shifted, Path(d) / "shifted-seg.ome.zarr", args.engine, chunk_size=CHUNK, block_size=BLOCK, blend=args.blend, **opts)
        mid = zarr.open_group(str(out2), mode="r")["labels/membrane/0"][dy:, dx:].astype(bool)
    band = seam_band(pred.shape, lat.seams(0), lat.seams(1))
    seam, interior = float((pred != truth)[band].mean()), float((mid != truth)[band].mean())
    scores = {
        "heldout_f1": round(ev.pixel.f1, 4),
        "heldout_iou": round(ev.pixel.iou, 4),
        "heldout_boundary_f1_2px": round(ev.boundary.f1, 4),
        "heldout_adapted_rand_error": round(ev.instances.adapted_rand_error, 4),
        "heldout_vi_split": round(ev.instances.vi_split, 4),
        "heldout_vi_merge": round(ev.instances.vi_merge, 4),
    }
    report = {**scores, "tile": plan.lattice.tile[0], "overlap": plan.lattice.overlap[0], "blend": args.blend,
              "seam_pixels_error_on_seam": round(seam, 4), "same_pixels_error_mid_tile": round(interior, 4),
              "seconds": round(seconds, 1),
              "pixels": int(truth.size)}
    print(json.dumps(report, indent=1))
    if args.record:
        from tilefeet.train import record_metrics

        record_metrics(bundle.path, {**scores, "heldout_set": "ISBI 2012 training slices 24-29 (2x3 montage, 1024x1536 px)",
                                     "heldout_settings": f"tile {report['tile']}, overlap {report['overlap']}, {args.blend}"})
        print(f"recorded in {bundle.path / 'engine.toml'}")


if __name__ == "__main__":
    main()
