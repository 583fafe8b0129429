"""``tilefeet bench``: end-to-end throughput on a section of real EM texture, with baselines measured
in the same run.

Jobs run in separate processes so each one's peak memory is its own. Every job's clock starts after
its imports and its CUDA context (:func:`start_device`), the process's costs; it includes loading
the network:

``tilefeet``   segment_to_zarr end to end: read OME-Zarr, normalize, tile, run, blend, write
               probabilities + labels + pyramids.
``monai``      MONAI's ``sliding_window_inference`` on the same network, tile, overlap and gaussian
               blending, over the section held in memory (loading the network, reading, inference
               and writing timed; each also separately).
               ``model="plain"`` is the bundle's network as an ``nn.Module`` (what a MONAI user
               runs); ``model="runner"`` is tilefeet's own torch runner (channels-last), which
               isolates the pipeline's share of the difference.
``io``         the raw I/O floor: read every input chunk and write a compressed uint8 array of the
               output's size, nothing else.
``backends``   tilefeet end to end with each backend and precision that runs here (torch, ONNX
               Runtime, OpenVINO; fp32, and bf16 on a CPU that runs it natively).
``pipeline``   tilefeet end to end with a near-free network (a 1-channel, 1-level U-Net with the
               engine's tile, overlap, pixel size and normalization, on torch): the ceiling of
               everything around the network (reading, normalization, tiling, blending, writing
               probabilities, labels and pyramids). The network cannot make tilefeet faster than this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def device_name(device: str = "auto") -> str:
    import torch

    from .runners.select import cpu_model

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {cpu_model()} ({os.cpu_count()} cores)"


def make_section(path: Path, size: int, chunk: int = 1024) -> Path:
    from .convert import write_image
    from .sample import PIXEL_SIZE_NM, texture_section

    if not path.exists():
        write_image(texture_section(size, chunk), path, PIXEL_SIZE_NM, chunk=chunk)
    return path


# ------------------------------------------------------------------------------------- workers


def job_tilefeet(section: str, out: str, engine: str, options: dict) -> dict:
    # Libraries are imported before the clock starts, as the MONAI job imports its own: importing
    # torch and zarr (about 2 s on the build machine) is the same for every job, not pipeline work.
    import ome_zarr_models.v04
    import ome_zarr_models.v05  # noqa: F401
    import torch  # noqa: F401
    import zarr  # noqa: F401

    from . import profile as prof
    from .pipeline import segment_to_zarr
    from .runners import select  # noqa: F401

    options = dict(options)
    stages = options.pop("profile", False)
    if stages:
        prof.enable(sync=False)  # device time of the network by CUDA events: nothing waits
    start_device(options.get("device", "auto"))
    t0 = time.perf_counter()
    segment_to_zarr(section, out, engine, overwrite=True, **options)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"seconds": seconds}
    if stages:
        result["profile"] = prof.PROFILE.report(seconds)
        first = os.environ.get("TILEFEET_BENCH_FIRST_RUN")
        if first:  # a caller that may stop this job during the second run keeps the first's result
            Path(first).write_text(json.dumps(result))
        # A second run charges each stage what it costs: the device waits at every stage boundary.
        prof.enable(sync=True)
        t0 = time.perf_counter()
        segment_to_zarr(section, out, engine, overwrite=True, **options)
        result["stages"] = prof.PROFILE.report(time.perf_counter() - t0)
    return result


def start_device(device: str) -> Any:  # -> torch.device
    """The job's device, with its CUDA context created before the clock starts: like importing
    torch, it is the process's cost, the same for every job, not the work being compared. (MONAI's
    job used to create it untimed, when its model moved to the GPU, and tilefeet's timed.)"""
    import torch

    from .device import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.zeros(1, device=dev)
        torch.cuda.synchronize(dev)
    return dev


