"""Tissue mask benchmark: a montage of which part is empty resin, segmented with ``--mask auto`` and
without a mask, in one run. Prints the time ratio beside the fraction of tiles that still run: a
mask that earns its keep makes the ratio close to that fraction (plus the cost of finding it).

    python benchmarks/bench_mask.py                        # 4096², the right 50 % resin (noise)
    python benchmarks/bench_mask.py --size 8192 --empty 0.33 --resin constant

Writes ``benchmarks/results/mask-<device>-<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def section(size: int, empty: float, resin: str) -> np.ndarray:
    """Mirror-tiled real EM texture with the right ``empty`` fraction replaced by resin."""
    from tilefeet.sample import texture_section

    img = np.asarray(texture_section(size))
    cut = round(size * (1 - empty))
    if resin == "constant":
        img[:, cut:] = 118
    else:
        img[:, cut:] = np.clip(np.random.default_rng(0).normal(150, 20, (size, size - cut)), 0, 255).astype(np.uint8)
    return img


def main() -> None:
    import tilefeet
    from tilefeet.bench import device_name
    from tilefeet.convert import write_image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--empty", type=float, default=0.5, help="fraction of the width that is resin")
    ap.add_argument("--resin", choices=("noise", "constant"), default="noise")
    ap.add_argument("--engine", default="isbi-membrane")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    args = ap.parse_args()

    work = args.workdir / "mask"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = write_image(section(args.size, args.empty, args.resin), work / "section.ome.zarr", (4.0, 4.0), chunk=1024)
    opts = dict(device=args.device, block_size=2048, chunk_size=1024)
    tilefeet.plan_segmentation(src, args.engine, **opts)  # libraries imported and the backend measured before any clock
    rows = {}
    for mask in ("none", "auto"):
        t0 = time.perf_counter()
        run = tilefeet.plan_segmentation(src, args.engine, mask=mask, **opts)
        t_plan = time.perf_counter() - t0
        tilefeet.write_planned(run, work / f"out-{mask}.ome.zarr", overwrite=True)
        seconds = time.perf_counter() - t0
        s = run.plan.summary()
        rows[mask] = {"seconds": seconds, "planning_seconds": t_plan, "tiles_run": 1 - s.get("tiles_skipped", 0.0),
                      "area_kept": 1 - s.get("area_skipped", 0.0), "backend": run.runner.backend}
    ratio = rows["auto"]["seconds"] / rows["none"]["seconds"]
    report = {
        "device": device_name(args.device), "size": args.size, "empty": args.empty, "resin": args.resin, "engine": args.engine,
        "rows": rows, "time_ratio": ratio, "tiles_run_fraction": rows["auto"]["tiles_run"],
    }
    print(f"{args.size}² section, {args.empty:.0%} {args.resin} resin, {args.engine} on {report['device']}")
    print(f"{'mask':6s} {'seconds':>8s} {'of which planning':>18s} {'tiles run':>10s} {'area kept':>10s}")
    for mask, r in rows.items():
        print(f"{mask:6s} {r['seconds']:8.1f} {r['planning_seconds']:18.1f} {r['tiles_run']:10.0%} {r['area_kept']:10.0%}")
    print(f"--mask auto takes {ratio:.2f} × the time of no mask, running {rows['auto']['tiles_run']:.0%} of the tiles")
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"mask-{slug}-{args.size}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
