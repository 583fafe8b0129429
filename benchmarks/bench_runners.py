"""Runner throughput: Mpx/s of every runner and precision available here, on the same tiles.

    python benchmarks/bench_runners.py                      # CPU or GPU, whichever torch sees
    python benchmarks/bench_runners.py --device cpu --tile 256 --batch 1,4
    python benchmarks/bench_runners.py --engine isbi-membrane --seconds 5

For each batch size: build every runner configuration (timed: compiling is part of the price),
warm them up, then time them in turns, one call each per round, for ``--seconds`` per runner (the
device synchronized around each call), and report the median. Alongside: the network's FLOPs per pixel, the achieved TFLOP/s and its fraction
of the device's peak (a dense matrix multiply in the same precision, measured in the same run; the
datasheet peak too for GPUs we know), the ratio to the baseline (torch eager fp32, measured in the
same run), and the relative error against the torch fp32 network. Prints a markdown table and
writes JSON (``benchmarks/results/runners-<device>.json``).

Without ``--engine`` the network is a randomly initialized U-Net of the shipped architecture
(4 levels, 32 base channels): speed does not depend on the weights. ``--engine`` takes any bundle,
tilefeet's own or an imported one (ONNX, torch.export); configurations its network cannot run on
are listed as skipped, and FLOPs per pixel of a foreign network are counted from its ONNX graph.
``--monai basicunet`` builds one: MONAI's ``BasicUNet`` (default features, batch norm, random
weights) exported to ONNX and imported with ``tilefeet import-engine``'s code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tilefeet.engine import Normalization, load_engine, write_bundle
from tilefeet.errors import TilefeetError
from tilefeet.models.unet import UNet2d
from tilefeet.runners import RunnerSpec, runner_class
from tilefeet.runners.onnx_export import export_onnx, reference_output, relative_error
from tilefeet.runners.select import cpu_model, library_versions, unavailable_reason

RESULTS = Path(__file__).parent / "results"

#: Dense datasheet peaks in TFLOP/s (no sparsity), for GPUs we know; matched on the device name.
DATASHEET_TFLOPS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},  # SXM
    "H100 80GB HBM3": {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},  # SXM
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
}


@dataclass(frozen=True)
class Config:
    label: str
    backend: str
    precision: str
    options: tuple[tuple[str, Any], ...] = ()


CPU_CONFIGS = [
    Config("torch eager", "torch", "fp32"),
    Config("torch eager, channels-first", "torch", "fp32", (("channels_last", False),)),
    Config("torch eager", "torch", "bf16"),
    Config("torch.compile", "torch", "fp32", (("compile", True),)),
    Config("onnxruntime", "onnxruntime", "fp32"),
    Config("onnxruntime", "onnxruntime", "fp16"),
    Config("openvino", "openvino", "fp32"),
    Config("openvino", "openvino", "bf16"),
]
GPU_CONFIGS = [
    Config("torch eager", "torch", "fp32"),
    Config("torch eager, TF32", "torch", "fp32", (("tf32", True),)),
    Config("torch eager", "torch", "fp16"),
    Config("torch eager", "torch", "bf16"),
    Config("torch.compile", "torch", "fp32", (("compile", True),)),
    Config("torch.compile", "torch", "fp16", (("compile", True),)),
    Config("torch.compile", "torch", "bf16", (("compile", True),)),
    Config("torch eager + CUDA graph", "torch", "bf16", (("cuda_graphs", True),)),
    Config("torch.compile + CUDA graph", "torch", "bf16", (("compile", True), ("cuda_graphs", True))),
    Config("onnxruntime CUDA", "onnxruntime", "fp32"),
    Config("onnxruntime CUDA", "onnxruntime", "fp16"),
    Config("tensorrt", "tensorrt", "fp32"),
    Config("tensorrt", "tensorrt", "fp16"),
    Config("tensorrt", "tensorrt", "bf16"),
]
BASELINE = ("torch eager", "fp32")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    scratch = Path(tempfile.mkdtemp(prefix="tilefeet-bench-"))
    # (bundle, group): runners of one group run the same network, and share a baseline and reference.
    bundles = [(load_engine(e), load_engine(e).name) for e in args.engine or []]
    if args.monai:
        onnx_bundle, pt2_bundle = monai_bundles(scratch)
        bundles += [(onnx_bundle, "monai-basicunet"), (pt2_bundle, "monai-basicunet")]
    if not bundles:
        bundles = [(random_bundle(scratch), "random-unet32")]
    bundle = bundles[0][0]
    configs = [
        c
        for c in (GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS)
        if not args.only or re.search(args.only, f"{c.label} {c.precision}")
    ]
    if args.threads:
        torch.set_num_threads(args.threads)
        configs = [
            Config(c.label, c.backend, c.precision, (*c.options, ("threads", args.threads)))
            if c.backend == "onnxruntime"
            else c
            for c in configs
        ]
    flops = {name: flops_per_pixel(b) for b, name in bundles}
    load_before = os.getloadavg()
    peaks_before = measured_peaks(device, args.peak_size)
    rows = [
        row for batch in args.batch for row in measure_batch(configs, bundles, device, batch, args.tile, args.seconds)
    ]
    # The peak is measured before and after the runners and the higher kept: on a shared machine
    # one of the two may have been slowed down by other work.
    peaks_after = measured_peaks(device, args.peak_size)
    peaks = {k: max(v, peaks_after[k]) for k, v in peaks_before.items()}
    datasheet = datasheet_peaks(device)
    add_rates(rows, flops, peaks, datasheet)
    add_ratios(rows)
    doc = {
        "device": device_name(device),
        "device_type": device.type,
        "host": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "versions": library_versions(),
        "engine": {
            "name": bundle.name,
            "architecture": dict(bundle.architecture),
            "network": bundle.network,
            "random_weights": not args.engine,
            "flops_per_pixel": flops[bundles[0][1]],
        },
        "engines": [
            {"name": b.name, "group": g, "network": b.network, "architecture": dict(b.architecture), "flops_per_pixel": flops[g]}
            for b, g in bundles
        ],
        "tile": args.tile,
        "seconds_per_measurement": args.seconds,
        "measured_peak_tflops": peaks,
        "datasheet_peak_tflops": datasheet,
        "results": rows,
    }
    suffix = "" if not (args.engine or args.monai) else "-" + "-".join(dict.fromkeys(slug(g) for _, g in bundles))
    out = args.out or RESULTS / f"runners-{slug(device_name(device))}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown_table(doc))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", help="engine bundle name or folder, repeatable (default: a random U-Net, 32 base channels, depth 4)")
    p.add_argument("--monai", choices=["basicunet"], help="benchmark MONAI's BasicUNet, exported to ONNX and imported")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--tile", type=int, default=256, help="tile side (default 256 on the CPU; use 1024 on a GPU)")
    p.add_argument(
        "--batch", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4], help="batch sizes, e.g. 1,4"
    )
    p.add_argument("--seconds", type=float, default=3.0, help="time spent measuring each configuration")
    p.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: torch's default)")
    p.add_argument("--peak-size", type=int, help="side of the matrices whose product measures the peak (default 8192 on a GPU, "
                   "2048 on a CPU; smaller is quicker and lower)")
    p.add_argument("--only", help="regular expression on 'label precision' selecting configurations")
    p.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/runners-<device>.json)")
    return p.parse_args(argv)


def random_bundle(folder: Path):
    torch.manual_seed(0)
    return write_bundle(
        folder / "random-unet32",
        name="random-unet32",
        state_dict=UNet2d(1, 1, 32, 4).state_dict(),
        architecture={"name": "unet2d", "base_channels": 32, "depth": 4},
        pixel_size_nm=(4.0, 4.0),
        classes=("membrane",),
        normalization=Normalization(),
    )


def monai_bundles(folder: Path):
    """MONAI's BasicUNet (default features (32, 32, 64, 128, 256, 32), batch norm, random weights)
    exported to ONNX by torch's dynamo exporter and imported as tilefeet's import-engine does, and
    the same module as a torch.export bundle (``bundle_from_module``): the torch rows run the same
    network, and torch eager on it is what a MONAI user runs, the baseline."""
    from monai.networks.nets import BasicUNet
    from torch.export import Dim

    from tilefeet.engine import Declared, bundle_from_module, import_network

    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, norm="batch").eval()
    path = folder / "basicunet.onnx"
    shapes = {"x": {0: Dim("b", min=1), 2: 16 * Dim("h", min=1), 3: 16 * Dim("w", min=1)}}
    program = torch.onnx.export(net, (torch.zeros(2, 1, 64, 96),), dynamo=True, verbose=False, dynamic_shapes=shapes)
    assert program is not None  # the dynamo exporter returns one
    program.save(str(path))
    declared = Declared.create(pixel_size_nm="4nm", classes="membrane", activation="sigmoid", normalization="meanstd:125,43")
    onnx_bundle = import_network(path, folder / "monai-basicunet", declared, name="monai-basicunet")
    pt2_bundle = bundle_from_module(net, pixel_size_nm="4nm", classes=["membrane"], normalization="meanstd:125,43",
                                    name="monai-basicunet-pt2", cache=folder)
    return onnx_bundle, pt2_bundle


def flops_per_pixel(bundle) -> float:
    """The bundle's FLOPs per pixel; for a torch.export bundle, counted from its ONNX export."""
    flops = bundle.flops_per_pixel()
    if flops != flops and "onnxruntime" in bundle.backends:  # NaN: not recorded at import
        from tilefeet.models.foreign import onnx_flops_per_pixel

        flops = onnx_flops_per_pixel(export_onnx(bundle, "fp32").path)
    return flops


