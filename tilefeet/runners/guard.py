"""The accuracy guard: a reduced precision is chosen automatically only after it was checked on data
the engine carries, once per engine, backend, precision and processor (the CPU model, or the GPU's).

    check_precision(bundle, "openvino", "bf16")  ->  Guard(passed=True, max_abs_diff=0.02, f1=0.8020, f1_fp32=0.8021, ...)

The check runs the backend at the reduced precision and at fp32 on the engine's *check slices*
(annotated images at the engine's pixel size, normalized as the engine's training data were) and
records how far the probabilities move (largest and 99th-percentile difference), the pixel F1 of
each against the ground truth, how many labels change, and how far the objects built from them
move (:func:`objects_change`: cells for an engine with a cell recipe, objects otherwise; adapted
Rand error of the reduced precision's against fp32's). A precision passes only if all three hold:

* held-out F1 within :data:`MAX_F1_CHANGE` of fp32's (what the user measures);
* labels agree with fp32's to an F1 of at least :data:`MIN_AGREEMENT` (what is written);
* objects differ from fp32's by an adapted Rand error of at most :data:`MAX_OBJECTS_ARE` (what cell
  seeds at p < 0.05 and object thresholds read: a probability change F1 does not see).

Otherwise ``--precision auto`` keeps fp32 (:mod:`.select`): bf16 on a CPU that runs it natively, int8
on the CPU (:mod:`.quantize`), fp16 on a GPU with tensor cores. int8 is calibrated on the first half
of the check slices, so its check scores the second half only: the calibration never sees them
(:func:`calibration_split`). The result is kept under ``$TILEFEET_CACHE/guard/``, keyed by the
engine's fingerprint, the backend, the precision, the processor and the library versions.

Check slices, per engine:

* ``isbi-membrane`` and ``em-membrane``: the six held-out ISBI 2012 slices tilefeet ships
  (:mod:`tilefeet.sample`), which neither trained on;
* ``lucchi-mito``: the two held-out Lucchi test slices of ``tests/data/lucchi`` (in a source
  checkout; a wheel carries them as ``tilefeet/_sample/lucchi``);
* any engine: images and label masks listed in its ``engine.toml`` under ``[check]`` (paths
  relative to the bundle; ``class`` names the output class; a label pixel > 0 is that class)::

      [check]
      images = ["check/slice-0.png"]
      labels = ["check/slice-0-mito.png"]
      class = "mitochondrion"
      data = "two held-out slices of ..."

``tilefeet train`` writes such a table from a new engine's validation images (:mod:`tilefeet.train`:
``check/``), so a trained or fine-tuned engine is checked on its own data.

An engine with none of these is never run in reduced precision by ``auto``: nothing says its
answers stay the same (``--precision bf16`` still runs it, unchecked, when asked for).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import build_once, cache_dir
from ..errors import InvalidEngineError

#: The largest change of held-out F1 against fp32 that a reduced precision may make and still be
#: chosen by ``--precision auto``.
MAX_F1_CHANGE = 0.002
#: The least agreement (pixel F1) of a reduced precision's labels with fp32's. Measured on
#: isbi-membrane (benchmarks/bench_int8.py, and on Lucchi, which it never saw): bf16 0.999, int8
#: with uint8 activations 0.996-0.997, int8 with int8 activations 0.966 (ruled out).
MIN_AGREEMENT = 0.99
#: The largest adapted Rand error of a reduced precision's objects (:func:`objects_change`) against
#: fp32's. Measured on isbi-membrane's check slices: cells bf16 0.0005, int8 0.0055; with the full
#: ``tilefeet objects`` on Lucchi test slices (5 nm, outside both calibrations): isbi-membrane's
#: cells bf16 0.0012, int8 0.0035; lucchi-mito's objects bf16 0.0002, int8 0.0003.
MAX_OBJECTS_ARE = 0.01
#: A cell recipe without a seed threshold seeds below this (``tilefeet.objects``' default; that
#: package sits above this one, so it cannot be imported here: tests/test_layers.py).
DEFAULT_SEED_THRESHOLD = 0.05
#: Bump when what the check measures changes, so old results are not reused.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class CheckData:
    """Annotated images at the engine's pixel size: ``(H, W)`` raw intensities and boolean masks."""

    images: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]
    class_name: str
    description: str


