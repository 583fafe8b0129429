"""tilefeet inside a dask.distributed job: segment a section on a cluster, then use the result lazily.

Starts a LocalCluster with worker processes (replace it with your scheduler's address), writes a
section of real EM texture, and

1. writes the segmentation with ``segment_to_zarr(..., compute=False)``: one Delayed whose tasks
   carry the plan and a small runner spec (never a model); each worker builds its runner once;
2. composes the lazy form, ``tilefeet.segment``, into a larger graph (the membrane fraction per
   1024² block) without writing anything.

    python examples/dask_cluster.py                       # 4096² section, 2 workers
    python examples/dask_cluster.py --size 8192 --workers 4 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="section side in pixels")
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    ap.add_argument("--threads", type=int, default=1, help="network threads per worker (keep equal everywhere for bit-identity)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from dask.distributed import Client, LocalCluster

    import tilefeet
    from tilefeet.convert import write_image
    from tilefeet.sample import texture_section

    work = args.workdir or Path(tempfile.mkdtemp(prefix="tilefeet-dask-"))
    section = write_image(texture_section(args.size), work / "section.ome.zarr", (4.0, 4.0), overwrite=True, progress=False)

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        print(f"cluster: {client.dashboard_link}")

        t0 = time.perf_counter()
        job = tilefeet.segment_to_zarr(section, work / "seg.ome.zarr", engine="isbi-membrane", block_size=2048,
                                       threads=args.threads, overwrite=True, compute=False)
        out = client.compute(job).result()
        dt = time.perf_counter() - t0
        print(f"wrote {out} in {dt:.1f} s ({args.size**2 / dt / 1e6:.2f} Mpx/s on {args.workers} workers)")

        probs = tilefeet.segment(str(section), engine="isbi-membrane", block_size=2048, threads=args.threads)
        membrane = probs.sel(c="membrane").data >= 0.5  # a dask array: nothing has run yet
        fractions = membrane.map_blocks(lambda b: np.atleast_2d(b.mean()), chunks=(1, 1), dtype=float)
        fractions = client.compute(fractions).result()
        print("membrane fraction per 2048² block:")
        print(np.array2string(fractions, precision=3))


if __name__ == "__main__":
    main()
