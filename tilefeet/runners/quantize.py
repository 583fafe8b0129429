"""int8: an engine's ONNX export quantized for OpenVINO on the CPU (``--precision int8``, or ``auto``
where it is faster and passes the accuracy guard).

    int8_graph(bundle)  ->  Path of a QDQ ONNX graph (int8 weights per output channel, uint8 activations)

The checked fp32 export (:func:`~tilefeet.runners.onnx_export.export_onnx`) is quantized by ONNX
Runtime's own static quantizer (no new dependency), calibrated on the **first half** of the engine's
check slices (:func:`~tilefeet.runners.guard.check_data`: data the engine carries, at its pixel size,
normalized as its training data were), and cached under ``$TILEFEET_CACHE/int8/``, built once per
engine, calibration and library version (concurrent workers wait for one build). OpenVINO reads
the QDQ graph and runs its convolutions in int8 (VNNI, AMX-INT8).

Measured (``benchmarks/bench_int8.py``, isbi-membrane, 2-core AMD EPYC with AVX512_VNNI, scored on
the check slices the calibration did not see): OpenVINO int8 12.9 Mpx/s against 9.4 for OpenVINO
bf16 and 4.2 for ONNX Runtime fp32; membrane F1 0.8059 against fp32's 0.8063; the probabilities move
by up to 0.11 (99th percentile 0.014), four times bf16's change; 0.3 % of the labels change, and
the cells built from them by an adapted Rand error of 0.003. Signed-int8 activations changed 3.4 %
of the labels: activations are uint8. ``--precision auto`` chooses int8 only where it is measured
faster and the accuracy guard (:mod:`.guard`, which bounds the change of labels and objects as
well as F1) passes on the check slices the calibration did not see.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import build_once, cache_dir
from ..errors import ConfigError

#: Bump when the quantization recipe changes, so old graphs are not reused.
FORMAT_VERSION = 1
GRAPH_FILE = "model-int8.onnx"


def calibration_tiles(bundle: Any) -> tuple[np.ndarray, str]:
    """The tiles int8 is calibrated on, ``(N, C, H, W)`` float32, and what they are: the first half
    of the engine's check slices (the second half stays unseen, for scoring)."""
    from .guard import calibration_split, check_data, check_tiles

    data = check_data(bundle)
    halves = None if data is None else calibration_split(data)
    if halves is None:
        raise ConfigError(
            f"--precision int8 calibrates on the engine's check slices and scores on others, and engine {bundle.name!r} "
            f"carries {0 if data is None else len(data.images)} (at least 2 needed): list annotated images under [check] "
            f"in its engine.toml, or use --precision fp32 or bf16"
        )
    first = halves[0]
    tiles, _ = check_tiles(bundle, first, bundle.fixed_tile or (bundle.tile, bundle.tile))
    return tiles.numpy(), first.description


def int8_graph(bundle: Any, *, cache: Path | None = None) -> Path:
    """The int8 QDQ graph of ``bundle`` (see the module docstring), built on first use and cached."""
    from importlib.metadata import version

    from .onnx_export import export_onnx

    fp32 = export_onnx(bundle, "fp32", cache=cache)
    tiles, described = calibration_tiles(bundle)
    doc = {
        "fp32_export": fp32.sha256,
        "calibration": hashlib.sha256(tiles.tobytes()).hexdigest(),
        "onnxruntime": version("onnxruntime"),
        "format": FORMAT_VERSION,
    }
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    folder = (cache or cache_dir()) / "int8" / f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in bundle.name)}-{key[:16]}"

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        try:
            quantize_graph(fp32.path, tmp / GRAPH_FILE, tiles)
        except Exception as e:  # an operator or shape ONNX Runtime's quantizer does not handle: one line, the way out
            why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise ConfigError(
                f"engine {bundle.name!r} could not be quantized to int8 here ({why}); use --precision bf16 or fp32"
            ) from None
        (tmp / "int8.json").write_text(json.dumps({**doc, "calibrated_on": described}, indent=2) + "\n")

    build_once(folder, build)
    return folder / GRAPH_FILE


def quantize_graph(src: Path, out: Path, tiles: np.ndarray, activations: str = "uint8") -> Path:
    """``src`` (an ONNX graph, its weights inline or beside it) quantized into ``out``: QDQ, int8
    weights per output channel, ``activations`` uint8 (what tilefeet runs) or int8, calibrated on
    ``tiles`` (N, C, H, W) float32. Scratch files go beside ``out`` and are removed."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    whole, pre = out.with_name(out.stem + "-whole.onnx"), out.with_name(out.stem + "-pre.onnx")
    onnx.save(onnx.load(str(src)), str(whole))  # weights inline: the pre-processor reads one file
    quant_pre_process(str(whole), str(pre), skip_symbolic_shape=True)
    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: tiles[i : i + 1]} for i in range(tiles.shape[0])])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activations]
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=act,
                    weight_type=QuantType.QInt8)
    whole.unlink()
    pre.unlink()
    return out