def job_monai(section: str, out: str, engine: str, options: dict, model: str = "plain") -> dict:
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from .engine import load_engine
    from .runners import RunnerSpec
    from .runners.torch_runner import TorchRunner

    device = start_device(options.get("device", "auto"))
    t0 = time.perf_counter()  # loading the network is timed, as it is in tilefeet's job
    bundle = load_engine(engine)
    tile, overlap, batch = options.get("tile", bundle.tile), options.get("overlap", bundle.overlap), options.get("batch_size", 4)
    if model == "runner":
        spec = RunnerSpec(str(bundle.path), device=str(device), precision=options.get("precision", "fp32"), batch_size=batch, tile=(tile, tile))
        predictor: Any = TorchRunner(bundle, spec)
    else:
        predictor = bundle.build_model().to(device)
    tl = time.perf_counter()
    raw: Any = zarr.open_array(f"{section}/0", mode="r")[:]
    x = torch.from_numpy(bundle.normalization.to_network(raw.astype(np.float32)))[None, None]
    t1 = time.perf_counter()
    with torch.inference_mode():
        p = sliding_window_inference(
            x, roi_size=(tile, tile), sw_batch_size=batch, predictor=predictor, overlap=overlap / tile,
            mode="gaussian", sigma_scale=0.125, padding_mode="reflect", sw_device=device, device=device,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    q = torch.round(p[0] * 255).clamp(0, 255).to(torch.uint8).cpu().numpy()
    z = zarr.create_array(out, shape=q.shape, chunks=(1, 1024, 1024), dtype="uint8", overwrite=True)
    z[:] = q
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "load_seconds": tl - t0, "read_seconds": t1 - tl, "infer_seconds": t2 - t1, "write_seconds": t3 - t2}


