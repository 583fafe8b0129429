"""Stack benchmark: a stack of sections segmented in one run against the same sections segmented one
at a time, in one process, interleaved; and the peak memory of a stack 4× deeper (memory must not
grow with the number of sections).

    python benchmarks/bench_stack.py                       # 6 sections of 2048², isbi-membrane
    python benchmarks/bench_stack.py --size 4096 --depth 8

Prints seconds per section both ways and their ratio (≈ 1: a stack costs what its sections cost),
and peak RSS (each case in a fresh subprocess). Writes ``benchmarks/results/stack-<device>-<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def stack(size: int, depth: int) -> np.ndarray:
    """``depth`` sections of mirror-tiled real EM texture (each shifted, so sections differ)."""
    from tilefeet.sample import texture_section

    base = np.asarray(texture_section(size + 8 * depth))
    return np.stack([base[4 * k : 4 * k + size, 8 * k : 8 * k + size] for k in range(depth)])


def _run(src: str, out: str, engine: str, extra: dict) -> float:
    import tilefeet

    t0 = time.perf_counter()
    tilefeet.segment_to_zarr(src, out, engine, overwrite=True, **extra)
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    """One measured case in this (fresh) process: prints JSON with seconds and peak RSS."""
    import resource

    import tilefeet

    tilefeet.plan_segmentation(args.src, args.engine, z_range="0:1")  # imports, backend choice
    seconds = _run(args.src, args.out, args.engine, {})
    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--engine", default="isbi-membrane")
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--case", default="", help=argparse.SUPPRESS)
    ap.add_argument("--src", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        return child(args)

    import tilefeet
    from tilefeet.bench import device_name
    from tilefeet.convert import write_image

    work = args.workdir / "stack"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = stack(args.size, args.depth)
    src = write_image(data, work / "stack.ome.zarr", (4.0, 4.0), chunk=1024, z_spacing_nm=50.0)
    sections = [write_image(data[k], work / f"s{k}.ome.zarr", (4.0, 4.0), chunk=1024) for k in range(args.depth)]
    deep = write_image(np.concatenate([data] * 4), work / "deep.ome.zarr", (4.0, 4.0), chunk=1024, z_spacing_nm=50.0)
    tilefeet.plan_segmentation(sections[0], args.engine)  # libraries imported and the backend measured before any clock

    stack_s, alone_s = [], []
    for _ in range(2):  # interleaved: the machine's load hits both alike
        stack_s.append(_run(str(src), str(work / "out-stack.ome.zarr"), args.engine, {}))
        alone_s.append(sum(_run(str(s), str(work / f"out-{k}.ome.zarr"), args.engine, {}) for k, s in enumerate(sections)))
    per_stack, per_alone = min(stack_s) / args.depth, min(alone_s) / args.depth

    def measured(path: Path, case: str) -> dict:
        cmd = [sys.executable, __file__, "--case", case, "--src", str(path), "--out", str(work / f"mem-{case}.ome.zarr"), "--engine", args.engine]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    mem = {"stack": measured(src, "stack"), "stack_4x_deeper": measured(deep, "deep")}
    result = {
        "device": device_name(),
        "size": args.size,
        "depth": args.depth,
        "engine": args.engine,
        "seconds_per_section_stack": per_stack,
        "seconds_per_section_alone": per_alone,
        "stack_vs_alone": per_stack / per_alone,
        "memory": mem,
        "peak_rss_ratio_4x_deeper": mem["stack_4x_deeper"]["peak_rss_mb"] / mem["stack"]["peak_rss_mb"],
        "load_average": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    print(f"{args.depth} sections of {args.size}²: {per_stack:.2f} s per section as a stack, {per_alone:.2f} s alone "
          f"(stack/alone {result['stack_vs_alone']:.2f})")
    print(f"peak RSS: {mem['stack']['peak_rss_mb']:.0f} MB for {args.depth} sections, {mem['stack_4x_deeper']['peak_rss_mb']:.0f} MB "
          f"for {4 * args.depth} ({result['peak_rss_ratio_4x_deeper']:.2f}×)")
    RESULTS.mkdir(exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "-", f"stack-{device_name()}-{args.size}".lower()).strip("-")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
