"""Objects benchmark: ``tilefeet objects`` (exact labels + measurements table, out of core) against
dask-image (``ndmeasure.label`` and its measurement functions) and scikit-image in memory
(``label`` + ``regionprops_table``), measured side by side in one run on the same store; and the
object-level scores of the ``lucchi-mito`` engine on the held-out Lucchi slices.

    python benchmarks/bench_objects.py --size 8192                       # the three, ratios printed
    python benchmarks/bench_objects.py --size 4096 --size 8192           # ... memory against the section's size
    nice -n 10 python benchmarks/bench_objects.py --size 32768 --only tilefeet   # one gigapixel, tilefeet alone
    python benchmarks/bench_objects.py --lucchi                           # lucchi-mito objects on the 5 test slices
    python benchmarks/bench_objects.py --stack --depth 64 --size 2048     # 3-D: tilefeet, cc3d, scikit-image, dask-image

The section is a segment output (OME-Zarr: (c, y, x) uint8 probabilities and labels/mitochondrion)
whose mask is the real Lucchi mitochondria ground truth (27 training + 5 test slices, 768 × 1024 at
5 nm), mirror-tiled to the size asked for. Every job runs in its own process, imports its libraries
before its clock starts, and reads the same store; peak memory is the process's maximum RSS.
What each job produces:

- tilefeet: ``labels/mitochondrion-objects`` (uint32, pyramid) and the Parquet table (area, centroid,
  box, perimeter, moments, axes, eccentricity, orientation, mean/max probability, border);
- dask-image: the label image written to Zarr, then area, centre of mass, bounding boxes, mean and
  maximum probability per object from that Zarr (what its measurement functions offer: a subset);
- scikit-image: the whole mask and probabilities in memory, ``label`` and ``regionprops_table`` with
  tilefeet's columns, the label image written to Zarr.

The label images of all three are checked equal (ids included) before any number is reported.
JSON goes to ``benchmarks/results/objects-<device>-<size>.json`` (``objects-lucchi-mito.json``).

``--stack``: 3-D objects of a stack (a segment output with (c, z, y, x) probabilities and a (z, y,
x) ``labels/mitochondrion``, 50 × 5 × 5 nm voxels) whose mask is the Lucchi mitochondria test stack
(the 5 test slices, in order, mirrored back and forth in z and mirror-tiled in y and x to
``--depth`` × ``--size``²). Jobs, each in its own process on the same store, 26-connected:

- tilefeet: ``write_objects`` out of core (blocks of 16 × 1024 × 1024, 2 in flight): labels
  (uint32, pyramid) and the 3-D table (volume, surface, centroid, box, z extent, axes, probability);
- cc3d: the whole mask in memory, ``cc3d.connected_components`` and ``cc3d.statistics`` (voxel
  counts, boxes, centroids), labels written to Zarr;
- scikit-image: the whole mask and probabilities in memory, ``label`` and ``regionprops_table``
  (area, centroid, bbox, mean/max probability, with the spacing), labels written to Zarr;
- dask-image: ``ndmeasure.label`` on the dask array (the same blocks) written to Zarr, then
  ``area`` and ``center_of_mass`` from it.

The label images are checked equal (ids included), section by section, before any number is
reported. JSON: ``benchmarks/results/objects3d-<device>-<depth>x<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
LUCCHI = Path(__file__).resolve().parents[2] / "shared" / "data" / "em" / "lucchi"
PIXEL_NM = 5.0
BLOCK = 4096
TEST_SLICES = ("testing0000", "testing0001", "testing0002", "testing0162", "testing0163")


# ------------------------------------------------------------------------------------ the store


def lucchi_masks() -> list[np.ndarray]:
    import imageio.v3 as iio

    paths = sorted((LUCCHI / "train" / "mitochondrion").glob("*.png")) + sorted((LUCCHI / "test" / "mitochondrion").glob("*.png"))
    if not paths:
        raise SystemExit(f"no Lucchi masks under {LUCCHI}; give the shared data folder")
    return [iio.imread(p) > 127 for p in paths]


def mito_block(masks: list[np.ndarray], y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Pixels [y0, y0+h) × [x0, x0+w) of the mirror-tiled masks: tile (r, c) is mask (r·C + c) mod n,
    flipped vertically on odd rows and horizontally on odd columns."""
    th, tw = masks[0].shape
    out = np.zeros((h, w), dtype=bool)
    ys, xs = np.arange(y0, y0 + h), np.arange(x0, x0 + w)
    r, c = ys // th, xs // tw
    yy = np.where(r % 2 == 1, th - 1 - ys % th, ys % th)
    xx = np.where(c % 2 == 1, tw - 1 - xs % tw, xs % tw)
    for ri in np.unique(r):
        rows = r == ri
        for ci in np.unique(c):
            cols = c == ci
            m = masks[int(ri * 97 + ci) % len(masks)]
            out[np.ix_(rows, cols)] = m[np.ix_(yy[rows], xx[cols])]
    return out