# -------------------------------------------------------------------------------------- measuring


def measure_batch(
    configs: list[Config], bundles: list[tuple[Any, str]], device: torch.device, batch: int, tile: int, seconds: float
) -> list[dict[str, Any]]:
    """One row per configuration and bundle (those whose network runs on the configuration's
    backend) at one batch size. All runners are built and warmed up first, then timed in turns (one
    call each per round) for ``seconds`` × their number: on a machine shared with other work, a slow
    spell then slows every runner alike instead of whichever was timed in it."""
    x = torch.randn(batch, bundles[0][0].in_channels, tile, tile, generator=torch.Generator().manual_seed(0))
    refs: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    live: list[tuple[dict[str, Any], Any, torch.Tensor, list[float]]] = []
    for bundle, group in bundles:
        ref = refs.setdefault(group, reference_output(bundle, x))
        for cfg in configs:
            if cfg.backend not in bundle.backends:
                continue
            row, runner = build_runner(cfg, bundle, device, batch, tile)
            row.update(engine=bundle.name, group=group, network=bundle.network)
            rows.append(row)
            if runner is not None:
                xd = x.to(runner.device)
                y = [runner(xd) for _ in range(2)][-1]  # warm-up: lazy initialization, autotuning
                row["relative_error_vs_torch_fp32"] = relative_error(y, ref)
                live.append((row, runner, xd, []))
    deadline = time.perf_counter() + seconds * len(live)
    rounds = 0
    while live and (rounds < 3 or time.perf_counter() < deadline):
        for _, runner, xd, times in live:
            sync(device)
            t0 = time.perf_counter()
            runner(xd)
            sync(device)
            times.append(time.perf_counter() - t0)
        rounds += 1
    for row, runner, _, times in live:
        t = statistics.median(times)
        row.update(calls=len(times), ms_per_batch=t * 1e3, mpx_per_s=batch * tile * tile / t / 1e6)
        runner.close()
    for row in rows:
        print(f"  {row_text(row)}", file=sys.stderr, flush=True)
    return rows


