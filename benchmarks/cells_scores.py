"""Cells and objects right by default (issue 20, points 3-5): scores per dataset, old against new,
and how the defaults were chosen (on training data only).

    python benchmarks/cells_scores.py                 # scores: cells (ISBI held out, Lucchi) and objects (Lucchi), ~10 min on 2 cores
    python benchmarks/cells_scores.py --choose        # also the cell-recipe grid on ISBI's training slices (~20 min)
    python benchmarks/cells_scores.py --only cells    # or objects, or choose (the grid alone)

Every score goes through the commands a user runs: each slice converted alone (``tilefeet convert``,
its truth as ``--labels``), segmented (``tilefeet segment``), cells or objects made (``tilefeet objects``)
and scored (``tilefeet evaluate --cells`` / ``--objects``, from the stored layer).

- **cells** (``isbi-membrane``): adapted Rand error and VOI of ``objects --cells`` (new: seeds below
  p 0.05, a watershed of 160 nm reach on the membrane probability, neighbours merged below a mean
  boundary of 0.6: the engine's recipe) against ``--cell-method grow`` (old: the regions below the
  label threshold grown 40 nm), and a plain scikit-image seeded watershed (seeds p < 0.1, unbounded,
  whole image: the issue's baseline), per slice and their mean, on: ISBI 2012 training slices 0-20
  (the data the recipe was chosen on), the held-out ISBI slices 24-29 (``tests/data/isbi``), and
  the 5 Lucchi test slices with their membrane masks, segmented zero-shot at 5 nm (another lab's
  data: FIB-SEM of mouse CA1, not the ssTEM of fly VNC the engine was trained on). Truth cells are
  the 4-connected regions between the truth's membranes (ISBI label 255; Lucchi: membrane mask 0).
- **objects** (``lucchi-mito``): object F1 at IoU ≥ 0.5 on the 5 Lucchi test slices, each segmented
  alone, with ``tilefeet objects`` defaults (the engine's recipe: min size and hole filling chosen on
  its training masks) against no recipe (``--min-size 0 --no-fill-holes``, the old defaults); and in
  3-D on the two test sub-stacks (0000-0002, 0162-0163) as ``benchmarks/stack_scores.py`` builds
  them (26-connected objects; the recipe's area times the section spacing as a volume, holes filled
  per section). Counts summed over slices (sub-stacks).
- **--choose**: the grid the cell defaults were chosen from: reach (nm), seed threshold, merge
  threshold, minimum cell size, on ISBI training slices 0-20 as they are and degraded (defocus and
  noise, low contrast with a gamma, 5 nm imaging read as 4 nm; one kind per slice), each scored by
  mean ARE and VOI; the choice minimizes the mean over both sets and both scores of score / best score.
  The object recipe's rule (:func:`tilefeet.engine.recipe_from_masks`) is shown against
  other minimum sizes on lucchi-mito's own training slices.

Writes ``benchmarks/results/cells-objects-scores.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
EM = ROOT.parent / "shared" / "data" / "em"
ISBI_TRAIN = [(EM / "isbi2012/train/image" / f"{i}.png", EM / "isbi2012/train/label" / f"{i}.png") for i in range(21)]
ISBI_HELDOUT = [(ROOT / "tests/data/isbi/image" / f"{i}.png", ROOT / "tests/data/isbi/label" / f"{i}.png") for i in range(24, 30)]
LUCCHI_SLICES = ("testing0000", "testing0001", "testing0002", "testing0162", "testing0163")
LUCCHI_MEMBRANES = [(EM / "lucchi/test/slices" / f"{s}.png", EM / "lucchi/test/membranes" / f"{s}.png") for s in LUCCHI_SLICES]
LUCCHI_SUBSTACKS = {"0000-0002": LUCCHI_SLICES[:3], "0162-0163": LUCCHI_SLICES[3:]}


def tf(*args: Any) -> None:
    """``tilefeet ARGS`` in this process; a non-zero status stops the benchmark."""
    from tilefeet.cli import main

    code = main(["-q", *map(str, args)])
    if code != 0:
        raise SystemExit(f"tilefeet {' '.join(map(str, args))} exited {code}")


def evaluate_json(*args: Any) -> dict:
    """``tilefeet evaluate ARGS --json`` (its printed JSON)."""
    import contextlib
    import io

    from tilefeet.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["evaluate", *map(str, args), "--json"])
    if code != 0:
        raise SystemExit(f"tilefeet evaluate {' '.join(map(str, args))} exited {code}")
    return json.loads(out.getvalue())


def prepared(work: Path, image: Path, truth: Path, pixel: str, engine: str, label: str, foreground: str | None,
             *extra: str) -> tuple[Path, Path]:
    """(segment output, truth label image) of one slice (cached in ``work``)."""
    src, seg = work / f"{image.stem}.ome.zarr", work / f"{image.stem}-{engine}.ome.zarr"
    if not (src / "labels" / label / "zarr.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        tf("convert", image, src, "--pixel-size", pixel)
        tf("convert", truth, src, "--labels", label, *(["--foreground", foreground] if foreground else []))
    if not (seg / "labels" / "zarr.json").exists():
        tf("segment", src, seg, "-e", engine, "--overwrite", *extra)
    return seg, src / "labels" / label


# ------------------------------------------------------------------------------------------ cells


def plain_watershed(seg: Path, truth: Path) -> dict:
    """The issue's baseline: scikit-image's seeded watershed of the whole image, seeds p < 0.1."""
    import zarr
    from skimage.measure import label
    from skimage.segmentation import watershed

    from tilefeet.objects.match import cell_scores, overlaps

    p = zarr.open_group(str(seg), mode="r")["0"][0]
    t = label(np.asarray(zarr.open_array(str(truth / "0"), mode="r")[:]) == 0, connectivity=1)
    return cell_scores(overlaps(t, watershed(p, label(p < 0.1 * 255, connectivity=1)))).to_dict()


#: The membrane engine the cells job scores (``--membrane-engine``); its results go under ``cells``
#: for isbi-membrane (the engine the cell recipe was chosen for) and ``cells-ENGINE`` otherwise.
MEMBRANE_ENGINE = "isbi-membrane"


def cells_dataset(work: Path, items: list[tuple[Path, Path]], pixel: str, foreground: str | None) -> dict:
    rows: dict[str, dict] = {}
    for image, truth_png in items:
        seg, truth = prepared(work, image, truth_png, pixel, MEMBRANE_ENGINE, "membrane", foreground)
        row: dict[str, Any] = {}
        for variant, opts in (("new", []), ("old", ["--cell-method", "grow"])):
            t = time.perf_counter()
            tf("objects", seg, "--cells", "--overwrite", *opts)
            seconds = time.perf_counter() - t
            d = evaluate_json(seg, truth, "--cells")
            row[variant] = {**d["cells"], "objects_seconds": round(seconds, 2), "recipe": d["objects"]["predicted"]}
        row["plain_watershed"] = plain_watershed(seg, truth)
        rows[image.stem] = row
        print(f"    {image.stem:12s} " + "  ".join(f"{v} ARE {r['adapted_rand_error']:.4f} VOI {r['vi']:.4f}" for v, r in row.items()), flush=True)
    mean = {v: {k: float(np.mean([r[v][k] for r in rows.values()])) for k in ("adapted_rand_error", "vi", "vi_split", "vi_merge")}
            for v in ("new", "old", "plain_watershed")}
    for v, m in mean.items():
        print(f"  mean {v:16s} ARE {m['adapted_rand_error']:.4f} VOI {m['vi']:.4f} (split {m['vi_split']:.4f}, merge {m['vi_merge']:.4f})")
    return {"mean": mean, "per_slice": rows}


def cells(work: Path) -> dict:
    out = {}
    for name, items, pixel, fg in (("isbi-heldout-24-29", ISBI_HELDOUT, "4nm", "0"), ("lucchi-test", LUCCHI_MEMBRANES, "5nm", None),
                                   ("isbi-train-0-20", ISBI_TRAIN, "4nm", "0")):
        print(f"  cells: {name}")
        out[name] = cells_dataset(work / ("cells" if MEMBRANE_ENGINE == "isbi-membrane" else f"cells-{MEMBRANE_ENGINE}"), items, pixel, fg)
    return {"engine": MEMBRANE_ENGINE, "protocol": (
        f"each slice converted alone, segmented with {MEMBRANE_ENGINE} (Lucchi: 5 nm), `tilefeet objects --cells` (new: the "
        "engine's recipe) and `--cell-method grow` (old), scored by `tilefeet evaluate --cells` (truth cells: 4-connected regions "
        "between the truth's membranes); plain_watershed: skimage.segmentation.watershed of the whole probability map, seeds "
        "p < 0.1; means over slices"), "datasets": out}


# ---------------------------------------------------------------------------------------- objects


def summed(rows: list[dict]) -> dict:
    n_true = sum(r["true_objects"] for r in rows)
    n_pred = sum(r["predicted_objects"] for r in rows)
    matches = np.sum([r["matches"] for r in rows], axis=0)
    ap = [m / (n_true + n_pred - m) for m in matches]
    return {"true_objects": n_true, "predicted_objects": n_pred, "matches": [int(m) for m in matches],
            "precision": matches[0] / n_pred, "recall": matches[0] / n_true, "f1": 2 * matches[0] / (n_true + n_pred),
            "ap50": ap[0], "ap": float(np.mean(ap))}


def objects(work: Path) -> dict:
    variants = {"recipe (defaults)": [], "no recipe (--min-size 0 --no-fill-holes)": ["--min-size", "0", "--no-fill-holes"]}
    per_slice: dict[str, dict] = {}
    recipe = ""
    for s in LUCCHI_SLICES:
        seg, truth = prepared(work / "objects", EM / "lucchi/test/slices" / f"{s}.png", EM / "lucchi/test/mitochondrion" / f"{s}.png",
                              "5nm", "lucchi-mito", "mitochondrion", None, "--intensity", "bundle")
        per_slice[s] = {}
        for v, opts in variants.items():
            tf("objects", seg, "--overwrite", *opts)
            d = evaluate_json(seg, truth, "--objects")
            per_slice[s][v] = d["objects"]
            recipe = recipe or d["objects"]["predicted"]
    two_d = {v: summed([per_slice[s][v] for s in LUCCHI_SLICES]) for v in variants}
    three_d: dict[str, list] = {v: [] for v in variants}
    for name, slices in LUCCHI_SUBSTACKS.items():
        stack = work / "objects" / f"stack-{name}.ome.zarr"
        if not (stack / "labels" / "mitochondrion" / "zarr.json").exists():
            for kind, folder in (("images", "slices"), ("masks", "mitochondrion")):
                d = work / "objects" / f"stack-{name}-{kind}"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                for k, s in enumerate(slices):
                    shutil.copy(EM / "lucchi/test" / folder / f"{s}.png", d / f"{k:04d}.png")
            shutil.rmtree(stack, ignore_errors=True)
            tf("convert", work / "objects" / f"stack-{name}-images", stack, "--stack", "--pixel-size", "5,5,5nm")
            tf("convert", work / "objects" / f"stack-{name}-masks", stack, "--stack", "--labels", "mitochondrion")
        out = stack.with_name(f"stack-{name}-seg.ome.zarr")
        if not (out / "labels" / "zarr.json").exists():
            tf("segment", stack, out, "-e", "lucchi-mito", "--intensity", "bundle", "--overwrite")
        for v, opts in variants.items():
            tf("objects", out, "--overwrite", *opts)
            three_d[v].append(evaluate_json(out, stack / "labels" / "mitochondrion", "--objects")["objects"])
    three = {v: summed(rows) for v, rows in three_d.items()}
    for label, table in (("2-D, per section", two_d), ("3-D, sub-stacks", three)):
        for v, r in table.items():
            print(f"  objects {label:18s} {v:42s} true {r['true_objects']}, predicted {r['predicted_objects']}: F1 {r['f1']:.4f} "
                  f"P {r['precision']:.4f} R {r['recall']:.4f} AP {r['ap']:.4f}")
    return {"engine": "lucchi-mito", "recipe": recipe, "protocol": (
        "Lucchi test slices, each converted alone (5 nm), segmented with lucchi-mito --intensity bundle, `tilefeet objects` with "
        "defaults (the engine's recipe) or --min-size 0 --no-fill-holes, `tilefeet evaluate --objects` (IoU >= 0.5) from the stored "
        "layer; 3-D: the sub-stacks 0000-0002 and 0162-0163 (convert --stack, 5 nm), 26-connected; counts summed"),
        "two_d": two_d, "three_d": three, "per_slice": per_slice, "three_d_per_substack": three_d}


# ------------------------------------------------------------------------------------ choosing


def degraded(work: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """ISBI training slices 0-20 degraded (one kind per slice) and segmented: (probabilities, truth cells)."""
    import imageio.v3 as iio
    import zarr
    from scipy import ndimage as ndi
    from skimage.measure import label

    rng = np.random.default_rng(0)
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (image, truth) in enumerate(ISBI_TRAIN):
        img = iio.imread(image).astype(np.float64)
        lab = iio.imread(truth)
        kind = i % 3
        if kind == 0:  # defocus and noise
            img = ndi.gaussian_filter(img, 1.5) + rng.normal(0, 12, img.shape)
        elif kind == 1:  # low contrast, a gamma, noise
            img = 255 * (0.3 + 0.4 * (img / 255) ** 0.7) + rng.normal(0, 8, img.shape)
        else:  # imaged at 5 nm, declared 4 nm
            img = ndi.zoom(img, 0.8, order=1)
            lab = (ndi.zoom((lab == 255).astype(np.float64), 0.8, order=1) >= 0.5).astype(np.uint8) * 255
        png = work / f"degraded-{i}.png"
        iio.imwrite(png, np.clip(img, 0, 255).astype(np.uint8))
        src, seg = work / f"degraded-{i}.ome.zarr", work / f"degraded-{i}-seg.ome.zarr"
        if not (seg / "labels" / "zarr.json").exists():
            tf("convert", png, src, "--pixel-size", "4nm", "--overwrite")
            tf("segment", src, seg, "--overwrite")
        out.append((zarr.open_group(str(seg), mode="r")["0"][0], label(lab == 255, connectivity=1)))
    return out


def choose(work: Path) -> dict:
    """The cell-recipe grid on training data only, with the package's own functions."""
    import zarr
    from skimage.measure import label

    from tilefeet.objects.cells import boundaries, flood, levels, merge_cells
    from tilefeet.objects.match import cell_scores, overlaps

    sets = {"isbi-train": [], "isbi-train-degraded": degraded(work / "choose")}
    for image, truth in ISBI_TRAIN:
        seg, _ = prepared(work / "cells", image, truth, "4nm", "isbi-membrane", "membrane", "0")
        import imageio.v3 as iio

        sets["isbi-train"].append((zarr.open_group(str(seg), mode="r")["0"][0], label(iio.imread(truth) == 255, connectivity=1)))
    grid: dict[str, dict] = {}
    for reach in (40, 80, 120, 160, 240):
        for ts in (0.02, 0.05, 0.1, 0.2):
            floods = {name: [] for name in sets}
            for name, items in sets.items():
                for p, t in items:
                    lev, scale = levels(p)
                    seeds = label(p < ts * 255, connectivity=1)
                    ids = flood(seeds, lev, round(reach / 4))
                    floods[name].append((ids, boundaries(np.pad(ids, 1), np.pad(lev, 1), 1), int(seeds.max()), scale, t))
            for tm in (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
                for min_nm2 in (0, 2000):
                    key = f"reach {reach} nm, seeds < {ts}, merge < {tm}, min {min_nm2} nm2"
                    grid[key] = {}
                    for name, rows in floods.items():
                        sc = []
                        for ids, b, n, scale, t in rows:
                            lut, _ = merge_cells(n, b, threshold=tm, scale=scale, min_px=round(min_nm2 / 16))
                            c = cell_scores(overlaps(t, lut[ids]))
                            sc.append((c.adapted_rand_error, c.vi))
                        grid[key][name] = {"adapted_rand_error": float(np.mean([s[0] for s in sc])), "vi": float(np.mean([s[1] for s in sc]))}
            print(f"  choose: reach {reach} nm, seeds < {ts}: done", flush=True)
    keys = list(grid)
    a = np.array([[[grid[k][n]["adapted_rand_error"], grid[k][n]["vi"]] for n in sets] for k in keys])
    score = (a / a.min(axis=0)).mean(axis=(1, 2))
    order = np.argsort(score)
    for i in order[:5]:
        print(f"    {keys[i]}: {score[i]:.4f} " + ", ".join(f"{n} ARE {grid[keys[i]][n]['adapted_rand_error']:.4f} VOI {grid[keys[i]][n]['vi']:.4f}" for n in sets))
    return {"rule": "least mean over {isbi-train, isbi-train-degraded} x {ARE, VOI} of score / best score in the grid",
            "chosen": keys[int(order[0])], "ranked": [[keys[i], float(score[i])] for i in order], "grid": grid,
            "object_recipe": object_rule(work)}


def object_rule(work: Path) -> dict:
    """lucchi-mito's own training slices: object F1 of its predictions for several minimum sizes."""
    import glob

    import zarr
    from scipy import ndimage as ndi
    from skimage.measure import label

    from tilefeet.engine import recipe_from_masks
    from tilefeet.objects.match import ObjectScores, match_objects, overlaps

    pairs = []
    for f in sorted(glob.glob(str(EM / "lucchi/train/slices/*.png"))):
        seg, truth = prepared(work / "lucchi-train", Path(f), EM / "lucchi/train/mitochondrion" / Path(f).name, "5nm", "lucchi-mito",
                              "mitochondrion", None, "--intensity", "bundle")
        pairs.append((zarr.open_group(str(seg), mode="r")["0"][0] >= 128, np.asarray(zarr.open_array(str(truth / "0"), mode="r")[:]) != 0))
    masks = [t for _, t in pairs]
    chosen = recipe_from_masks(masks, (5.0, 5.0))
    areas = np.concatenate([np.bincount(label(t, connectivity=2).ravel())[1:] for t in masks])
    real = areas[areas >= 0.01 * np.median(areas)]
    rows = {}
    for name, px in {"none": 0.0, "smallest object": float(real.min()), **{f"percentile {q}": float(np.percentile(real, q)) for q in (1, 2, 5, 10)}}.items():
        parts = []
        for m, t in pairs:
            m = ndi.binary_fill_holes(m, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool))
            lab = label(m, connectivity=2)
            keep = np.bincount(lab.ravel()) >= px
            keep[0] = False
            parts.append(match_objects(overlaps(label(t, connectivity=2), np.where(keep[lab], lab, 0))))
        s = ObjectScores.merged(parts)
        rows[name] = {"min_size_nm2": px * 25.0, "f1": s.f1, "precision": s.precision, "recall": s.recall}
        print(f"  object rule on lucchi-mito's training slices: min size {name:16s} {px * 25 / 1e6:.4f} µm²: F1 {s.f1:.4f}")
    return {"recipe_from_masks": chosen, "training_slices_f1_holes_filled": rows}


