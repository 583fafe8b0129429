"""Output bits held across refactoring: a few runs' arrays hashed once, compared on every run.

Hashes are of array values (not of the store's bytes or layout), recorded with the CPU model,
torch version and thread count they came from: oneDNN's rounding depends on all three, so on
another machine the comparison is skipped with that reason instead of failing on rounding.
Regenerate (only when a change of bits is intended, and say why in the commit):
``python -m tests.test_golden``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "data" / "golden.json"

CASES = {
    "gaussian-uint8": dict(block_size=512, chunk_size=256),
    "crop-float32-5nm": dict(block_size=256, chunk_size=256, blend="crop", overlap=96, output_dtype="float32", pixel_size_nm="5nm"),
    "cosine-float16-network-grid": dict(block_size=512, chunk_size=128, blend="cosine", output_dtype="float16",
                                        pixel_size_nm="3nm,5nm", output_grid="network"),
}


def environment() -> dict:
    import torch

    from tilefeet.runners.select import cpu_model

    return {"cpu": cpu_model(), "torch": str(torch.__version__), "threads": 1}


def arrays_digest(path: Path) -> dict[str, str]:
    """sha256 of every array's values (shape and dtype included) in a store, by path."""
    import zarr

    out = {}
    root = zarr.open_group(str(path), mode="r")
    for name, arr in sorted(root.arrays()):
        out[name] = _digest(np.asarray(arr[...]))
    for group_name, group in sorted(root.groups()):
        for sub_name, sub in sorted(group.groups()):
            for name, arr in sorted(sub.arrays()):
                a = np.asarray(arr[...])
                out[f"{group_name}/{sub_name}/{name}"] = _digest(a.reshape(a.shape[-2:]) if a.ndim == 3 and a.shape[0] == 1 else a)
    return out


def _digest(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.shape}{a.dtype.str}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def run_case(tmp: Path, name: str) -> dict[str, str]:
    import tilefeet
    from tilefeet.convert import write_image

    from .conftest import isbi_montage, make_random_engine

    engine = make_random_engine(tmp / "golden-engine")
    img = isbi_montage(2, 3)[0][:700, :900]
    src = tmp / "golden.ome.zarr"
    if not src.exists():
        write_image(img, src, (4.0, 4.0), chunk=256)
    out = tmp / f"{name}.ome.zarr"
    tilefeet.segment_to_zarr(src, out, engine, backend="torch", threads=1, **CASES[name])
    return arrays_digest(out)


@pytest.mark.filterwarnings("ignore::tilefeet.plan.SeamWarning")  # the crop case's overlap is below the receptive field on purpose
@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_keep_their_bits(tmp_path, name):
    doc = json.loads(GOLDEN.read_text())
    if doc["environment"] != environment():
        pytest.skip(f"hashes were recorded on {doc['environment']}, this is {environment()}")
    assert run_case(tmp_path, name) == doc["cases"][name]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cases = {name: run_case(Path(d), name) for name in sorted(CASES)}
    GOLDEN.write_text(json.dumps({"environment": environment(), "cases": cases}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
