"""tilefeet on SLURM through dask-jobqueue: SLURMCluster submits the workers as batch jobs, then
``tilefeet segment --scheduler ADDRESS`` (the same command as on any dask cluster) runs on them.

    pip install dask-jobqueue "tilefeet[cluster]"
    python examples/slurm_jobqueue.py /shared/section.ome.zarr /shared/out.ome.zarr --jobs 4 --cpus 32 --memory 64GB
    python examples/slurm_jobqueue.py IN OUT --jobs 2 --gpu --queue gpu           # a GPU per job: --gres=gpu:1, GPU=1
    python examples/slurm_jobqueue.py IN OUT --jobs 4 -- --resume --objects       # anything after -- goes to tilefeet segment
    python examples/slurm_jobqueue.py IN OUT --print-job-script                   # the workers' sbatch script, then exit

The scheduler runs in this process (on a login node, or in a small batch job of its own; its
address must be reachable from the compute nodes: ``--interface ib0`` picks the network), and
tilefeet waits for the first worker job to start. A CPU job is ``--processes`` worker processes,
each running one block at a time with ``--cpus / --processes`` threads for the network
(``tilefeet segment --threads``): the same thread count everywhere keeps the output bit-identical
to a local run with that ``--threads``. A GPU job (``--gpu``) is one worker process with one GPU,
declared as the resource ``GPU=1`` that tilefeet's block tasks ask for.

The input, the engine and the output must be on a file system every node mounts at the same path
(or be s3:// URLs): tilefeet asks every worker before any work and refuses in one line otherwise.
If the workers' wall time runs out, run the same command with ``-- --resume``. Not tested on a
real SLURM (tests/test_cluster_cli.py runs the same CLI on a scheduler and workers started with the
``dask`` command on one machine); ``--print-job-script`` shows what would be submitted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="the section or stack (OME-Zarr), on a shared file system or s3://")
    ap.add_argument("output", help="the output OME-Zarr, on a shared file system or s3://")
    ap.add_argument("--jobs", type=int, default=2, help="SLURM jobs (nodes) of workers")
    ap.add_argument("--cpus", type=int, default=16, help="CPUs per job")
    ap.add_argument("--processes", type=int, default=4, help="worker processes per job (each computes one block at a time)")
    ap.add_argument("--memory", default="32GB", help="memory per job")
    ap.add_argument("--gpu", action="store_true", help="one GPU per job, one worker process using it")
    ap.add_argument("--interface", default=None, help="network interface of the scheduler and workers, e.g. ib0")
    ap.add_argument("--queue", default=None, help="partition (#SBATCH -p)")
    ap.add_argument("--account", default=None, help="account (#SBATCH -A)")
    ap.add_argument("--walltime", default="04:00:00", help="wall time of each worker job")
    ap.add_argument("--print-job-script", action="store_true", help="print the workers' batch script and exit")
    args, rest = ap.parse_known_args()
    extra = rest[1:] if rest[:1] == ["--"] else rest

    from dask_jobqueue import SLURMCluster

    processes = 1 if args.gpu else args.processes
    threads = max(1, args.cpus // processes)
    cluster = SLURMCluster(
        cores=processes,  # dask threads: one block task per worker process at a time
        processes=processes,
        job_cpu=args.cpus,  # what SLURM books; the network uses cpus / processes threads in each process
        memory=args.memory,
        queue=args.queue,
        account=args.account,
        walltime=args.walltime,
        interface=args.interface,
        job_extra_directives=["--gres=gpu:1"] if args.gpu else [],
        worker_extra_args=["--resources", "GPU=1"] if args.gpu else [],
    )
    if args.print_job_script:
        print(cluster.job_script())
        cluster.close()
        return 0
    try:
        cluster.scale(jobs=args.jobs)
        command = ["tilefeet", "segment", args.input, args.output, "--scheduler", cluster.scheduler_address]
        command += ["--threads", str(threads)] + (["--resources", "GPU=1"] if args.gpu else []) + extra
        print("+ " + " ".join(command), file=sys.stderr)
        return subprocess.call(command)
    finally:
        cluster.close()  # cancels the worker jobs


if __name__ == "__main__":
    sys.exit(main())