JOBS = {"cells": cells, "objects": objects, "choose": choose}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=list(JOBS), help="jobs to run (default: all)")
    ap.add_argument("--choose", action="store_true", help="also the grid the defaults were chosen from (training data only)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-work/cells-scores").resolve())
    ap.add_argument("--membrane-engine", default="isbi-membrane", help="the engine the cells job scores (default: isbi-membrane)")
    a = ap.parse_args(argv)
    global MEMBRANE_ENGINE
    MEMBRANE_ENGINE = a.membrane_engine
    a.workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "cells-objects-scores.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    import platform

    import torch

    from tilefeet import __version__
    from tilefeet.bench import device_name
    from tilefeet.engine import load_engine

    report["machine"] = {"cpu": device_name("cpu"), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                         "tilefeet": __version__, "load_average_at_start": os.getloadavg(),
                         "engines": {e: load_engine(e).weights_sha256 for e in ("isbi-membrane", "em-membrane", "lucchi-mito")},
                         "note": "CPU only, shared with other jobs: seconds are upper bounds; scores do not depend on the machine"}
    jobs = list(a.only or ["cells", "objects"])
    if a.choose and "choose" not in jobs:
        jobs.append("choose")
    for name in jobs:
        print(name, flush=True)
        t = time.perf_counter()
        key = f"cells-{MEMBRANE_ENGINE}" if name == "cells" and MEMBRANE_ENGINE != "isbi-membrane" else name
        report[key] = JOBS[name](a.workdir)
        report[key]["seconds"] = round(time.perf_counter() - t, 1)
        path.write_text(json.dumps(report, indent=1, default=_json))
    print(f"wrote {path}")
    return 0


def _json(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(type(v))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