def make_store(path: Path, size: int, chunk: int = 1024) -> Path:
    """A segment output of ``size``² px whose mask is mirror-tiled Lucchi truth (written once, reused)."""
    import zarr

    from tilefeet.ngff import compressor, multiscales, pyramid_shapes

    if (path / ".complete").exists():
        return path
    masks = lucchi_masks()
    shapes = pyramid_shapes((size, size), (chunk, chunk))
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    lab = root.create_group("labels")
    lab.attrs["ome"] = {"version": "0.5", "labels": ["mitochondrion"]}
    mito = lab.create_group("mitochondrion")
    for k, (h, w) in enumerate(shapes):
        c = (min(chunk, h), min(chunk, w))
        root.create_array(str(k), shape=(1, h, w), chunks=(1, *c), dtype="uint8", compressors=compressor(), fill_value=0,
                          dimension_names=["c", "y", "x"])
        mito.create_array(str(k), shape=(h, w), chunks=c, dtype="uint8", compressors=compressor(), fill_value=0,
                          dimension_names=["y", "x"])
    step = 4096
    for y in range(0, size, step):
        for x in range(0, size, step):
            h, w = min(step, size - y), min(step, size - x)
            m = mito_block(masks, y, x, h, w)
            # probabilities: high inside, low outside, with a deterministic texture
            tex = ((np.arange(h)[:, None] * 7 + np.arange(w)[None, :] * 13) % 32).astype(np.uint8)
            prob = np.where(m, 200 + tex, 10 + tex).astype(np.uint8)
            for k in range(len(shapes)):
                f = 2**k
                if y % f or x % f:
                    continue
                root[str(k)][0, y // f : (y + h + f - 1) // f, x // f : (x + w + f - 1) // f] = prob[::f, ::f]
                mito[str(k)][y // f : (y + h + f - 1) // f, x // f : (x + w + f - 1) // f] = m[::f, ::f].astype(np.uint8)
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [multiscales("probabilities", (PIXEL_NM, PIXEL_NM), len(shapes), lead_axes=[{"name": "c", "type": "channel"}],
                                    metadata={"method": "bench_objects", "settings": {"threshold": 0.5, "output_dtype": "uint8"}})],
        "omero": {"channels": [{"label": "mitochondrion", "color": "FFFFFF"}]},
    }
    mito.attrs["ome"] = {"version": "0.5", "multiscales": [multiscales("mitochondrion", (PIXEL_NM, PIXEL_NM), len(shapes))],
                         "image-label": {"version": "0.5", "source": {"image": "../../"}}}
    (path / ".complete").touch()
    return path


# ---------------------------------------------------------------------------------------- jobs


def job_tilefeet(store: str, out: str) -> dict:
    import dask  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401
    import zarr  # noqa: F401

    from tilefeet.objects import write_objects

    t0 = time.perf_counter()
    r = write_objects(store, block_size=BLOCK, blocks_in_flight=2, overwrite=True)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "objects": r.n_objects, "labels": str(r.path / "0"), "columns": len(r.table().columns)}


