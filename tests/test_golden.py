"""Output values held across refactoring: three runs on a 700 × 900 piece of the held-out montage
with a random U-Net, compared on every run with what ``tests/data/golden.json`` (and the cell means
in ``tests/data/golden.npz``) recorded.

oneDNN's rounding depends on the CPU model, the torch version and the thread count, so a hash of
the output holds only where it was recorded. Two checks, then:

* **everywhere**: every array's shape and dtype exactly, and level 0 cell by cell (16 × 16 pixels):
  each cell's mean probability within ``PROB_TOL``, and at most ``LABEL_FLIPS`` label pixels changed
  in all (the sum over cells of the change of their label counts). Rounding moves a float32
  probability by about 1e-7, and a float16 or uint8 one by one step at a few pixels (a cell mean by
  at most 2e-5); a label flips only where the probability is within rounding of the threshold.
  What a real change does, and what rounding did, is measured in ``test_outputs_keep_their_values``.
* **on a recorded machine** (CPU model, torch version; one network thread): every array's values,
  bit for bit (sha256, every pyramid level). Other machines skip this one with the reason.

Regenerate, only when a change of values is intended (say why in the commit):
``python -m tests.test_golden`` records this machine's hashes and the cell means and drops other
machines' hashes (they no longer hold). On another kind of CPU, ``python -m tests.test_golden --add``
adds its hashes to the file, after checking that its cell means agree with the recorded ones.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
GOLDEN, CELLS = DATA / "golden.json", DATA / "golden.npz"
CELL = 16  #: pixels per side of the cells whose means are compared everywhere
PROB_TOL = 1e-4  #: largest difference of a cell's mean probability (0..1)
LABEL_FLIPS = 2  #: most label pixels changed in a whole level-0 label image (sum of the cells' count changes)
REGENERATE = "python -m tests.test_golden"

# invert=False: whether the section looks inverted to a *random* network is a coin toss that a CPU's
# rounding could turn (polarity has its own tests); the cases hold the arithmetic of a run.
CASES = {
    "gaussian-uint8": dict(block_size=512, chunk_size=256, invert=False),
    "crop-float32-5nm": dict(block_size=256, chunk_size=256, blend="crop", overlap=96, output_dtype="float32",
                             pixel_size_nm="5nm", invert=False),
    "cosine-float16-network-grid": dict(block_size=512, chunk_size=128, blend="cosine", output_dtype="float16",
                                        pixel_size_nm="3nm,5nm", output_grid="network", invert=False),
}


def environment() -> dict:
    """What the hashes depend on (one network thread in every case)."""
    import torch

    from tilefeet.runners.select import cpu_model

    return {"cpu": cpu_model(), "torch": str(torch.__version__), "threads": 1}


def run_case(tmp: Path, name: str) -> Path:
    """Case ``name`` run into ``tmp`` (engine and section made there once): the output store."""
    import tilefeet
    from tilefeet.convert import write_image

    from .conftest import isbi_montage, make_random_engine

    engine_dir = tmp / "golden-engine"
    engine = make_random_engine(engine_dir) if not engine_dir.exists() else engine_dir
    src = tmp / "golden.ome.zarr"
    if not src.exists():
        write_image(isbi_montage(2, 3)[0][:700, :900], src, (4.0, 4.0), chunk=256)
    return tilefeet.segment_to_zarr(src, tmp / f"{name}.ome.zarr", engine, backend="torch", threads=1, **CASES[name])


def output_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an output store by path (``0``, ``labels/membrane/0``, ...); single-class
    label images as (y, x)."""
    import zarr

    out = {}
    root = zarr.open_group(str(path), mode="r")
    for name, arr in sorted(root.arrays()):
        out[name] = np.asarray(arr[...])
    for group_name, group in sorted(root.groups()):
        for sub_name, sub in sorted(group.groups()):
            for name, arr in sorted(sub.arrays()):
                a = np.asarray(arr[...])
                out[f"{group_name}/{sub_name}/{name}"] = a.reshape(a.shape[-2:]) if a.ndim == 3 and a.shape[0] == 1 else a
    return out