def job_io(section: str, out: str, engine: str, options: dict) -> dict:
    """Read every chunk of the input and write an array of the same size: the I/O floor."""
    import dask.array as da
    import dask.threaded
    import zarr

    from .ngff import compressor

    t0 = time.perf_counter()
    src = da.from_zarr(zarr.open_group(section, mode="r")["0"])
    z: Any = zarr.create_array(out, shape=src.shape, chunks=src.chunksize, dtype="uint8", compressors=compressor(), overwrite=True)
    da.store((src // 2).astype(np.uint8), z, lock=False, scheduler=dask.threaded.get)
    return {"seconds": time.perf_counter() - t0}


def null_engine(engine: str, folder: Path) -> Path:
    """A near-free stand-in for ``engine``: same tile, overlap, pixel size, classes and normalization;
    a 1-channel, 1-level U-Net (random weights: its output is meaningless, its cost is not)."""
    import torch

    from .engine import load_engine, write_bundle
    from .models.unet import UNet2d

    bundle = load_engine(engine)
    torch.manual_seed(0)
    net = UNet2d(bundle.in_channels, len(bundle.classes), 1, 1)
    write_bundle(
        folder, name="null", state_dict=net.state_dict(), architecture={"name": "unet2d", "base_channels": 1, "depth": 1},
        pixel_size_nm=bundle.pixel_size_nm, classes=bundle.classes, normalization=bundle.normalization,
        in_channels=bundle.in_channels, tile=bundle.tile, overlap=bundle.overlap,
        description="tilefeet bench: a near-free network, to time the pipeline around it",
    )
    return folder


JOBS = {"tilefeet": job_tilefeet, "monai": job_monai, "io": job_io}


def run_job(name: str, section: Path, out: Path, engine: str, options: dict, **extra: Any) -> dict:
    """Run one job in a fresh process; returns its timings and peak resident memory (MB)."""
    payload = json.dumps({"job": name, "section": str(section), "out": str(out), "engine": engine, "options": options, "extra": extra})
    code = (
        "import json, sys; from tilefeet.bench import _worker, peak_rss_mb; r = _worker(sys.argv[1]); "
        "r['peak_rss_mb'] = peak_rss_mb(); print('RESULT' + json.dumps(r))"
    )
    proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench job {name} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` belongs to the address space, which ``exec``
    replaces; ``ru_maxrss`` would not do: Linux carries it over from the parent through fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(payload: str) -> dict:
    p = json.loads(payload)
    return JOBS[p["job"]](p["section"], p["out"], p["engine"], p["options"], **p["extra"])


BASELINES = ("io", "pipeline", "backends", "monai", "monai-runner")


def backend_contenders(bundle: Any, device: str = "auto") -> list[tuple[str, str]]:
    """Every ``(backend, precision)`` that runs ``bundle`` on this machine's CPU (fp32 everywhere; bf16
    where the CPU runs it natively; int8 where OpenVINO has it and the engine carries check slices to
    calibrate on): what ``--baseline backends`` times, each as a tilefeet job. Nothing on a GPU
    (``benchmarks/gpu_check.py`` sweeps the GPU's)."""
    from .device import resolve_device
    from .runners.select import AUTO_REDUCED, allowed_backends, int8_unguardable, native_bf16, runnable_on_cpu

    if resolve_device(device).type != "cpu":
        return []
    precisions = ["fp32"] + ([AUTO_REDUCED] if native_bf16() else []) + (["int8"] if int8_unguardable(bundle) is None else [])
    combos, _ = runnable_on_cpu(bundle, precisions, allowed_backends(bundle), None)
    return sorted(combos, key=lambda c: (c[1], c[0]))


def torch_precision(bundle: Any, options: dict, tile: int) -> str:
    """The precision of MONAI's job on tilefeet's torch runner: the run's where torch has it, else
    what ``--precision auto`` chooses for torch (int8 is OpenVINO's only)."""
    precision = str(options.get("precision", "fp32"))
    if precision in ("fp32", "fp16", "bf16"):
        return precision
    from .runners.select import choose

    return choose(bundle, device=options.get("device", "auto"), precision="auto", batch_size=options.get("batch_size", 4),
                  tile=(tile, tile), prefer="torch").precision


def benchmark(
    size: int,
    engine: str,
    workdir: Path,
    *,
    options: dict | None = None,
    baselines: tuple[str, ...] = ("io", "pipeline", "backends", "monai", "monai-runner"),
    repeats: int = 1,
    on_result: Callable[[dict], None] | None = None,
) -> dict:
    """Time tilefeet and the baselines on one ``size²`` section; returns a JSON-ready report.

    Every job runs in a process of its own, tilefeet first, then the baselines in the order given;
    with ``repeats`` > 1 the whole sequence runs again (the contenders alternate, so a change of
    the machine's load falls on all of them alike) and each job reports its median run, with every
    run's seconds and the 1-minute load average when it started. ``backends`` times tilefeet with
    each backend and precision that runs here (:func:`backend_contenders`). ``on_result`` is
    called with the report so far after each job (a script that may be stopped keeps what finished)."""
    import torch

    from . import __version__

    if size < 16:
        from .errors import ConfigError

        raise ConfigError(f"--size {size} is too small to time anything; give a section side of at least 16 px, e.g. --size 4096")
    options = dict(options or {})
    profile = bool(options.pop("profile", False))
    options.setdefault("precision", os.environ.get("TILEFEET_PRECISION") or "auto")
    workdir.mkdir(parents=True, exist_ok=True)
    reason = ""
    from .engine import load_engine

    bundle = load_engine(engine)
    skipped: dict[str, str] = {}
    if "torch" not in bundle.backends:
        # MONAI's sliding window runs a torch module; a network torch cannot run (an ONNX graph) has none.
        for name in ("monai", "monai-runner"):
            if name in baselines:
                skipped[name] = f"the engine's {bundle.network} network has no torch module for MONAI to run"
        baselines = tuple(b for b in baselines if b not in skipped)
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        from .errors import ConfigError

        raise ConfigError(f"unknown baseline(s) {sorted(unknown)}; use {', '.join(BASELINES)}")
    tile = options.get("tile", bundle.tile)
    if "auto" in (options.get("backend", "auto"), options["precision"]):
        # Decide (and build: ONNX export, compiled models, CPU timings, the accuracy guard) before
        # the clock starts; those are one-time costs, cached on disk, not part of segmenting a section.
        from .runners.select import choose

        choice = choose(
            bundle, device=options.get("device", "auto"), precision=options["precision"],
            batch_size=options.get("batch_size", 4), tile=(tile, tile), prefer=options.get("backend", "auto"),
        )
        reason = choice.reason
        options.update(backend=choice.backend, precision=choice.precision, backend_options=[list(kv) for kv in choice.options])
    section = make_section(workdir / f"texture-{size}.ome.zarr", size)
    mpx = size * size / 1e6
    results: dict[str, dict] = {}
    report = {
        "device": device_name(options.get("device", "auto")),
        "tilefeet_version": __version__,
        "torch": torch.__version__,
        "size": size,
        "megapixels": mpx,
        "engine": engine,
        "options": options,
        "backend_reason": reason,
        "flops_per_pixel": bundle.flops_per_pixel(),
        "skipped_baselines": skipped,
        "repeats": repeats,
        "results": results,
    }
    # (name, job, engine, options, extra) of every contender, in the order they run
    jobs: list[tuple[str, str, str, dict, dict]] = [("tilefeet", "tilefeet", engine, options, {})]
    for name in dict.fromkeys(baselines):
        if name == "pipeline":
            null = null_engine(engine, workdir / "null-engine")
            jobs.append(("pipeline", "tilefeet", str(null), {**options, "backend": "torch", "precision": "fp32", "backend_options": []}, {}))
        elif name == "backends":
            for b, p in backend_contenders(bundle, options.get("device", "auto")):
                if (b, p) == (options.get("backend"), options.get("precision")) and not options.get("backend_options"):
                    continue  # the default run is this one
                jobs.append((f"{b} {p}", "tilefeet", engine, {**options, "backend": b, "precision": p, "backend_options": []}, {}))
        elif name == "monai-runner":
            jobs.append((name, "monai", engine, {**options, "precision": torch_precision(bundle, options, tile)}, {"model": "runner"}))
        elif name == "monai":
            jobs.append((name, "monai", engine, options, {"model": "plain"}))
        else:
            jobs.append((name, name, engine, options, {}))
    runs: dict[str, list[dict]] = {}
    for r in range(repeats):
        for name, job, eng, opts, extra in jobs:
            if name == "tilefeet" and profile and r == 0:
                opts = {**opts, "profile": True}
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            out = workdir / f"out-{name.replace(' ', '-')}.zarr"
            result = run_job(job, section, out, eng, opts, **extra)
            result["load_at_start"] = load
            runs.setdefault(name, []).append(result)
            results[name] = _median_run(runs[name], mpx)
            if on_result is not None:
                on_result(report)
    return report


def _median_run(runs: list[dict], mpx: float) -> dict:
    """The median run (the lower middle one for an even count), with every run's seconds and load."""
    ordered = sorted(runs, key=lambda x: x["seconds"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    for extra in ("profile", "stages"):  # the profiled (first) run's stage times, whichever run is the median
        if extra in runs[0] and extra not in mid:
            mid[extra] = runs[0][extra]
    mid["mpx_per_s"] = mpx / mid["seconds"]
    mid["runs_seconds"] = [round(x["seconds"], 3) for x in runs]
    mid["runs_load"] = [x.get("load_at_start") for x in runs]
    return mid


def format_report(report: dict) -> str:
    r = report["results"]
    t = r["tilefeet"]
    repeats = report.get("repeats", 1)
    lines = [
        f"{report['device']} — {report['size']}² section ({report['megapixels']:.1f} Mpx), engine {report['engine']}, "
        f"backend {report['options'].get('backend')} {report['options'].get('precision', '')}"
        + (f" ({report['backend_reason']})" if report.get("backend_reason") else ""),
        *([f"each job run {repeats} times, alternating; the median run shown (load average at each start in the JSON)"] if repeats > 1 else []),
        f"{'job':<18}{'seconds':>10}{'Mpx/s':>10}{'peak MB':>10}   tilefeet speed-up",
    ]
    for name, v in r.items():
        ratio = v["seconds"] / t["seconds"]
        extra = ""
        if "infer_seconds" in v:
            extra = f"   (inference alone {v['infer_seconds']:.1f} s: tilefeet end to end is {v['infer_seconds'] / t['seconds']:.2f}× faster)"
        elif name == "pipeline":
            extra = f"   (everything but the network: {100 * v['seconds'] / t['seconds']:.0f} % of tilefeet's time)"
        lines.append(f"{name:<18}{v['seconds']:>10.2f}{v['mpx_per_s']:>10.2f}{v['peak_rss_mb']:>10.0f}   ×{ratio:.2f}{extra}")
    if "stages" in t:
        busy = t.get("profile", {}).get("device_busy_fraction")
        lines.append("tilefeet by stage (a second run, synchronized at each stage):" + (f" device busy {busy:.0%} of the first run" if busy else ""))
        lines += [f"  {k:<14}{v['seconds']:>9.2f} s  {v['calls']:>6} calls" for k, v in t["stages"]["stages"].items()]
        first = t.get("profile", {}).get("stages", {})
        setup = [f"{k} {first[k]['seconds']:.2f} s" for k in ("plan", "runner", "probe") if k in first]
        if setup:  # the second run finds the runner built and the probe cached: the first one's setup
            lines.append(f"setup before the first block, first run: {', '.join(setup)} (runner and probe within plan)")
    return "\n".join(lines)