def job_dask_image(store: str, out: str) -> dict:
    import dask
    import dask.array as da
    import zarr  # noqa: F401
    from dask_image import ndmeasure

    t0 = time.perf_counter()
    mask = da.from_zarr(os.path.join(store, "labels", "mitochondrion", "0")).rechunk(BLOCK) != 0
    prob = da.from_zarr(os.path.join(store, "0"))[0].rechunk(BLOCK)
    labels, n = ndmeasure.label(mask, structure=np.ones((3, 3), bool))
    labels.astype(np.uint32).to_zarr(out, overwrite=True)  # out of core: write, then measure from the store
    n = int(n)
    lab = da.from_zarr(out)
    index = np.arange(1, n + 1)
    area = ndmeasure.area(prob, lab, index)
    com = ndmeasure.center_of_mass(mask, lab, index)
    mean = ndmeasure.mean(prob, lab, index)
    top = ndmeasure.maximum(prob, lab, index)
    boxes = ndmeasure.find_objects(lab)
    area, com, mean, top, boxes = dask.compute(area, com, mean, top, boxes)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "objects": n, "labels": out, "columns": 1 + 2 + 4 + 1 + 1}


def job_skimage(store: str, out: str) -> dict:
    import zarr
    from skimage.measure import label, regionprops_table

    t0 = time.perf_counter()
    root = zarr.open_group(store, mode="r")
    mask = np.asarray(root["labels/mitochondrion/0"][:]) != 0
    prob = np.asarray(root["0"][0])
    lab = label(mask, connectivity=2)
    props = ["label", "area", "centroid", "bbox", "perimeter", "equivalent_diameter_area", "axis_major_length",
             "axis_minor_length", "eccentricity", "orientation", "intensity_mean", "intensity_max"]
    table = regionprops_table(lab, intensity_image=prob, spacing=(PIXEL_NM, PIXEL_NM), properties=props)
    zarr.create_array(out, data=lab.astype(np.uint32), chunks=(1024, 1024), overwrite=True)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "objects": int(lab.max()), "labels": out, "columns": len(table)}


JOBS = {"tilefeet": job_tilefeet, "dask-image": job_dask_image, "scikit-image": job_skimage}