def layout(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Each array's shape and dtype, as words ("(1, 700, 900) |u1")."""
    return {k: f"{a.shape} {a.dtype.str}" for k, a in arrays.items()}


def digest(a: np.ndarray) -> str:
    """sha256 of an array's values, shape and dtype."""
    h = hashlib.sha256(f"{a.shape}{a.dtype.str}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def cell_means(a: np.ndarray) -> np.ndarray:
    """float64 means over ``CELL`` × ``CELL`` cells of the last two axes (the last row and column
    of cells may be narrower); uint8 probabilities as 0..1."""
    v = a.astype(np.float64) / (255.0 if a.dtype == np.uint8 else 1.0)
    h, w = v.shape[-2:]
    ys, xs = np.arange(0, h, CELL), np.arange(0, w, CELL)
    sums = np.add.reduceat(np.add.reduceat(v, ys, axis=-2), xs, axis=-1)
    counts = np.outer(np.diff(np.append(ys, h)), np.diff(np.append(xs, w)))
    return sums / counts


def label_counts(a: np.ndarray) -> np.ndarray:
    """Label pixels per ``CELL`` × ``CELL`` cell."""
    h, w = a.shape[-2:]
    return np.add.reduceat(np.add.reduceat((a != 0).astype(np.int64), np.arange(0, h, CELL), axis=-2),
                           np.arange(0, w, CELL), axis=-1)


def fingerprint(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the everywhere check compares: level 0's cell means (probabilities) and counts (labels)."""
    return {name: label_counts(a) if name.startswith("labels/") else cell_means(a)
            for name, a in arrays.items() if name.split("/")[-1] == "0"}


def compare(name: str, arrays: dict[str, np.ndarray], doc: dict, cells: dict[str, np.ndarray]) -> list[str]:
    """Where case ``name``'s arrays differ from the record beyond rounding, in words (empty: none)."""
    if doc["cell"] != CELL:
        return [f"the record has cells of {doc['cell']} px, this test {CELL}: regenerate ({REGENERATE})"]
    case = doc["cases"][name]
    got = layout(arrays)
    if got != case["arrays"]:
        return [f"arrays (shape, dtype) {got} instead of {case['arrays']}"]
    problems = []
    for key, value in fingerprint(arrays).items():
        diff = np.abs(value - cells[f"{name}/{key}"].astype(np.float64))
        *_, cy, cx = np.unravel_index(diff.argmax(), diff.shape)
        worst = f"most in the {CELL}×{CELL} cell at pixel ({cy * CELL}, {cx * CELL})"
        if key.startswith("labels/") and diff.sum() > LABEL_FLIPS:
            problems.append(f"{key}: at least {int(diff.sum())} label pixels changed (tolerance {LABEL_FLIPS}), {worst}")
        elif not key.startswith("labels/") and diff.max() > PROB_TOL:
            problems.append(f"{key}: {int((diff > PROB_TOL).sum())} cells' mean probability changed by up to "
                            f"{diff.max():.3g} (tolerance {PROB_TOL}), {worst}")
    return problems


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case run once for the module's two tests: name -> arrays."""
    tmp, done = tmp_path_factory.mktemp("golden"), {}

    def get(name: str) -> dict[str, np.ndarray]:
        if name not in done:
            done[name] = output_arrays(run_case(tmp, name))
        return done[name]

    return get


def _record() -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(CELLS) as z:
        return json.loads(GOLDEN.read_text()), dict(z)


@pytest.mark.filterwarnings("ignore::tilefeet.plan.SeamWarning")  # the crop case's overlap is below the receptive field on purpose
@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_keep_their_values(runs, name):
    """On any machine: shapes, dtypes, and level 0 within rounding of the record, cell by cell.

    Rounding, measured as two other ways to round (an AMD EPYC, torch 2.13): the cases at 2 network
    threads instead of 1 (oneDNN sums in another order: 10 % of float32 pixels differ) moved a cell
    mean by at most 2.3e-6; on ONNX Runtime instead of torch (other kernels altogether), by at most
    2.0e-5 (uint8: 9 pixels one step apart), 6.1e-6 (float16) and 2.3e-8 (float32); no label changed.
    A real change: the blending windows before commit 0e55f6b (a floored gaussian instead of the
    ramped one) move gaussian-uint8's cells by up to 6.9e-4 and 82 labels, the cosine case's by
    2.4e-4 and 44 labels: above the tolerances by 2.4× and more (crop mode, which has no windows,
    is unchanged, as it should be)."""
    doc, cells = _record()
    problems = compare(name, runs(name), doc, cells)
    assert not problems, "; ".join(problems) + f" (if the change is intended, regenerate: {REGENERATE})"


@pytest.mark.filterwarnings("ignore::tilefeet.plan.SeamWarning")
@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_keep_their_bits(runs, name):
    """On a machine the hashes were recorded on: every array bit for bit."""
    doc, _ = _record()
    here = environment()
    recorded = [m for m in doc["machines"] if m["environment"] == here]
    if not recorded:
        pytest.skip(f"bits recorded on {[m['environment'] for m in doc['machines']]}, this is {here} "
                    f"(values are checked everywhere; to add this machine: {REGENERATE} --add)")
    want = recorded[0]["hashes"][name]
    assert {k: digest(a) for k, a in runs(name).items()} == want, f"if the change is intended, regenerate: {REGENERATE}"


def main(argv: list[str]) -> int:
    import tempfile

    add = "--add" in argv
    with tempfile.TemporaryDirectory() as d:
        arrays = {name: output_arrays(run_case(Path(d), name)) for name in sorted(CASES)}
    hashes = {name: {k: digest(a) for k, a in arrs.items()} for name, arrs in arrays.items()}
    here = {"environment": environment(), "hashes": hashes}
    if add:
        doc, cells = _record()
        problems = [p for name in sorted(CASES) for p in compare(name, arrays[name], doc, cells)]
        if problems:
            print("not added: this machine's values differ from the record beyond rounding:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        doc["machines"] = [m for m in doc["machines"] if m["environment"] != here["environment"]] + [here]
    else:
        doc = {
            "cell": CELL,
            "cases": {name: {"arrays": layout(arrs)} for name, arrs in arrays.items()},
            "machines": [here],
        }
        # float32 means (6e-8 apart at most from float64's, far below PROB_TOL), uint16 counts
        np.savez_compressed(CELLS, **{f"{name}/{k}": v.astype(np.uint16 if k.startswith("labels/") else np.float32)
                                      for name, arrs in arrays.items() for k, v in fingerprint(arrs).items()})
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {GOLDEN}" + ("" if add else f" and {CELLS}") + f" ({here['environment']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
