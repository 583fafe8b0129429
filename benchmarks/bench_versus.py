"""tilefeet's default end to end against an earlier commit's default, on the same section, alternating.

    python benchmarks/bench_versus.py --against f179aa8 --size 8192 --repeats 3

The earlier commit is extracted with ``git archive`` into a temporary folder (the repository is not
touched) and imported from there (``PYTHONPATH``). Each run is ``segment_to_zarr`` with default
options in a fresh process (``tilefeet bench``'s job: libraries imported before the clock), the two
versions alternating, so a change of the machine's load falls on both alike; the 1-minute load
average is recorded at each start, and the median run of each version is compared. Both versions
decide their backend (and the new one its precision, with the accuracy guard) once before any timed
run (a dry run), as ``tilefeet bench`` does: those choices are cached, one-time costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job(tree: Path | None, section: Path, out: Path, engine: str, options: dict | None = None) -> dict:
    payload = json.dumps({"job": "tilefeet", "section": str(section), "out": str(out), "engine": engine, "options": options or {}, "extra": {}})
    code = (
        "import json, sys; from tilefeet.bench import _worker, peak_rss_mb; r = _worker(sys.argv[1]); "
        "r['peak_rss_mb'] = peak_rss_mb(); print('RESULT' + json.dumps(r))"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else dict(os.environ)
    env.pop("TILEFEET_PRECISION", None)
    env.pop("TILEFEET_BACKEND", None)
    # cwd: ``python -c`` puts the working folder first on sys.path, before PYTHONPATH
    proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, env=env, cwd=tree or ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT") :])


def dry_run(tree: Path | None, section: Path, engine: str, options: dict | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else dict(os.environ)
    env.pop("TILEFEET_PRECISION", None)
    env.pop("TILEFEET_BACKEND", None)
    code = ("import json, sys, tilefeet; print(tilefeet.__file__); "
            "print(tilefeet.plan_segmentation(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3])).describe())")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, str(section), engine, json.dumps(options or {})], capture_output=True, text=True,
        env=env, cwd=tree or ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    lines = proc.stdout.splitlines()
    if not lines[0].startswith(str(tree or ROOT)):
        raise RuntimeError(f"imported tilefeet from {lines[0]}, not from {tree or ROOT}")
    return next((ln for ln in lines if ln.startswith("backend")), "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", required=True, help="the earlier commit (its default is the baseline)")
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine", default="isbi-membrane")
    p.add_argument("--workdir", type=Path, default=Path("bench-work"))
    p.add_argument("--out", type=Path, default=None, help="JSON report (default: benchmarks/results/versus-<commit>-<size>.json)")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE,...",
                   help="also time the working tree with these options (e.g. precision=int8,backend=openvino), alternating too")
    a = p.parse_args(argv)
    from tilefeet.bench import device_name, make_section

    a.workdir = a.workdir.absolute()  # the earlier commit's processes run in its own folder
    a.workdir.mkdir(parents=True, exist_ok=True)
    section = make_section(a.workdir / f"texture-{a.size}.ome.zarr", a.size)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.against], capture_output=True, text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    out_path = a.out or ROOT / "benchmarks" / "results" / f"versus-{commit}-{a.size}.json"
    with tempfile.TemporaryDirectory(prefix="tilefeet-old-") as tmp:
        old = Path(tmp)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees: dict[str, tuple[Path | None, dict]] = {f"default at {commit}": (old, {}), f"default at {head} (working tree)": (None, {})}
        for v in a.variant:
            options = dict(kv.split("=", 1) for kv in v.split(","))
            trees[f"{v} at {head} (working tree)"] = (None, options)
        report: dict = {
            "device": device_name("cpu"), "size": a.size, "megapixels": a.size**2 / 1e6, "engine": a.engine, "repeats": a.repeats,
            "backend_lines": {name: dry_run(tree, section, a.engine, o) for name, (tree, o) in trees.items()}, "runs": {n: [] for n in trees},
        }
        for name, line in report["backend_lines"].items():
            print(f"{name}: {line}", flush=True)
        for r in range(a.repeats):
            for name, (tree, options) in trees.items():
                load = os.getloadavg()[0]
                t0 = time.time()
                result = job(tree, section, a.workdir / "out-versus.zarr", a.engine, options)
                result.update(load_at_start=load, started=t0)
                report["runs"][name].append(result)
                print(f"repeat {r + 1} {name}: {result['seconds']:.1f} s (load {load:.1f})", flush=True)
        medians = {n: statistics.median(x["seconds"] for x in runs) for n, runs in report["runs"].items()}
        old_name, new_name, *variants = list(trees)
        report["median_seconds"] = medians
        report["speedup"] = medians[old_name] / medians[new_name]
        report["speedups"] = {n: medians[old_name] / medians[n] for n in [new_name, *variants]}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1) + "\n")
    for n in [new_name, *variants]:
        print(f"median {old_name}: {medians[old_name]:.1f} s; {n}: {medians[n]:.1f} s; speed-up {report['speedups'][n]:.2f}x")
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