def run_job(name: str, store: Path, work: Path, timeout: float | None = None, stack: bool = False) -> dict:
    """One job in a fresh process: its result plus its peak RSS; a job past ``timeout`` seconds is
    stopped and reported as unfinished (its time is then a lower bound)."""
    out = work / f"{name}-labels{'-3d' if stack else ''}.zarr"
    try:
        r = subprocess.run([sys.executable, __file__, "--job", name, "--store", str(store), "--out", str(out), *(["--stack"] if stack else [])],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": float(timeout or 0), "finished": False, "objects": None, "peak_rss_mb": None, "labels": None}
    if r.returncode != 0:
        raise RuntimeError(f"job {name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _child(name: str, store: str, out: str, stack: bool = False) -> None:
    result = (JOBS3 if stack else JOBS)[name](store, out)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux keeps ``ru_maxrss`` across ``execve``, so a job
    started by a parent that had imported torch would report at least the parent's size; the
    kernel's high-water mark of this process's own memory (``VmHWM``) starts afresh at exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_equal(results: dict[str, dict]) -> None:
    """Every label image equals every other, block by block (ids included)."""
    import zarr

    arrays = {k: zarr.open_array(v["labels"], mode="r") for k, v in results.items()}
    names = list(arrays)
    shape = arrays[names[0]].shape[-2:]
    for y in range(0, shape[0], BLOCK):
        for x in range(0, shape[1], BLOCK):
            ref = np.asarray(arrays[names[0]][..., y : y + BLOCK, x : x + BLOCK])
            for other in names[1:]:
                got = np.asarray(arrays[other][..., y : y + BLOCK, x : x + BLOCK])
                if not np.array_equal(ref.reshape(got.shape), got):
                    raise SystemExit(f"label images differ: {names[0]} and {other} at y {y}, x {x}")


def benchmark(sizes: list[int], only: list[str], work: Path, timeout: float | None = None) -> list[dict]:
    from tilefeet.bench import device_name

    reports = []
    for size in sizes:
        store = make_store(work / f"mito-{size}.ome.zarr", size)
        mpx = size * size / 1e6
        results = {}
        for name in only:
            r = run_job(name, store, work, timeout)
            r["mpx_per_s"] = mpx / r["seconds"]
            results[name] = r
            if r.get("finished", True):
                print(f"  {size}²  {name:14s} {r['seconds']:8.1f} s  {r['mpx_per_s']:7.2f} Mpx/s  peak {r['peak_rss_mb']:7.0f} MB  "
                      f"{r['objects']} objects", flush=True)
            else:
                print(f"  {size}²  {name:14s} did not finish in {r['seconds']:.0f} s (< {r['mpx_per_s']:.3f} Mpx/s)", flush=True)
        check_equal({k: v for k, v in results.items() if v.get("finished", True)})
        report: dict[str, Any] = {"size": size, "megapixels": mpx, "device": device_name("cpu"), "block": BLOCK,
                                  "cpu_count": os.cpu_count(), "results": results}
        if "tilefeet" in results:
            t = results["tilefeet"]
            report["ratios"] = {
                name: {"speed": t["mpx_per_s"] / r["mpx_per_s"],
                       "speed_is_lower_bound": not r.get("finished", True),
                       "memory": t["peak_rss_mb"] / r["peak_rss_mb"] if r.get("peak_rss_mb") else None}
                for name, r in results.items() if name != "tilefeet"
            }
            for name, ratio in report["ratios"].items():
                if ratio["speed_is_lower_bound"]:
                    print(f"  tilefeet is more than {ratio['speed']:.1f}× as fast as {name} (which did not finish)")
                else:
                    print(f"  tilefeet is {ratio['speed']:.2f}× as fast as {name}, with {ratio['memory']:.2f}× its peak memory")
        reports.append(report)
    return reports


# ---------------------------------------------------------------------------------------- stacks

STACK_SPACING = (50.0, PIXEL_NM, PIXEL_NM)
STACK_BLOCK = (16, 1024, 1024)


def lucchi_test_masks() -> list[np.ndarray]:
    import imageio.v3 as iio

    paths = sorted((LUCCHI / "test" / "mitochondrion").glob("*.png"))
    if not paths:
        raise SystemExit(f"no Lucchi test masks under {LUCCHI / 'test' / 'mitochondrion'}; give the shared data folder")
    return [iio.imread(p) > 127 for p in paths]


def stack_section(masks: list[np.ndarray], z: int) -> int:
    """The test slice of section ``z``: 0 1 2 3 4 3 2 1 0 1 ... (mirrored, so objects continue)."""
    n = len(masks)
    period = 2 * (n - 1)
    k = z % period
    return k if k < n else period - k


def make_stack_store(path: Path, depth: int, size: int, chunk: int = 1024) -> Path:
    """A stack segment output (c, z, y, x) of ``depth`` × ``size``² voxels whose mask is the mirrored Lucchi test stack."""
    import zarr

    from tilefeet.ngff import compressor, multiscales, pyramid_shapes

    if (path / ".complete").exists():
        return path
    masks = lucchi_test_masks()
    shapes = pyramid_shapes((size, size), (chunk, chunk))
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    lab = root.create_group("labels")
    lab.attrs["ome"] = {"version": "0.5", "labels": ["mitochondrion"]}
    mito = lab.create_group("mitochondrion")
    for k, (h, w) in enumerate(shapes):
        c = (min(chunk, h), min(chunk, w))
        root.create_array(str(k), shape=(1, depth, h, w), chunks=(1, 1, *c), dtype="uint8", compressors=compressor(), fill_value=0,
                          dimension_names=["c", "z", "y", "x"])
        mito.create_array(str(k), shape=(depth, h, w), chunks=(1, *c), dtype="uint8", compressors=compressor(), fill_value=0,
                          dimension_names=["z", "y", "x"])
    tex = ((np.arange(size)[:, None] * 7 + np.arange(size)[None, :] * 13) % 32).astype(np.uint8)
    for z in range(depth):
        m = mito_block([masks[stack_section(masks, z)]], 0, 0, size, size)
        prob = np.where(m, 200 + tex, 10 + tex).astype(np.uint8)
        for k in range(len(shapes)):
            f = 2**k
            root[str(k)][0, z] = prob[::f, ::f]
            mito[str(k)][z] = m[::f, ::f].astype(np.uint8)
    z_axis = {"name": "z", "type": "space", "unit": "nanometer"}
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [multiscales("probabilities", STACK_SPACING[1:], len(shapes), lead_axes=[{"name": "c", "type": "channel"}, z_axis],
                                    lead_scale=[1.0, STACK_SPACING[0]],
                                    metadata={"method": "bench_objects --stack", "settings": {"threshold": 0.5, "output_dtype": "uint8"}})],
        "omero": {"channels": [{"label": "mitochondrion", "color": "FFFFFF"}]},
    }
    mito.attrs["ome"] = {"version": "0.5", "multiscales": [multiscales("mitochondrion", STACK_SPACING[1:], len(shapes), lead_axes=[z_axis],
                                                                       lead_scale=[STACK_SPACING[0]])],
                         "image-label": {"version": "0.5", "source": {"image": "../../"}}}
    (path / ".complete").touch()
    return path


def _write_labels(out: str, lab: np.ndarray) -> None:
    import zarr

    zarr.create_array(out, data=lab.astype(np.uint32, copy=False), chunks=(1, 1024, 1024), overwrite=True)


def job3_tilefeet(store: str, out: str) -> dict:
    import dask  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401
    import zarr  # noqa: F401

    from tilefeet.objects import write_objects

    t0 = time.perf_counter()
    r = write_objects(store, block_size=STACK_BLOCK, blocks_in_flight=2, overwrite=True)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "objects": r.n_objects, "labels": str(r.path / "0"), "columns": len(r.table().columns)}