def build_runner(cfg: Config, bundle, device: torch.device, batch: int, tile: int) -> tuple[dict[str, Any], Any]:
    """The row describing ``cfg`` and its runner, or the row saying why it was skipped and None."""
    row: dict[str, Any] = {
        "label": cfg.label,
        "backend": cfg.backend,
        "precision": cfg.precision,
        "options": dict(cfg.options),
        "batch": batch,
    }
    reason = unavailable_reason(cfg.backend, device)
    if reason:
        return {**row, "skipped": reason}, None
    spec = RunnerSpec(str(bundle.path), cfg.backend, str(device), cfg.precision, batch, (tile, tile), cfg.options)
    t0 = time.perf_counter()
    try:
        runner = runner_class(cfg.backend)(bundle, spec)
    except TilefeetError as e:
        return {**row, "skipped": str(e)}, None
    return {**row, "build_s": round(time.perf_counter() - t0, 3)}, runner


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peaks(device: torch.device, n: int | None = None) -> dict[str, float]:
    """TFLOP/s of a large dense matmul (``n``², default 8192 on a GPU, 2048 on a CPU) per precision,
    on this device, now (the achievable peak)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    kinds = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda":
        kinds.update({"tf32": torch.float32, "fp16": torch.float16})
    peaks = {}
    for kind, dtype in kinds.items():
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        with _matmul_tf32(device, kind == "tf32"):
            best = min(_time(torch.matmul, a, b, device=device) for _ in range(10))
        peaks[kind] = 2 * n**3 / best / 1e12
    if "fp16" not in peaks:
        peaks["fp16"] = peaks["fp32"]  # no fp16 matmul on the CPU: fp16 graphs are judged against fp32
    return peaks


@contextlib.contextmanager
def _matmul_tf32(device: torch.device, on: bool):
    """TF32 for CUDA fp32 matmuls on or off (torch >= 2.9 API, else the legacy flag)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    old = getattr(matmul, attr)
    setattr(matmul, attr, ("tf32" if on else "ieee") if attr == "fp32_precision" else on)
    try:
        yield
    finally:
        setattr(matmul, attr, old)


