"""int8 on the CPU: what static quantization of an engine's ONNX export buys, and what it costs.

    python benchmarks/bench_int8.py [--engine isbi-membrane] [--repeats 5] [--threads 2]

The engine's checked fp32 ONNX export (the one the ONNX Runtime and OpenVINO runners read) is
quantized with ONNX Runtime's own static quantizer (no new dependency): QDQ format, int8 weights
per output channel, activations uint8 or int8, calibrated on the **first half** of the engine's
check slices (:mod:`tilefeet.runners.guard`). Scores are on the **other half** only, so the
calibration never sees what is scored. Each runner is OpenVINO or ONNX Runtime on the CPU, 4 tiles
of the engine's tile per call, timed interleaved (every runner once per round, ``--repeats`` rounds,
the best round counts: the build machines are shared).

Reported per runner: Mpx/s and the ratio to ONNX Runtime fp32 (the previous default's runner) and
to OpenVINO bf16 (today's default on a CPU with native bf16); pixel F1 of the labels against the
ground truth, and against fp32's labels (agreement); the largest and the mean probability change
against fp32. Writes ``results/int8-<device>-<engine>.json``.

``--precision int8`` runs the uint8-activation graph on OpenVINO (tilefeet/runners/quantize.py), and
``--precision auto`` does where it is fastest and passes the accuracy guard; the other rows are here
for comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def quantize(src: Path, folder: Path, calibration: np.ndarray, activations: str) -> Path:
    """``src`` quantized by tilefeet's own recipe (:func:`tilefeet.runners.quantize.quantize_graph`), with ``activations``."""
    from tilefeet.runners.quantize import quantize_graph

    return quantize_graph(src, folder / f"int8-{activations}.onnx", calibration, activations)


def ort_runner(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda a: session.run(None, {name: a})[0]


def openvino_runner(path: Path, threads: int, shape: list[int], hint: str) -> Any:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.input(0): shape})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                                                 "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads})
    return lambda a: compiled(a)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="isbi-membrane")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=Path("bench-work") / "int8")
    args = ap.parse_args(argv)

    from tilefeet.engine import load_engine
    from tilefeet.metrics import pixel_metrics
    from tilefeet.runners.guard import CheckData, _stitch, _tiles, check_data
    from tilefeet.runners.onnx_export import export_onnx
    from tilefeet.runners.select import cpu_flags, cpu_model

    bundle = load_engine(args.engine)
    data = check_data(bundle)
    if data is None or len(data.images) < 2:
        print(f"{args.engine} carries fewer than two check slices: nothing to calibrate on and score on apart")
        return 2
    half = len(data.images) // 2
    calib = CheckData(data.images[:half], data.masks[:half], data.class_name, data.description)
    score = CheckData(data.images[half:], data.masks[half:], data.class_name, data.description)
    tile = bundle.fixed_tile or (bundle.tile, bundle.tile)
    calib_tiles, _ = _tiles(bundle, calib, tile)
    tiles, crops = _tiles(bundle, score, tile)
    x = tiles.numpy()
    work = args.work / args.engine
    work.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(bundle, "fp32").path
    graphs = {a: quantize(fp32, work, calib_tiles.numpy(), a) for a in ("uint8", "int8")}

    b = args.batch
    shape = [b, bundle.in_channels, *tile]
    runners = {
        "onnxruntime fp32": ort_runner(fp32, args.threads),
        "openvino fp32": openvino_runner(fp32, args.threads, shape, "f32"),
        "openvino bf16": openvino_runner(fp32, args.threads, shape, "bf16"),
        "onnxruntime int8 (uint8 activations)": ort_runner(graphs["uint8"], args.threads),
        "openvino int8 (uint8 activations)": openvino_runner(graphs["uint8"], args.threads, shape, "f32"),
        "openvino int8 (int8 activations)": openvino_runner(graphs["int8"], args.threads, shape, "f32"),
    }

    def whole(fn: Any) -> np.ndarray:
        n = x.shape[0]
        xx = np.concatenate([x, np.zeros((-n % b, *x.shape[1:]), np.float32)])
        return np.concatenate([fn(xx[i : i + b]) for i in range(0, xx.shape[0], b)])[:n]

    c = list(bundle.classes).index(data.class_name)
    truth = np.concatenate([m.ravel() for m in score.masks])
    probs = {k: _stitch(whole(fn), crops, score) for k, fn in runners.items()}
    ref = probs["onnxruntime fp32"]
    ref_labels = np.concatenate([(a[c] >= 0.5).ravel() for a in ref])

    batch = x[:b] if x.shape[0] >= b else np.concatenate([x] * b)[:b]
    times: dict[str, list[float]] = {k: [] for k in runners}
    loads = []
    for fn in runners.values():
        fn(batch)  # warm
    for _ in range(args.repeats):
        loads.append(Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?")
        for k, fn in runners.items():
            t0 = time.perf_counter()
            fn(batch)
            times[k].append(time.perf_counter() - t0)
    mpx = {k: b * tile[0] * tile[1] / 1e6 / min(v) for k, v in times.items()}

    rows = []
    for k in runners:
        labels = np.concatenate([(a[c] >= 0.5).ravel() for a in probs[k]])
        d = np.concatenate([np.abs(a - r).ravel() for a, r in zip(probs[k], ref)])
        rows.append({
            "runner": k, "mpx_per_s": round(mpx[k], 3),
            "vs_onnxruntime_fp32": round(mpx[k] / mpx["onnxruntime fp32"], 2),
            "vs_openvino_bf16": round(mpx[k] / mpx["openvino bf16"], 2),
            "f1": round(pixel_metrics(labels, truth).f1, 4),
            "agreement_f1_vs_fp32": round(pixel_metrics(labels, ref_labels).f1, 4),
            "max_abs_dp": round(float(d.max()), 4), "mean_abs_dp": round(float(d.mean()), 5),
            "p99_abs_dp": round(float(np.percentile(d, 99)), 4),
        })
    flags = sorted(f for f in cpu_flags() if "vnni" in f or "amx" in f or "bf16" in f)
    report = {
        "device": f"CPU {cpu_model()} ({args.threads} threads)", "cpu_flags": flags, "engine": args.engine,
        "tile": list(tile), "batch": b, "repeats": args.repeats, "load_average_per_round": loads,
        "calibrated_on": f"{data.description}: the first {half} of {len(data.images)}",
        "scored_on": f"{data.description}: the last {len(data.images) - half} (never seen by the calibration)",
        "quantization": "onnxruntime.quantization.quantize_static, QDQ, per-channel int8 weights, MinMax calibration",
        "python": platform.python_version(), "rows": rows,
    }
    print(f"{report['device']}, {args.engine}, batch {b} of {tile[0]}², best of {args.repeats} interleaved rounds "
          f"(load {', '.join(loads)}); calibrated on {report['calibrated_on']}, scored on the rest")
    print(f"{'runner':40s}{'Mpx/s':>8}{'×ORT fp32':>11}{'×OV bf16':>10}{'F1':>8}{'agree':>8}{'max|Δp|':>9}{'p99|Δp|':>9}")
    for r in rows:
        print(f"{r['runner']:40s}{r['mpx_per_s']:8.2f}{r['vs_onnxruntime_fp32']:11.2f}{r['vs_openvino_bf16']:10.2f}"
              f"{r['f1']:8.4f}{r['agreement_f1_vs_fp32']:8.4f}{r['max_abs_dp']:9.3f}{r['p99_abs_dp']:9.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    dev = cpu_model().lower().replace(" ", "-").replace("(", "").replace(")", "")
    path = args.out / f"int8-cpu-{dev}-{args.engine}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