def job3_cc3d(store: str, out: str) -> dict:
    import cc3d
    import zarr

    t0 = time.perf_counter()
    mask = np.asarray(zarr.open_array(os.path.join(store, "labels", "mitochondrion", "0"), mode="r")[:]) != 0
    lab = cc3d.connected_components(mask, connectivity=26)
    stats = cc3d.statistics(lab)
    _write_labels(out, lab)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "objects": int(lab.max()), "labels": out, "columns": len(stats)}


def job3_skimage(store: str, out: str) -> dict:
    import zarr
    from skimage.measure import label, regionprops_table

    t0 = time.perf_counter()
    root = zarr.open_group(store, mode="r")
    mask = np.asarray(root["labels/mitochondrion/0"][:]) != 0
    prob = np.asarray(root["0"][0])
    lab = label(mask, connectivity=3)
    props = ["label", "area", "centroid", "bbox", "intensity_mean", "intensity_max"]
    table = regionprops_table(lab, intensity_image=prob, spacing=STACK_SPACING, properties=props)
    _write_labels(out, lab)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "objects": int(lab.max()), "labels": out, "columns": len(table)}


def job3_dask_image(store: str, out: str) -> dict:
    import dask
    import dask.array as da
    import zarr  # noqa: F401
    from dask_image import ndmeasure

    t0 = time.perf_counter()
    mask = da.from_zarr(os.path.join(store, "labels", "mitochondrion", "0")).rechunk(STACK_BLOCK) != 0
    labels, n = ndmeasure.label(mask, structure=np.ones((3, 3, 3), bool))
    labels.astype(np.uint32).rechunk((1, 1024, 1024)).to_zarr(out, overwrite=True)
    n = int(n)
    lab = da.from_zarr(out)
    index = np.arange(1, n + 1)
    dask.compute(ndmeasure.area(mask, lab, index), ndmeasure.center_of_mass(mask, lab, index))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "objects": n, "labels": out, "columns": 1 + 1 + 3}


JOBS3 = {"tilefeet": job3_tilefeet, "cc3d": job3_cc3d, "scikit-image": job3_skimage, "dask-image": job3_dask_image}