def _time(fn, *args: Any, device: torch.device) -> float:
    fn(*args)
    sync(device)
    t0 = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - t0


def datasheet_peaks(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)


def device_name(device: torch.device) -> str:
    return f"cuda {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"cpu {cpu_model()}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------------------- report


def add_rates(rows: list[dict[str, Any]], flops: dict[str, float], peaks: dict[str, float], datasheet: dict | None) -> None:
    """TFLOP/s achieved (FLOPs per pixel of each row's network) and its fraction of the measured
    (and datasheet) peak of the same precision."""
    for r in rows:
        if "mpx_per_s" not in r:
            continue
        kind = "tf32" if r["precision"] == "fp32" and r["options"].get("tf32") else r["precision"]
        r["tflops"] = r["mpx_per_s"] * 1e6 * flops[r["group"]] / 1e12
        r["fraction_of_measured_peak"] = r["tflops"] / peaks[kind]
        if datasheet:
            r["fraction_of_datasheet_peak"] = r["tflops"] / datasheet[kind]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed relative to the baseline (torch eager fp32 on the same network) at the same batch size."""
    base = {
        (r["group"], r["batch"]): r["mpx_per_s"]
        for r in rows
        if (r["label"], r["precision"]) == BASELINE and "mpx_per_s" in r
    }
    for r in rows:
        if "mpx_per_s" in r and (r["group"], r["batch"]) in base:
            r["vs_baseline"] = r["mpx_per_s"] / base[r["group"], r["batch"]]


def row_text(r: dict[str, Any]) -> str:
    head = f"{r['label']:30s} {r['precision']:5s} batch {r['batch']}"
    if "skipped" in r:
        return f"{head}  skipped: {r['skipped']}"
    return f"{head}  {r['mpx_per_s']:8.3f} Mpx/s  ({r['ms_per_batch']:.1f} ms/batch, rel. err {r['relative_error_vs_torch_fp32']:.1e})"


def markdown_table(doc: dict[str, Any]) -> str:
    flops = {e["group"]: e["flops_per_pixel"] for e in doc["engines"]}
    threads = doc["host"]["threads"]
    head = (
        f"Device: {doc['device']} ({threads} thread{'s' if threads > 1 else ''}); tile {doc['tile']}²; "
        + ", ".join(f"{g} {f / 1e6:.3f} MFLOP per pixel" for g, f in flops.items())
        + "; peak = dense matmul measured in the same run"
    )
    lines = [
        head,
        "",
        "| network | bundle | runner | precision | batch | Mpx/s | × torch eager fp32 | TFLOP/s | % of peak | rel. error | build s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        where = f"| {r['group']} | {r['network']} "
        if "skipped" in r:
            lines.append(f"{where}| {r['label']} | {r['precision']} | {r['batch']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(
            f"{where}| {r['label']} | {r['precision']} | {r['batch']} | {r['mpx_per_s']:.3f} | {r.get('vs_baseline', float('nan')):.2f} | "
            f"{r['tflops']:.4f} | {100 * r['fraction_of_measured_peak']:.1f} | {r['relative_error_vs_torch_fp32']:.1e} | {r['build_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
