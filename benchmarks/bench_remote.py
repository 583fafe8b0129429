"""Remote storage benchmark: one section segmented from a local folder, from a web server
(``python -m http.server``) and from an S3-compatible server (moto's server mode), and written to a
local folder and to S3, in one run, every server a process on the loopback. Prints each route's
time against local → local (the baseline, same run) and the requests the servers saw: GETs of the
level's chunks (against the count if every tile fetched its own pixels) and PUTs of the output.

    python benchmarks/bench_remote.py                    # 4096², chunks 1024, blocks 2048, isbi-membrane
    python benchmarks/bench_remote.py --engine tiny      # a tiny random U-Net: the storage cost shows

The servers are local and moto keeps objects in memory: the ratios are the cost of going through
HTTP and S3 requests (fsspec, aiohttp, botocore, a Python server), not of a real network.
Writes ``benchmarks/results/remote-<device>-<engine>-<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BUCKET = "bench"


def chunk_gets(server, prefix: str) -> int:
    """GETs the server answered (200) for chunks under ``prefix`` since its mark."""
    return sum(server.gets(prefix).values())


def per_block_and_per_tile(run) -> tuple[int, int | None]:
    """Chunk reads of the blocks (one hull each) and, where the network reads the level's own grid,
    of a reader that fetched every tile's pixels alone (None when the input is resampled)."""
    lv = run.image.meta.levels[run.plan.level]
    ch, cw = lv.chunks

    def chunks(box) -> int:
        return ((box.y1 - 1) // ch - box.y0 // ch + 1) * ((box.x1 - 1) // cw - box.x0 // cw + 1)

    blocks, tiles = 0, 0
    for index in run.plan.blocks:
        geo = run.plan.block(*index)
        blocks += chunks(run.image.hull(run.plan.level, geo.src_box))
        tiles += sum(chunks(run.image.hull(run.plan.level, run.plan.lattice.tile_box(ty, tx))) for ty in geo.tiles[0] for tx in geo.tiles[1])
    return blocks, None if run.plan.resamples_input else tiles


def main() -> None:
    sys.path.insert(0, str(ROOT))
    import s3fs

    import tilefeet
    from tests.servers import start_http_server, start_s3_server
    from tilefeet.bench import device_name
    from tilefeet.convert import write_image
    from tilefeet.sample import texture_section

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=2048)
    ap.add_argument("--engine", default="isbi-membrane", help="an engine bundle, or 'tiny' (a random 8-channel U-Net)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=1, help="runs per route; the fastest counts")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tilefeet-bench-remote-"))
    http = s3 = None
    try:
        engine = args.engine
        if engine == "tiny":
            from tests.conftest import make_random_engine

            engine = make_random_engine(work / "engines" / "tiny", base=8, tile=512, overlap=64).path
        served = work / "served"
        src = write_image(texture_section(args.size), served / "section.ome.zarr", (4.0, 4.0), chunk=args.chunk)
        http = start_http_server(served, work / "http.log")
        s3 = start_s3_server(work / "s3.log")
        opts = {"endpoint_url": s3.url, "key": "bench", "secret": "bench"}
        fs = s3fs.S3FileSystem(**opts, use_listings_cache=False)
        fs.mkdir(BUCKET)
        fs.put(str(src), f"{BUCKET}/section.ome.zarr", recursive=True)
        settings = dict(device=args.device, block_size=args.block_size, chunk_size=args.chunk)
        # A whole untimed run first: libraries imported, the backend chosen, the runner built, the
        # section in the page cache, so that the first route timed pays nothing the others do not.
        tilefeet.write_planned(tilefeet.plan_segmentation(src, engine, **settings), work / "warm-up.ome.zarr")

        routes = {
            "local -> local": (str(src), str(work / "out"), http, "/section.ome.zarr"),
            "http -> local": (f"{http.url}/section.ome.zarr", str(work / "out"), http, "/section.ome.zarr"),
            "s3 -> local": (f"s3://{BUCKET}/section.ome.zarr", str(work / "out"), s3, f"/{BUCKET}/section.ome.zarr"),
            "local -> s3": (str(src), f"s3://{BUCKET}/out", s3, f"/{BUCKET}/section.ome.zarr"),
            "s3 -> s3": (f"s3://{BUCKET}/section.ome.zarr", f"s3://{BUCKET}/out", s3, f"/{BUCKET}/section.ome.zarr"),
        }
        rows: dict[str, dict] = {}
        for name, (source, target, server, prefix) in routes.items():
            best = None
            for i in range(args.repeats):
                out = f"{target}-{name.replace(' ', '').replace('->', '-')}-{i}.ome.zarr"
                level_prefix = f"{prefix}/0/c/"  # texture sections are read at level 0 by 4 nm engines; checked below
                server.mark()
                s3.mark()
                t0 = time.perf_counter()
                run = tilefeet.plan_segmentation(source, engine, storage_options=opts, **settings)
                stats_gets = chunk_gets(server, level_prefix)
                server.mark()
                tilefeet.write_planned(run, tilefeet.storage.output_location(out, opts))
                seconds = time.perf_counter() - t0
                assert run.image.meta.levels[run.plan.level].path == "0", "the benchmark counts chunks of level 0"
                if best is None or seconds < best["seconds"]:
                    blocks, tiles = per_block_and_per_tile(run)
                    puts = Counter(r.method for r in s3.requests()).get("PUT", 0) if target.startswith("s3://") else 0
                    remote = "://" in source
                    best = {
                        "seconds": seconds, "input": source.split(":")[0] if remote else "local",
                        "output": "s3" if target.startswith("s3://") else "local",
                        "chunk_gets_statistics": stats_gets if remote else None,
                        "chunk_gets_blocks": chunk_gets(server, level_prefix) if remote else None,
                        "chunk_reads_by_blocks_expected": blocks, "chunk_reads_if_per_tile": tiles,
                        "s3_puts": puts, "blocks": len(run.plan.blocks), "backend": run.runner.backend,
                    }
            rows[name] = best
        base = rows["local -> local"]["seconds"]
        report = {
            "device": device_name(args.device), "engine": args.engine, "size": args.size, "chunk": args.chunk,
            "block_size": args.block_size, "servers": "loopback: python -m http.server, moto server (objects in memory)",
            "shared_machine": True, "rows": {k: {**v, "ratio_to_local": v["seconds"] / base} for k, v in rows.items()},
        }
        print(f"{args.size}² section, chunks {args.chunk}², blocks {args.block_size}², {args.engine} on {report['device']}")
        print(f"{'route':16s} {'seconds':>8s} {'× local':>8s} {'GETs: stats':>12s} {'blocks':>7s} {'expected':>9s} "
              f"{'if per tile':>12s} {'S3 PUTs':>8s}")
        for name, r in report["rows"].items():
            stats, blocks = ("-", "-") if r["chunk_gets_blocks"] is None else (str(r["chunk_gets_statistics"]), str(r["chunk_gets_blocks"]))
            print(f"{name:16s} {r['seconds']:8.1f} {r['ratio_to_local']:8.2f} {stats:>12s} {blocks:>7s} "
                  f"{r['chunk_reads_by_blocks_expected']:9d} {r['chunk_reads_if_per_tile'] or '-'!s:>12s} {r['s3_puts']:8d}")
        print("GETs: chunks of the level read, as the servers logged them (section statistics, then the blocks); expected: one "
              "read of each block's hull; if per tile: every tile fetching its own pixels")
        slug = re.sub(r"[^a-z0-9]+", "-", f"{report['device']}-{Path(str(args.engine)).name}".lower()).strip("-")
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"remote-{slug}-{args.size}.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}")
    finally:
        for server in (http, s3):
            if server is not None:
                server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