def check_equal_3d(results: dict[str, dict]) -> dict[str, bool]:
    """Each label image against tilefeet's (or the first), section by section: equal, ids included."""
    import zarr

    arrays = {k: zarr.open_array(v["labels"], mode="r") for k, v in results.items()}
    names = list(arrays)
    ref = arrays[names[0]]
    same = dict.fromkeys(names[1:], True)
    for z in range(ref.shape[0]):
        want = np.asarray(ref[z])
        for other in names[1:]:
            if same[other] and not np.array_equal(want, np.asarray(arrays[other][z])):
                same[other] = False
                print(f"  label images differ: {names[0]} and {other} in section {z}", flush=True)
    return same


def benchmark_stack(depth: int, size: int, only: list[str], work: Path, timeout: float | None = None) -> dict:
    from tilefeet.bench import device_name

    store = make_stack_store(work / f"mito-stack-{depth}x{size}.ome.zarr", depth, size)
    mvox = depth * size * size / 1e6
    results = {}
    for name in only:
        r = run_job(name, store, work, timeout, stack=True)
        r["mvoxels_per_s"] = mvox / r["seconds"]
        results[name] = r
        if r.get("finished", True):
            print(f"  {depth}×{size}²  {name:14s} {r['seconds']:8.1f} s  {r['mvoxels_per_s']:7.2f} Mvoxel/s  peak {r['peak_rss_mb']:7.0f} MB  "
                  f"{r['objects']} objects", flush=True)
        else:
            print(f"  {depth}×{size}²  {name:14s} did not finish in {r['seconds']:.0f} s", flush=True)
    finished = {k: v for k, v in results.items() if v.get("finished", True)}
    same = check_equal_3d(finished)
    report: dict[str, Any] = {"depth": depth, "size": size, "megavoxels": mvox, "spacing_nm": STACK_SPACING, "block": STACK_BLOCK,
                              "connectivity": 26, "device": device_name("cpu"), "cpu_count": os.cpu_count(), "results": results,
                              "ids_equal_to_" + next(iter(finished)): same}
    if "tilefeet" in results:
        t = results["tilefeet"]
        report["ratios"] = {
            name: {"speed": t["mvoxels_per_s"] / r["mvoxels_per_s"], "speed_is_lower_bound": not r.get("finished", True),
                   "memory": t["peak_rss_mb"] / r["peak_rss_mb"] if r.get("peak_rss_mb") else None}
            for name, r in results.items() if name != "tilefeet"
        }
        for name, ratio in report["ratios"].items():
            mem = f", with {ratio['memory']:.2f}× its peak memory" if ratio["memory"] else ""
            print(f"  tilefeet is {ratio['speed']:.2f}× as fast as {name}{mem}")
    return report


# ---------------------------------------------------------------------------------- lucchi-mito