@dataclass(frozen=True)
class Guard:
    """One check of a backend at a reduced precision against the same backend at fp32."""

    backend: str
    precision: str
    passed: bool
    max_abs_diff: float  #: largest |p_reduced − p_fp32| over every check pixel and class
    f1: float  #: pixel F1 of the reduced precision's labels against the ground truth
    f1_fp32: float  #: ... of fp32's labels
    agreement_f1: float  #: F1 of the reduced precision's labels against fp32's
    class_name: str
    data: str  #: what the check slices are
    pixels: int
    p99_abs_diff: float = float("nan")  #: 99th percentile of |p_reduced − p_fp32| of the checked class
    objects: str = ""  #: what objects were compared: cells or objects, by the engine's recipe (:func:`objects_change`)
    objects_are: float = float("nan")  #: adapted Rand error of the reduced precision's objects against fp32's
    path: str = ""  #: where the result is cached

    @property
    def f1_change(self) -> float:
        return self.f1 - self.f1_fp32

    def failures(self) -> list[str]:
        """What fails the guard (empty when it passes)."""
        return failures(self.f1, self.f1_fp32, self.agreement_f1, self.objects_are)

    def describe(self) -> str:
        why = ", ".join(self.failures())
        verdict = "passes" if self.passed else "fails"
        return (
            f"{self.backend} {self.precision} {verdict} the accuracy guard on {self.data}{f' ({why})' if why else ''}: {self.class_name} F1 {self.f1:.4f} vs "
            f"fp32 {self.f1_fp32:.4f} (Δ {self.f1_change:+.4f}, limit ±{MAX_F1_CHANGE}), labels agree {self.agreement_f1:.4f} "
            f"(≥ {MIN_AGREEMENT}), {self.objects} ARE vs fp32 {self.objects_are:.4f} (≤ {MAX_OBJECTS_ARE}), "
            f"|Δp| p99 {self.p99_abs_diff:.3f} max {self.max_abs_diff:.3f}"
        )


def check_data(bundle: Any) -> CheckData | None:
    """The engine's check slices (see the module docstring), or ``None`` when it carries none."""
    declared = bundle.raw.get("check")
    if declared:
        return _declared(bundle, declared)
    loader = BUNDLED.get(bundle.name)
    return loader(bundle) if loader is not None else None