def lucchi_scores(work: Path) -> dict:
    """lucchi-mito's objects on each held-out test slice (segmented alone), scored against the
    truth's objects; counts summed over the slices (micro averages)."""
    from tilefeet.cli import main as tf

    per_slice = {}
    for name in TEST_SLICES:
        d = work / "lucchi" / name
        d.mkdir(parents=True, exist_ok=True)
        src, pred = d / "s.ome.zarr", d / "p.ome.zarr"
        if not (src / "labels" / "mitochondrion").exists():
            assert tf(["-q", "convert", str(LUCCHI / "test" / "slices" / f"{name}.png"), str(src), "--pixel-size", "5nm", "--overwrite"]) == 0
            assert tf(["-q", "convert", str(LUCCHI / "test" / "mitochondrion" / f"{name}.png"), str(src), "--labels", "mitochondrion"]) == 0
        if not (pred / "labels" / "mitochondrion").exists():
            assert tf(["-q", "segment", str(src), str(pred), "-e", "lucchi-mito", "--intensity", "bundle", "--overwrite"]) == 0
        per_slice[name] = {}
        for variant, opts in (("components", ["--min-size", "0", "--no-fill-holes"]),
                              ("min-size 0.01 µm², holes filled", ["--min-size", "0.01um2", "--fill-holes"])):
            assert tf(["-q", "objects", str(pred), "--overwrite", *opts]) == 0
            out = subprocess.run([sys.executable, "-c", "import sys; from tilefeet.cli import main; sys.exit(main())", "evaluate",
                                  str(pred), str(src / "labels" / "mitochondrion"), "--objects", "--json"],
                                 capture_output=True, text=True, check=True).stdout
            per_slice[name][variant] = json.loads(out)["objects"]
    summary = {}
    for variant in per_slice[TEST_SLICES[0]]:
        rows = [per_slice[s][variant] for s in TEST_SLICES]
        n_true = sum(r["true_objects"] for r in rows)
        n_pred = sum(r["predicted_objects"] for r in rows)
        matches = np.sum([r["matches"] for r in rows], axis=0)
        iou_sum = sum((r["mean_matched_iou"] or 0.0) * r["matches"][0] for r in rows)
        ap = [m / (n_true + n_pred - m) for m in matches]
        summary[variant] = {
            "true_objects": n_true, "predicted_objects": n_pred, "matches": [int(m) for m in matches],
            "precision": matches[0] / n_pred, "recall": matches[0] / n_true, "f1": 2 * matches[0] / (n_true + n_pred),
            "mean_matched_iou": iou_sum / matches[0], "ap50": ap[0], "ap75": ap[5], "ap": float(np.mean(ap)),
        }
        s = summary[variant]
        print(f"  {variant:34s} true {n_true}, predicted {n_pred}: P {s['precision']:.4f} R {s['recall']:.4f} F1 {s['f1']:.4f} "
              f"mean IoU {s['mean_matched_iou']:.4f}  AP50 {s['ap50']:.4f} AP75 {s['ap75']:.4f} AP {s['ap']:.4f}")
    return {"engine": "lucchi-mito", "slices": list(TEST_SLICES), "protocol": (
        "each test slice converted alone (5 nm), segmented with lucchi-mito (intensity bundle, threshold 0.5), "
        "tilefeet objects, tilefeet evaluate --objects against the 8-connected components of the truth mask; "
        "counts summed over the slices"), "summary": summary, "per_slice": per_slice}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, action="append", help="section side (repeatable; default 8192)")
    ap.add_argument("--only", action="append", choices=sorted(set(JOBS) | set(JOBS3)), help="jobs to run (default: all)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-work").resolve())
    ap.add_argument("--timeout", type=float, default=None, help="stop a job after this many seconds (reported as a lower bound)")
    ap.add_argument("--lucchi", action="store_true", help="score lucchi-mito's objects on the held-out Lucchi slices")
    ap.add_argument("--stack", action="store_true", help="3-D objects of a stack: tilefeet, cc3d, scikit-image, dask-image")
    ap.add_argument("--depth", type=int, default=64, help="--stack: sections (default 64)")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.job:
        _child(a.job, a.store, a.out, a.stack)
        return 0
    a.workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    if a.lucchi:
        report = lucchi_scores(a.workdir)
        (RESULTS / "objects-lucchi-mito.json").write_text(json.dumps(report, indent=1))
        return 0
    from tilefeet.bench import device_name

    slug = re.sub(r"-\d+-cores$", "", re.sub(r"[^a-z0-9]+", "-", device_name("cpu").lower()).strip("-"))
    if a.stack:
        size = (a.size or [2048])[0]
        only3 = [j for j in (a.only or list(JOBS3)) if j in JOBS3]
        report = benchmark_stack(a.depth, size, only3, a.workdir, a.timeout)
        out = RESULTS / f"objects3d-{slug}-{a.depth}x{size}.json"
        out.write_text(json.dumps({"note": "2 CPU cores shared with other jobs (run under nice)", "runs": [report]}, indent=1))
        print(f"wrote {out}")
        return 0
    sizes = a.size or [8192]
    only = a.only or list(JOBS)
    reports = benchmark(sizes, only, a.workdir, a.timeout)
    slug = re.sub(r"-\d+-cores$", "", re.sub(r"[^a-z0-9]+", "-", device_name("cpu").lower()).strip("-"))
    name = "-".join(str(s) for s in sizes) + ("" if only == list(JOBS) else "-" + "-".join(only))
    out = RESULTS / f"objects-{slug}-{name}.json"
    out.write_text(json.dumps({"note": "2 CPU cores shared with other jobs (run under nice)", "runs": reports}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