def check_precision(
    bundle: Any,
    backend: str,
    precision: str,
    *,
    batch_size: int = 4,
    cache: Path | None = None,
    threads: int | None = None,
    device: str = "cpu",
) -> Guard | None:
    """The guard's verdict on ``backend`` at ``precision`` for ``bundle`` on ``device`` (this CPU, or
    a GPU): measured on first use (under a file lock: concurrent workers check once), then read from
    the cache. ``None`` when the engine carries no check data."""
    data = check_data(bundle)
    if data is None:
        return None
    if precision == "int8":
        halves = calibration_split(data)
        if halves is None:
            return None
        data = halves[1]
    key = guard_key(bundle, backend, precision, device)
    path = (cache or cache_dir()) / "guard" / f"{key[:24]}.json"

    def measure(tmp: Path) -> None:
        guard = _measure(bundle, backend, precision, data, batch_size, threads, device)
        doc = {**asdict(guard), "engine": bundle.fingerprint, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp.write_text(json.dumps(doc, indent=2) + "\n")

    build_once(path, measure)
    doc = json.loads(path.read_text())
    fields = {k: doc[k] for k in Guard.__dataclass_fields__ if k in doc}
    return Guard(**{**fields, "path": str(path)})


def calibration_split(data: CheckData) -> tuple[CheckData, CheckData] | None:
    """The check slices int8 is calibrated on (the first half: :mod:`.quantize`) and those the guard
    judges it on (the rest, which the calibration never sees), or ``None`` when there are fewer
    than two. The one place that draws the line, so the two halves cannot overlap."""
    half = len(data.images) // 2
    if half == 0:
        return None
    n = len(data.images)
    first = CheckData(data.images[:half], data.masks[:half], data.class_name, f"{data.description}: the first {half} of {n}")
    rest = CheckData(data.images[half:], data.masks[half:], data.class_name,
                     f"{data.description}, the last {n - half} (int8 was calibrated on the first {half})")
    return first, rest


def guard_key(bundle: Any, backend: str, precision: str, device: str = "cpu") -> str:
    from .select import cpu_model, library_versions

    doc = {
        "bundle": bundle.fingerprint,
        "backend": backend,
        "precision": precision,
        "cpu": cpu_model(),
        **({"gpu": gpu_model(device)} if device != "cpu" else {}),
        "versions": library_versions(),
        "max_f1_change": MAX_F1_CHANGE,
        "format": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def verdict(f1: float, f1_fp32: float) -> bool:
    """Whether a reduced precision's held-out F1 is close enough to fp32's (both rounded as reported)."""
    return abs(round(f1 - f1_fp32, 6)) <= MAX_F1_CHANGE


def failures(f1: float, f1_fp32: float, agreement: float, objects_are: float) -> list[str]:
    """Why a reduced precision fails the guard, one phrase per failed rule (empty: it passes). A
    figure that could not be measured (NaN: no object in the check slices) fails nothing."""
    out = []
    if not verdict(f1, f1_fp32):
        out.append(f"F1 moved by {f1 - f1_fp32:+.4f}")
    if round(agreement, 6) < MIN_AGREEMENT:
        out.append(f"labels agree {agreement:.4f} < {MIN_AGREEMENT}")
    if objects_are == objects_are and round(objects_are, 6) > MAX_OBJECTS_ARE:
        out.append(f"objects ARE {objects_are:.4f} > {MAX_OBJECTS_ARE}")
    return out


# ------------------------------------------------------------------------------------- measuring


def gpu_model(device: str) -> str:
    """The GPU's name and compute capability, and the CUDA and cuDNN versions: what its kernels depend on."""
    from ..device import resolve_device

    dev = resolve_device(device)
    major, minor = torch.cuda.get_device_capability(dev)
    return f"{torch.cuda.get_device_name(dev)} sm_{major}{minor} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()}"


def _measure(
    bundle: Any, backend: str, precision: str, data: CheckData, batch_size: int, threads: int | None, device: str = "cpu"
) -> Guard:
    from ..metrics import pixel_metrics
    from . import RunnerSpec, runner_class

    tile = bundle.fixed_tile or (bundle.tile, bundle.tile)
    tiles, crops = check_tiles(bundle, data, tile)
    step = bundle.fixed_batch or batch_size
    options = (("threads", threads),) if threads else ()
    probs = {}
    for p in ("fp32", precision):
        spec = RunnerSpec(str(bundle.path), backend, device, p, step, tile, options)
        runner = runner_class(backend)(bundle, spec, f"accuracy guard of {precision}")
        try:
            probs[p] = run_tiles(runner, tiles, step)
        finally:
            runner.close()
    c = list(bundle.classes).index(data.class_name)
    reduced, full = stitch_tiles(probs[precision], crops, data), stitch_tiles(probs["fp32"], crops, data)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(reduced, full))
    p99 = float(np.percentile(np.concatenate([np.abs(a[c] - b[c]).ravel() for a, b in zip(reduced, full)]), 99))
    truth = np.concatenate([m.ravel() for m in data.masks])
    lab_r = np.concatenate([(a[c] >= 0.5).ravel() for a in reduced])
    lab_f = np.concatenate([(a[c] >= 0.5).ravel() for a in full])
    f1, f1_fp32 = pixel_metrics(lab_r, truth).f1, pixel_metrics(lab_f, truth).f1
    agreement = pixel_metrics(lab_r, lab_f).f1
    kind, are = objects_change(bundle, data.class_name, [a[c] for a in reduced], [b[c] for b in full])
    return Guard(
        backend=backend, precision=precision, passed=not failures(f1, f1_fp32, agreement, are), max_abs_diff=diff, f1=f1,
        f1_fp32=f1_fp32, agreement_f1=agreement, class_name=data.class_name, data=data.description, pixels=int(truth.size),
        p99_abs_diff=p99, objects=kind, objects_are=are,
    )


def objects_change(bundle: Any, class_name: str, reduced: list[np.ndarray], full: list[np.ndarray]) -> tuple[str, float]:
    """How far what is built from each map with the engine's recipe for the class moves: the
    adapted Rand error of the reduced precision's objects against fp32's, averaged over the check
    slices (NaN where fp32 finds none), and what was compared.

    Where the engine records a cell recipe: cells, scikit-image's watershed of the probabilities from
    the seeds below the recipe's seed threshold (what ``tilefeet objects --cells`` floods from;
    whole-image and without its merge step: this layer sits below :mod:`tilefeet.objects`, and
    the seeds are what a small probability change moves). Otherwise objects: the 8-connected
    components of the labels, with the recipe's minimum size and hole filling."""
    from scipy import ndimage as ndi
    from skimage.measure import label
    from skimage.metrics import adapted_rand_error
    from skimage.segmentation import watershed

    from ..engine import engine_recipes

    recipe = engine_recipes(bundle.path).get(class_name, {})
    recipe = recipe if isinstance(recipe, dict) else {}
    cells = recipe.get("cells") if isinstance(recipe.get("cells"), dict) else None
    seed = float(cells.get("seed_threshold", DEFAULT_SEED_THRESHOLD)) if cells is not None else DEFAULT_SEED_THRESHOLD
    area = float(np.prod(bundle.pixel_size_nm))

    def build(p: np.ndarray) -> np.ndarray:
        if cells is not None:
            return np.asarray(watershed(p, label(p < seed, connectivity=1)))
        mask = p >= 0.5
        if recipe.get("fill_holes"):
            mask = ndi.binary_fill_holes(mask)
        ids = np.asarray(label(mask, connectivity=2))
        small = np.bincount(ids.ravel()) < float(recipe.get("min_size_nm2", 0.0)) / area  # objects below the minimum area
        small[0] = False
        ids[small[ids]] = 0
        return ids

    errors = []
    for r, f in zip(reduced, full):
        ids_f, ids_r = build(f), build(r)
        if ids_f.any():
            errors.append(float(adapted_rand_error(ids_f, ids_r)[0]))
    kind = f"cells (watershed from seeds below p {seed:g})" if cells is not None else "objects"
    return kind, (float(np.mean(errors)) if errors else float("nan"))


Crop = tuple[int, int, int, int, int]  # image index, y, x, height, width of a tile's part inside its image


def check_tiles(bundle: Any, data: CheckData, tile: tuple[int, int]) -> tuple[torch.Tensor, list[Crop]]:
    """The check images cut into whole tiles (reflection-padded to a multiple of the tile), normalized
    as the engine's training data were."""
    th, tw = tile
    out, crops = [], []
    for i, img in enumerate(data.images):
        x = bundle.normalization.to_network(img.astype(np.float32))
        h, w = x.shape
        ph, pw = -h % th, -w % tw
        x = np.pad(x, ((0, ph), (0, pw)), mode="reflect" if ph < h and pw < w else "symmetric")
        for y in range(0, h, th):
            for xx in range(0, w, tw):
                out.append(x[y : y + th, xx : xx + tw])
                crops.append((i, y, xx, min(th, h - y), min(tw, w - xx)))
    channels = bundle.in_channels
    batch = torch.from_numpy(np.stack(out)[:, None].astype(np.float32)).expand(-1, channels, -1, -1).contiguous()
    return batch, crops


def run_tiles(runner: Any, tiles: torch.Tensor, step: int) -> np.ndarray:
    """``runner`` on ``tiles`` in batches of ``step`` (the last one zero-padded), as numpy."""
    n = tiles.shape[0]
    pad = -n % step
    x = torch.cat([tiles, tiles.new_zeros((pad, *tiles.shape[1:]))]) if pad else tiles
    return np.concatenate([runner(x[i : i + step]).cpu().numpy() for i in range(0, x.shape[0], step)])[:n]


def stitch_tiles(probs: np.ndarray, crops: list[Crop], data: CheckData) -> list[np.ndarray]:
    """The tiles' probabilities put back into one ``(classes, H, W)`` map per check image."""
    out = [np.zeros((probs.shape[1], *img.shape), np.float32) for img in data.images]
    for p, (i, y, x, h, w) in zip(probs, crops):
        out[i][:, y : y + h, x : x + w] = p[:, :h, :w]
    return out


# ------------------------------------------------------------------------------------ check data


def _isbi(bundle: Any) -> CheckData | None:
    from ..sample import SLICES, isbi_sample

    imgs, mems = isbi_sample()
    first, last = SLICES[0], SLICES[-1]
    return CheckData(tuple(imgs), tuple(m.astype(bool) for m in mems), "membrane", f"ISBI 2012 held-out slices {first}–{last}")


def _lucchi(bundle: Any) -> CheckData | None:
    import imageio.v3 as iio

    here = Path(__file__).resolve().parents[1]
    for d in (here.parent / "tests" / "data" / "lucchi", here / "_sample" / "lucchi"):
        if (d / "image").is_dir() and (d / "mitochondrion").is_dir():
            names = sorted(p.name for p in (d / "image").glob("*.png"))
            imgs = tuple(iio.imread(d / "image" / n) for n in names)
            masks = tuple(iio.imread(d / "mitochondrion" / n) > 127 for n in names)
            return CheckData(imgs, masks, "mitochondrion", f"Lucchi held-out test slices {', '.join(Path(n).stem for n in names)}")
    return None


#: The check slices of the engines tilefeet ships, by name.
BUNDLED: dict[str, Callable[[Any], CheckData | None]] = {"isbi-membrane": _isbi, "em-membrane": _isbi, "lucchi-mito": _lucchi}


def _declared(bundle: Any, declared: dict) -> CheckData:
    import imageio.v3 as iio

    images, labels = list(declared.get("images", [])), list(declared.get("labels", []))
    cls = str(declared.get("class", bundle.classes[0]))
    where = f"engine {bundle.name!r}: [check]"
    if not images or len(images) != len(labels):
        raise InvalidEngineError(f"{where} needs as many labels as images (got {len(images)} and {len(labels)}); list both, in order")
    if cls not in bundle.classes:
        raise InvalidEngineError(f"{where} class {cls!r} is not one of the engine's classes {list(bundle.classes)}")
    try:
        imgs = tuple(np.asarray(iio.imread(bundle.path / p)) for p in images)
        masks = tuple(np.asarray(iio.imread(bundle.path / p)) > 0 for p in labels)
    except OSError as e:
        raise InvalidEngineError(f"{where} cannot read {e.filename or e}; re-copy the bundle") from None
    for p, a, m in zip(images, imgs, masks):
        if a.ndim != 2 or a.shape != m.shape:
            raise InvalidEngineError(f"{where} {p} must be a grey 2-D image of its label's shape, got {a.shape} and {m.shape}")
    return CheckData(imgs, masks, cls, str(declared.get("data", f"{len(imgs)} check slices of the engine")))
