"""Train a segmentation network and write it as an engine bundle (``tilefeet train``).

Data: 2-D raw images (any integer or float dtype) with per-class binary masks ``(C, H, W)`` at
the engine's pixel size, from one dataset or several (each with a sampling weight). Training
samples random crops: flips and 90° rotations, scale jitter (so a pixel size that is a few percent
off does not matter), and domain randomization (:mod:`tilefeet.augment`: intensity, noise, blur,
elastic deformation, section artefacts). Inputs are normalized exactly as inference normalizes them
(:class:`tilefeet.engine.Normalization` in ``meanstd`` mode, from the training data's statistics,
recorded in the bundle with a reference histogram). Checkpoints make an interrupted run resumable;
the best validation checkpoint becomes the bundle.

**Edges.** The bundle folder (and the checkpoint folder) are checked before any training: a folder
that cannot be written, a path the OS refuses, a file, or a folder of other files is one line
(:func:`check_bundle_output`). The bundle is written beside its folder and renamed into place when
complete, so a failed or interrupted run never leaves half a bundle. Ctrl-C stops after the current
step, saves a checkpoint there and says (one line, :class:`~tilefeet.errors.Interrupted`) where it is
and how to continue (``--resume``), with the same result as an uninterrupted run; a second Ctrl-C
stops at once, keeping the last checkpoint. The progress bar shows the loss and the latest
validation F1.

**Fine-tuning** (``--from ENGINE``, :func:`resolve_parent`) starts from a bundle's weights and
takes its architecture, pixel size (the data are resampled to it) and classes. The labels must
annotate the parent's classes (all of them, or a subset, whose rows of the output layer are kept);
other classes are refused unless ``new_head`` replaces the output layer. The new bundle records its
parent (name and weights sha256) in ``[training.parent]``. The normalization statistics are the
fine-tuning data's, so the network sees the new data standardized as its parent saw its own.

:func:`train_engine` trains on arrays; :func:`train_from_zarr` (behind ``tilefeet train``) reads
annotated OME-Zarr images or stacks and their label images first (:mod:`tilefeet.training_data`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .augment import ALL, parse_augment, randomize
from .engine import ENGINE_FILE, EngineBundle, dump_toml, load_engine, record_recipes, write_bundle
from .errors import BackendUnavailableError, ConfigError, Interrupted, InvalidEngineError, OutputExistsError, OutputWriteError
from .intensity import Normalization, training_normalization
from .metrics import PixelMetrics, pixel_metrics
from .storage import check_writable, os_error, replace_dir, staging_path
from .training_data import MAX_TRAINING_PIXELS, DataSpec, ValidationSplit, class_names, load_training_data
from .units import parse_pixel_size

#: The file a run's state is saved in, inside its checkpoint folder.
CHECKPOINT = "checkpoint.pt"

#: Settings that only label the bundle (or say how long to train), so a checkpoint made with other
#: values still resumes: more ``steps`` extends a finished run.
_RESUMABLE_CHANGES = ("steps", "description", "tile", "overlap")

#: What changes when a run starts from a parent engine (``--from``) and the option is not given:
#: a small annotated set needs fewer, gentler steps (measured in benchmarks/train_measure.py).
FINETUNE_DEFAULTS: dict[str, Any] = {"steps": 300, "lr": 5e-4, "batch_size": 4, "val_every": 50, "augment": "all"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (recorded in the bundle's ``[training]`` table)."""

    name: str
    pixel_size_nm: tuple[float, float]
    classes: tuple[str, ...] = ("foreground",)
    base_channels: int = 16
    depth: int = 4
    steps: int = 3000
    batch_size: int = 8
    crop: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_every: int = 250
    seed: int = 0
    scale_jitter: tuple[float, float] = (0.8, 1.25)  #: random zoom range (1 = off)
    augment: tuple[str, ...] = ALL  #: domain randomization groups (tilefeet.augment), or ("legacy",)
    freeze_encoder: bool = False  #: fine-tuning: train the decoder only (the encoder's batch-norm statistics still adapt)
    dice_weight: float = 1.0
    device: str = "auto"
    tile: int = 512  #: recommended inference tile written to the bundle
    overlap: int = 64
    description: str = ""
    notes: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    bundle: EngineBundle
    best_step: int
    best_val_f1: list[float]
    history: list[dict]
    seconds: float = 0.0  #: wall time of this call's training loop (a resumed run counts its own part)


@dataclass(frozen=True)
class Parent:
    """The engine a fine-tuning run starts from, and what becomes of its output layer."""

    bundle: EngineBundle
    head: Literal["kept", "subset", "new"]  #: all classes, a subset of them (in the labels' order), or a fresh layer
    rows: tuple[int, ...] = ()  #: the parent's output channel of each new class ("kept", "subset")

    def record(self) -> dict[str, Any]:
        """The ``[training.parent]`` table."""
        return {
            "name": self.bundle.name,
            "weights_sha256": self.bundle.weights_digest,
            "path": str(self.bundle.path),
            "classes": list(self.bundle.classes),
            "head": self.head,
        }

    def state_dict(self) -> dict[str, Any]:
        """The parent's weights, with the output layer cut to the new classes (or left out for a new one)."""
        from safetensors.torch import load_file

        b = self.bundle
        b.check_weights()
        try:
            state = load_file(str(b.weights_path))
        except Exception as e:  # safetensors raises its own SafetensorError for damaged files
            raise InvalidEngineError(
                f"--from {b.name}: {b.weights_path} is not a readable safetensors file ({str(e).splitlines()[0]}); re-copy the bundle"
            ) from None
        head = [k for k in state if k.startswith("head.")]
        for k in head:
            if self.head == "new":
                del state[k]
            else:
                state[k] = state[k][list(self.rows)].clone()
        return state


def resolve_parent(engine: str | os.PathLike | EngineBundle, classes: Sequence[str], *, new_head: bool = False, **arch: Any) -> Parent:
    """Check that ``engine`` can be fine-tuned on labels of ``classes``, before any data is read.

    ``arch`` holds architecture options the user gave (``base_channels``, ``depth``); they must agree
    with the parent's (a fine-tuned network keeps its parent's shape). The labels' classes must be
    the parent's, or some of them (matched by name); ``new_head`` instead replaces the output layer
    with an untrained one for ``classes`` (what to do for a class the parent never learned).
    """
    bundle = load_engine(engine)  # a missing weights file is refused here
    bundle.check_weights()
    where = f"--from {bundle.name}"
    a = dict(bundle.architecture)
    if a.get("name") != "unet2d":
        raise ConfigError(f"{where}: its architecture is {a.get('name')!r}; tilefeet train fine-tunes unet2d engines only")
    if bundle.activation != "sigmoid" or bundle.in_channels != 1:
        raise ConfigError(
            f"{where}: a {bundle.activation} engine with {bundle.in_channels} input channel(s); tilefeet train fine-tunes "
            f"single-channel sigmoid engines only"
        )
    differ = [f"--{k.replace('_', '-')} {v} (the engine has {a.get(k)})" for k, v in arch.items() if v is not None and v != a.get(k)]
    if differ:
        raise ConfigError(f"{where}: {', '.join(differ)}: a fine-tuned network keeps its parent's architecture; drop these options")
    if new_head:
        return Parent(bundle, "new")
    missing = [c for c in classes if c not in bundle.classes]
    if missing:
        raise ConfigError(
            f"{where}: the labels annotate {', '.join(classes)} but the engine's classes are {', '.join(bundle.classes)}; "
            f"name the label images after the engine's classes with --class (e.g. --class {bundle.classes[0]}), or pass "
            f"--new-head to train a new output layer for {', '.join(missing)}"
        )
    rows = tuple(bundle.classes.index(c) for c in classes)
    return Parent(bundle, "kept" if rows == tuple(range(len(bundle.classes))) else "subset", rows)


def train_engine(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    out_dir: Path,
    config: TrainConfig,
    *,
    val_images: Sequence[np.ndarray] = (),
    val_masks: Sequence[np.ndarray] = (),
    dataset: Sequence[int] = (),
    val_dataset: Sequence[int] = (),
    dataset_weights: Sequence[float] = (1.0,),
    parent: Parent | None = None,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    training_info: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train, validate every ``val_every`` steps, and write the best network as a bundle in ``out_dir``.

    ``masks[i]`` is ``(C, H, W)`` (or ``(H, W)`` for one class), non-zero inside the class.
    ``dataset[i]`` says which dataset image ``i`` belongs to (default: all one); a crop comes from
    dataset ``d`` with probability ``dataset_weights[d] / sum``, then from its images in proportion
    to their size. Validation scores each dataset and keeps the checkpoint with the best mean.
    With ``parent``, the network starts from its weights (and step 0 is validated: the parent's
    score on this data, kept if no later step beats it).
    With ``checkpoint_dir``, the run saves its state there (at every validation, at the end, and when
    Ctrl-C stops it) and resumes from it when restarted; a checkpoint made with other settings is refused, except for
    the settings in ``_RESUMABLE_CHANGES`` (a larger ``steps`` continues a finished run; its cosine
    schedule is then recomputed for the new length). ``training_info`` (where the data came from)
    is added to the bundle's ``[training]`` table.
    """
    import torch

    from .models.unet import UNet2d

    images = [np.asarray(a) for a in images]
    masks = [_as_chw(m, len(config.classes)) for m in masks]
    val_images = [np.asarray(a) for a in val_images]
    val_masks = [_as_chw(m, len(config.classes)) for m in val_masks]
    dataset = list(dataset) or [0] * len(images)
    val_dataset = list(val_dataset) or [0] * len(val_images)
    for a, m in zip(images + val_images, masks + val_masks):
        if a.ndim != 2 or a.shape != m.shape[1:]:
            raise ConfigError(f"image of shape {a.shape} does not match its label image of shape {m.shape[1:]}")
    validate_config(config)
    if not images:
        raise ConfigError("no training images")
    if min(min(a.shape) for a in images) < 16:
        raise ConfigError("training images must be at least 16 pixels on each side")
    if len(dataset) != len(images) or len(val_dataset) != len(val_images) or max(dataset + val_dataset) >= len(dataset_weights):
        raise ConfigError(f"dataset indices {sorted(set(dataset + val_dataset))} do not fit {len(dataset_weights)} dataset weight(s)")
    check_bundle_output(out_dir, checkpoint_dir)  # before step 1: a bundle that cannot be written is said now

    device = _pick_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    norm = training_normalization(images)
    model = UNet2d(1, len(config.classes), config.base_channels, config.depth)
    if parent is not None:
        _load_parent(model, parent)
    model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if config.freeze_encoder:
        for block in (*model.down, model.bottom):
            block.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)

    def lr_factor(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history: list[dict] = []
    best: dict[str, Any] = {"f1": [-1.0], "step": 0, "state": None}
    start = 0
    n_sets = len(dataset_weights)

    def validate(done: int, loss: float, seconds: float) -> None:
        nonlocal best
        per_set = validation_f1(model, val_images, val_masks, val_dataset, n_sets, norm, device) if val_images else []
        f1 = [float(np.nanmean(c)) for c in zip(*per_set)] if per_set else [float("nan")]
        record: dict[str, Any] = {"step": done, "loss": loss, "val_f1": f1, "seconds": seconds}
        if n_sets > 1:
            record["val_f1_datasets"] = per_set
        history.append(record)
        score = float(np.nanmean(per_set)) if val_images else float(done)
        if score >= float(np.nanmean(best["f1"])) or not val_images:
            best = {"f1": f1, "step": done, "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}

    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None

    def save(done: int) -> None:
        assert ckpt is not None
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        state = {
            "config": _config_dict(config),
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "best": best,
            "step": done,
        }
        try:
            torch.save(state, tmp)
            tmp.replace(ckpt)  # atomic: a crash mid-save keeps the previous checkpoint
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise os_error(OSError(e.errno, e.strerror), ckpt, state=f"training stopped at step {done}; the previous checkpoint is kept") from None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        check_resumable(state["config"], _config_dict(config), ckpt, int(state["step"]))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        history, best, start = state["history"], state["best"], state["step"]
        if state["config"]["steps"] != config.steps:  # extended: the next step's rate from the new schedule
            for group, base in zip(opt.param_groups, sched.base_lrs):
                group["lr"] = base * lr_factor(start)
    elif parent is not None and parent.head != "new" and val_images:
        validate(0, float("nan"), 0.0)  # the parent as it is: what fine-tuning must beat

    sampler = _CropSampler(images, masks, dataset, dataset_weights, config, norm, rng)
    bar = _progress(config.steps, start, progress)
    bar.set_postfix_str(_postfix(None, history), refresh=False)
    t0 = time.perf_counter()
    done = saved = start
    try:
        with _StopOnInterrupt() as stop:
            for step in range(start, config.steps):
                model.train()
                x, y = sampler.batch()
                x = x.to(device, memory_format=torch.channels_last)
                y = y.to(device)
                logits = model(x)
                loss = _loss(logits, y, config.dice_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                done = step + 1
                if done % config.val_every == 0 or done == config.steps:
                    validate(done, float(loss.item()), time.perf_counter() - t0)
                    if ckpt is not None:
                        save(done)
                        saved = done
                bar.update(1)
                bar.set_postfix_str(_postfix(float(loss.item()), history))
                if stop.requested and done < config.steps:  # Ctrl-C: stop here, where the state is whole
                    if ckpt is not None and saved != done:
                        save(done)
                        saved = done
                    raise _interrupted(done, config.steps, ckpt, saved, whole=True)
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step: the last checkpoint stands
        raise _interrupted(done, config.steps, ckpt, saved if ckpt is not None and ckpt.is_file() else None, whole=False) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    arch = {"name": "unet2d", "base_channels": config.base_channels, "depth": config.depth}
    info = dict(training_info or {})
    if parent is not None:
        info["parent"] = parent.record()

    def write(folder: Path) -> EngineBundle:
        bundle = write_bundle(
            folder,
            name=config.name,
            state_dict=best["state"],
            architecture=arch,
            pixel_size_nm=config.pixel_size_nm,
            classes=config.classes,
            normalization=norm,
            description=config.description,
            tile=config.tile,
            overlap=config.overlap,
            metrics={"validation_f1": [round(float(v), 4) for v in best["f1"]], "best_step": best["step"]},
            training={
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in _config_dict(config).items() if k != "notes" and v != ""},
                **info,
            },
        )
        # the object recipe of each class, from its training masks (engine.toml [objects])
        bundle = record_recipes(bundle, [*masks, *val_masks], parent=parent.bundle if parent is not None else None)
        bundle = _record_reference(bundle, val_images or images, "validation" if val_images else "training")
        bundle = _record_check(bundle, val_images, val_masks)
        (folder / "training_history.json").write_text(json.dumps(history, indent=1))
        return bundle

    bundle = publish_bundle(Path(out_dir), write, ckpt)
    return TrainResult(bundle, int(best["step"]), list(best["f1"]), history, seconds)


def check_bundle_output(out_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None) -> None:
    """Refuse, in one line and before any training, a bundle folder that cannot be written (read-only,
    a path the OS refuses), that is a file, or that holds files of something else (replacing it would
    delete them); and a checkpoint folder that cannot be written, or that lies inside the bundle
    folder (which is replaced when training ends). An empty folder or an engine bundle is fine (the
    command decides, with ``--overwrite``/``--resume``, whether a bundle may be replaced)."""
    out = Path(out_dir)
    try:
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a folder; give --out a folder for the engine bundle, e.g. engines/NAME")
        if out.is_dir() and not (out / ENGINE_FILE).is_file() and any(out.iterdir()):
            raise OutputExistsError(
                f"{out} is a folder of other files, not an engine bundle; choose another --out (tilefeet replaces only an engine bundle)"
            )
    except OSError as e:
        if isinstance(e, OutputExistsError):
            raise
        raise os_error(OSError(e.errno, e.strerror), out) from None
    check_writable(out, create=False)  # nothing is made before training starts
    if checkpoint_dir is None:
        return
    ckpt = Path(checkpoint_dir)
    if ckpt.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--checkpoint-dir {ckpt} is inside --out {out}, which is replaced when training ends; choose a folder outside it")
    try:
        check_writable(ckpt / CHECKPOINT, create=False)
    except OutputWriteError as e:
        raise OutputWriteError(f"{e}; give another --checkpoint-dir") from None


def publish_bundle(out: Path, write: Any, ckpt: Path | None = None) -> EngineBundle:
    """``write(folder)`` a bundle into a staging folder beside ``out``, then rename it to ``out``
    (replacing what is there, crash-safely: :func:`tilefeet.storage.replace_dir`). An OS error is one
    line that says where the trained network is kept (the checkpoint ``ckpt``)."""
    import shutil

    staging = staging_path(out)
    kept = f"the trained network is kept in the checkpoint {ckpt}: free space or fix permissions, then rerun with --resume" if ckpt else None
    try:
        shutil.rmtree(staging, ignore_errors=True)
        write(staging)
        replace_dir(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise os_error(OSError(e.errno, e.strerror), out, state=kept) from None
    return load_engine(out)


def _interrupted(done: int, steps: int, ckpt: Path | None, saved: int | None, *, whole: bool) -> Interrupted:
    """What a Ctrl-C left: where the checkpoint is, and how to continue from it."""
    when = f"at step {done} of {steps}" if whole else f"during step {done + 1} of {steps}"
    if ckpt is None:
        return Interrupted(f"training interrupted {when}; no checkpoint folder was given, so nothing was kept")
    if saved is None:
        return Interrupted(f"training interrupted {when}, before its first checkpoint; nothing was kept")
    at = "" if whole else f" (step {saved})"
    return Interrupted(f"training interrupted {when}: the checkpoint{at} is {ckpt}; rerun the same command with --resume to continue from it")


class _StopOnInterrupt:
    """Ctrl-C (SIGINT) during the training loop asks it to stop after the current step, where the
    model, optimizer and random streams are whole and can be saved; a second Ctrl-C stops at once
    (``KeyboardInterrupt``). Python delivers signals to the main thread only; elsewhere this does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)


def _postfix(loss: float | None, history: Sequence[Mapping[str, Any]]) -> str:
    """The progress bar's note: the loss, and the latest validation F1 (per class) with its step."""
    parts = [] if loss is None else [f"loss {loss:.3f}"]
    scored = [h for h in history if not all(math.isnan(v) for v in h["val_f1"])]
    if scored:
        last = scored[-1]
        parts.append("val F1 " + "/".join(f"{v:.3f}" for v in last["val_f1"]) + f" (step {last['step']})")
    return ", ".join(parts)


def _load_parent(model: Any, parent: Parent) -> None:
    """The parent's weights into ``model``; only a replaced output layer may stay untrained."""
    state = parent.state_dict()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise InvalidEngineError(
            f"--from {parent.bundle.name}: its weights do not fit its declared architecture ({str(e).splitlines()[-1].strip()}); re-copy the bundle"
        ) from None
    allowed = {"head.weight", "head.bias"} if parent.head == "new" else set()
    if set(missing) - allowed or unexpected:
        raise InvalidEngineError(
            f"--from {parent.bundle.name}: its weights do not fit its declared architecture (missing "
            f"{sorted(set(missing) - allowed)[:3]}, unexpected {sorted(unexpected)[:3]}); re-copy the bundle"
        )


def train_from_zarr(
    image: str | os.PathLike | None,
    labels: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    data: Sequence[DataSpec] = (),
    parent: str | os.PathLike | EngineBundle | None = None,
    new_head: bool = False,
    name: str | None = None,
    classes: Sequence[str] | None = None,
    pixel_size: str | float | tuple | None = None,
    engine_pixel_size: str | float | tuple | None = None,
    split: ValidationSplit = ValidationSplit(),
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    max_pixels: int = MAX_TRAINING_PIXELS,
    **options: Any,
) -> TrainResult:
    """Train an engine from annotated OME-Zarr images or (z, y, x) stacks, one label image per class.

    The data are ``image`` with ``labels`` (its pixel size from its metadata unless ``pixel_size``
    overrides it), then each of ``data`` (several datasets, each with a sampling weight).
    ``options`` are :class:`TrainConfig` fields (``steps``, ``crop``, ``base_channels``, ...).
    ``parent`` (an engine name or folder) fine-tunes that engine (:func:`resolve_parent`): its
    architecture, pixel size, classes and recommended tile come with it, and options not given
    take :data:`FINETUNE_DEFAULTS`. Without a parent, the engine's pixel size is
    ``engine_pixel_size``, else the first dataset's. Every dataset is resampled to it; ``split``
    chooses each one's validation slices (or region). The data's fingerprint (and the parent's
    weights) are part of the checkpoint's settings, so a resumed run refuses other data.
    """
    specs = list(data)
    if image is not None:
        px = parse_pixel_size(pixel_size, where="--pixel-size") if pixel_size is not None else None
        specs.insert(0, DataSpec(str(image), tuple(str(p) for p in labels), 1.0, px))
    elif labels:
        raise ConfigError("--labels belongs to an IMAGE argument; with --data only, give each dataset as IMAGE:LABELS")
    if not specs:
        raise ConfigError("no training data: give IMAGE --labels LABELS, or --data IMAGE:LABELS (repeatable)")
    names = class_names(specs[0], classes)
    target = parse_pixel_size(engine_pixel_size, where="--engine-pixel-size") if engine_pixel_size is not None else None
    resolved = None
    if parent is not None:
        arch = {k: options.pop(k, None) for k in ("base_channels", "depth")}
        resolved = resolve_parent(parent, names, new_head=new_head, **arch)
        if target is not None and tuple(target) != resolved.bundle.pixel_size_nm:
            raise ConfigError(
                f"--engine-pixel-size {target[0]:g} nm: a fine-tuned engine keeps its parent's pixel size "
                f"({resolved.bundle.pixel_size_nm[0]:g} nm); drop the option (the data are resampled to it)"
            )
        target = resolved.bundle.pixel_size_nm
        defaults = {**FINETUNE_DEFAULTS, "tile": resolved.bundle.tile, "overlap": resolved.bundle.overlap}
        options = {**{k: v for k, v in defaults.items() if options.get(k) is None}, **{k: v for k, v in options.items() if v is not None}}
        options.update(base_channels=resolved.bundle.architecture["base_channels"], depth=resolved.bundle.architecture["depth"])
    elif new_head:
        raise ConfigError("--new-head replaces the output layer of a parent engine; it needs --from ENGINE")
    elif options.get("freeze_encoder"):
        raise ConfigError("--freeze-encoder keeps a parent engine's encoder; it needs --from ENGINE")
    options = {k: v for k, v in options.items() if v is not None}
    ts = load_training_data(specs, classes=classes, pixel_size_nm=target, split=split, max_pixels=max_pixels)
    notes = {"parent_sha256": resolved.bundle.weights_digest, "head": resolved.head} if resolved else {}
    config = make_config(name or Path(out_dir).name, ts.pixel_size_nm, ts.classes, ts.fingerprint(), notes=notes, **options)
    return train_engine(
        ts.images,
        ts.masks,
        Path(out_dir),
        config,
        val_images=ts.val_images,
        val_masks=ts.val_masks,
        dataset=ts.dataset,
        val_dataset=ts.val_dataset,
        dataset_weights=ts.weights,
        parent=resolved,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
        progress=progress,
        training_info=ts.provenance,
    )


def make_config(
    name: str, pixel_size_nm: tuple[float, float], classes: Sequence[str], data_sha256: str, *, notes: Mapping[str, Any] | None = None, **options: Any
) -> TrainConfig:
    """A :class:`TrainConfig` from keyword options, refusing names it does not have. ``notes`` (with the
    data's sha256) are settings a resumed run must share but the bundle need not show."""
    known = {f.name for f in fields(TrainConfig)} - {"name", "pixel_size_nm", "classes", "notes"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "scale_jitter" in options:
        options["scale_jitter"] = tuple(float(v) for v in options["scale_jitter"])
    if "augment" in options:
        options["augment"] = parse_augment(options["augment"])
    config = TrainConfig(
        name=name, pixel_size_nm=(float(pixel_size_nm[0]), float(pixel_size_nm[1])), classes=tuple(classes), notes={"data_sha256": data_sha256, **dict(notes or {})}, **options
    )
    validate_config(config)
    return config


def default_checkpoint_dir(out_dir: str | os.PathLike, name: str) -> Path:
    """Where ``tilefeet train`` keeps its checkpoint when not told: in the per-user cache (``$TILEFEET_CACHE``
    or ``~/.cache/tilefeet``), keyed by the bundle's absolute path, so rerunning the same command finds
    it and the bundle folder (often inside a repository) never holds optimizer state."""
    from .artifacts import cache_dir

    key = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "train" / f"{name}-{key}"


def record_metrics(bundle_dir: str | os.PathLike, metrics: Mapping[str, Any], *, table: str = "metrics") -> EngineBundle:
    """Merge ``metrics`` (e.g. held-out scores, a nested table per test set) into a bundle's
    ``[metrics]`` table, rewriting engine.toml, and return the reloaded bundle (which proves it valid)."""
    path = Path(bundle_dir) / ENGINE_FILE
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidEngineError(f"{path} does not exist; give the folder of an engine bundle") from None
    doc[table] = {**doc.get(table, {}), **dict(metrics)}
    path.write_text(dump_toml(doc))
    return load_engine(Path(bundle_dir))


def evaluation_metrics(evaluation: Mapping[str, Any], data: str) -> dict[str, Any]:
    """A flat ``[metrics.<name>]`` table from an evaluation (``tilefeet evaluate --json``, or
    ``Evaluation.to_dict()``) of the engine on ``data`` (a description of the test set)."""
    pixel, boundary, inst = evaluation["pixel"], evaluation["boundary"], evaluation.get("instances")
    h, w = evaluation["shape"]
    table: dict[str, Any] = {
        "data": data,
        "pixels": int(h) * int(w),
        "pixel_f1": round(float(pixel["f1"]), 4),
        "pixel_iou": round(float(pixel["iou"]), 4),
        "pixel_precision": round(float(pixel["precision"]), 4),
        "pixel_recall": round(float(pixel["recall"]), 4),
        "boundary_f1": round(float(boundary["f1"]), 4),
        "boundary_tolerance_px": float(boundary["tolerance_px"]),
    }
    if inst and inst.get("adapted_rand_error") is not None:
        table.update(instances=inst["mode"], adapted_rand_error=round(float(inst["adapted_rand_error"]), 4), vi=round(float(inst["vi"]), 4))
    return table


def validate_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train, before any data is touched or a network is built."""
    div = 2**config.depth
    positive = {"steps": config.steps, "batch_size": config.batch_size, "base_channels": config.base_channels,
                "depth": config.depth, "val_every": config.val_every, "tile": config.tile}
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in positive.items() if v < 1]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: must be at least 1")
    if config.crop < div or config.crop % div:
        raise ConfigError(f"--crop {config.crop} must be a multiple of {div} (2 ** --depth {config.depth}), e.g. {max(div, config.crop // div * div)}")
    if config.tile % div:
        raise ConfigError(f"--tile {config.tile} must be a multiple of {div} (2 ** --depth {config.depth})")
    if not 0 <= config.overlap < config.tile:
        raise ConfigError(f"--overlap {config.overlap} must be at least 0 and smaller than --tile {config.tile}")
    if not config.lr > 0:
        raise ConfigError(f"--lr must be positive, got {config.lr}")
    lo, hi = config.scale_jitter
    if not 0 < lo <= hi:
        raise ConfigError(f"--scale-jitter {lo},{hi}: give a zoom range LOW,HIGH with 0 < LOW <= HIGH, e.g. 0.8,1.25 (1,1 turns it off)")
    if not config.classes:
        raise ConfigError("a network needs at least one class")


def check_resumable(saved: Mapping[str, Any], wanted: Mapping[str, Any], ckpt: Path, step: int) -> None:
    """Refuse to resume a checkpoint made with other settings, naming them; or one past ``steps``."""
    keys = sorted((set(saved) | set(wanted)) - set(_RESUMABLE_CHANGES))
    diff = [_describe_change(k, saved.get(k), wanted.get(k)) for k in keys if saved.get(k) != wanted.get(k)]
    if diff:
        raise ConfigError(
            f"checkpoint {ckpt} was made with other settings ({'; '.join(diff)}); rerun with the original "
            f"settings to resume, or delete {ckpt.parent} to start over"
        )
    if step > int(wanted["steps"]):
        raise ConfigError(f"checkpoint {ckpt} is at step {step}, past --steps {wanted['steps']}; give --steps {step} or more")


def _describe_change(key: str, old: Any, new: Any) -> str:
    if key == "notes":
        return "the training data, its split or the parent engine changed"
    return f"{key} was {old!r}, now {new!r}"


def _config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _as_chw(m: np.ndarray, n_classes: int) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim == 2:
        m = m[None]
    if m.shape[0] != n_classes:
        raise ConfigError(f"label image has {m.shape[0]} class planes but {n_classes} classes were declared")
    return (m != 0).astype(np.uint8)


def _pick_device(device: str):
    """CUDA when present for ``auto``; a named device that is missing or misspelt is a one-line error."""
    from .device import resolve_device

    try:
        return resolve_device(device)
    except BackendUnavailableError:
        raise
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def _loss(logits, target, dice_weight: float):
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target)
    if dice_weight <= 0:
        return bce
    p = logits.sigmoid()
    inter = (p * target).sum((0, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum((0, 2, 3)) + target.sum((0, 2, 3)) + 1)
    return bce + dice_weight * dice.mean()


class _CropSampler:
    """Random augmented crops, drawn with one numpy generator (so a resumed run continues the stream)."""

    def __init__(self, images, masks, dataset: Sequence[int], weights: Sequence[float], config: TrainConfig, norm: Normalization, rng: np.random.Generator):
        self.images, self.masks, self.cfg, self.norm, self.rng = images, masks, config, norm, rng
        size = np.array([a.size for a in images], dtype=np.float64)
        d = np.asarray(dataset)
        per_set = np.bincount(d, weights=size, minlength=len(weights))
        # dataset d with probability weights[d] / sum, then its images in proportion to their size
        self.weights = np.asarray(weights, dtype=np.float64)[d] * size / per_set[d]
        self.weights /= self.weights.sum()
        self.tops = [self._top([a for a, k in zip(images, d) if k == i]) for i in d]

    @staticmethod
    def _top(images: Sequence[np.ndarray]) -> float:
        """The value range of a dataset's raw data, which augmentation works in fractions of."""
        return 255.0 if images[0].dtype == np.uint8 else float(max(a.max() for a in images))

    def batch(self):
        import torch

        xs, ys = zip(*(self._one() for _ in range(self.cfg.batch_size)))
        return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys))

    def _one(self) -> tuple[np.ndarray, np.ndarray]:
        import torch
        import torch.nn.functional as F

        cfg, rng = self.cfg, self.rng
        i = rng.choice(len(self.images), p=self.weights)
        img, mask = self.images[i], self.masks[i]
        zoom = math.exp(rng.uniform(math.log(cfg.scale_jitter[0]), math.log(cfg.scale_jitter[1])))
        side = round(cfg.crop * zoom)
        side = min(side, img.shape[0], img.shape[1])
        y0 = rng.integers(0, img.shape[0] - side + 1)
        x0 = rng.integers(0, img.shape[1] - side + 1)
        x = img[y0 : y0 + side, x0 : x0 + side].astype(np.float32)
        y = mask[:, y0 : y0 + side, x0 : x0 + side].astype(np.float32)
        if side != cfg.crop:
            xt = torch.from_numpy(x)[None, None]
            x = F.interpolate(xt, size=(cfg.crop, cfg.crop), mode="bilinear", antialias=side > cfg.crop, align_corners=False)[0, 0].numpy()
            yt = torch.from_numpy(y)[None]
            y = (F.interpolate(yt, size=(cfg.crop, cfg.crop), mode="bilinear", align_corners=False)[0] > 0.5).numpy().astype(np.float32)
        k = int(rng.integers(4))
        x, y = np.rot90(x, k), np.rot90(y, k, axes=(1, 2))
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, :, ::-1]
        x, y = randomize(x, y, cfg.augment, rng, top=self.tops[i])
        x = self.norm.to_network(x).astype(np.float32)
        return np.ascontiguousarray(x), np.ascontiguousarray(y)


#: Pixels of validation (else training) images a new bundle's ``[reference]`` is measured on.
REFERENCE_PIXELS = 1 << 22


def _record_reference(bundle: EngineBundle, images: Sequence[np.ndarray], kind: str) -> EngineBundle:
    """The new bundle with ``[reference]``: what its network outputs on its own data (the
    validation images, else the training images; up to :data:`REFERENCE_PIXELS`), which the
    contrast polarity check of every later run shows beside a section's (:mod:`tilefeet.polarity`)."""
    from .polarity import record_reference

    n, total = _within(images, REFERENCE_PIXELS)
    return record_reference(bundle, list(images[:n]), f"{n} of the engine's own {kind} images, {total} px")


def _within(images: Sequence[np.ndarray], budget: int) -> tuple[int, int]:
    """How many of ``images``, in order, fit in ``budget`` pixels (at least one), and their pixels."""
    n = total = 0
    for img in images:
        if n and total + img.size > budget:
            break
        n, total = n + 1, total + img.size
    return n, total


#: Pixels of validation images a new bundle keeps as its check slices (``[check]``).
CHECK_PIXELS = 1 << 22
#: The folder inside a bundle that holds them.
CHECK_DIR = "check"


def _record_check(bundle: EngineBundle, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> EngineBundle:
    """The new bundle with ``[check]``: its validation images (raw, at the engine's pixel size; up
    to :data:`CHECK_PIXELS`) and the masks of the class with the most foreground in them, copied into
    ``check/``. They are the annotated data the accuracy guard (:mod:`tilefeet.runners.guard`)
    compares a reduced precision with fp32 on, so ``--precision auto`` can choose bf16 (one image or
    more) or int8 (two or more: calibrated on half, judged on the rest) for a trained or fine-tuned
    engine as for the shipped ones; without them it keeps fp32. Nothing is written without
    validation images or foreground."""
    import imageio.v3 as iio

    if not images:
        return bundle
    fg = np.sum([m.reshape(m.shape[0], -1).sum(axis=1) for m in masks], axis=0)
    if not np.any(fg):
        return bundle
    c = int(np.argmax(fg))
    n, total = _within(images, CHECK_PIXELS)
    (bundle.path / CHECK_DIR).mkdir(exist_ok=True)
    names = [(f"{CHECK_DIR}/validation-{i}.tif", f"{CHECK_DIR}/validation-{i}-{c}.png") for i in range(n)]
    for (image_file, label_file), img, m in zip(names, images, masks):
        iio.imwrite(bundle.path / image_file, np.ascontiguousarray(img))  # TIFF: any dtype, read back exactly
        iio.imwrite(bundle.path / label_file, (m[c] > 0).astype(np.uint8) * 255)
    path = bundle.path / ENGINE_FILE
    doc = tomllib.loads(path.read_text())
    doc["check"] = {"images": [a for a, _ in names], "labels": [b for _, b in names], "class": bundle.classes[c],
                    "data": f"{n} of the engine's own validation images, {total} px"}
    path.write_text(dump_toml(doc))
    return load_engine(bundle.path)


def validation_f1(model, images, masks, dataset: Sequence[int], n_datasets: int, norm: Normalization, device) -> list[list[float]]:
    """Pixel F1 per dataset and class at threshold 0.5, of whole validation images (padded to the
    divisor), as :func:`tilefeet.metrics.pixel_metrics` scores it; a dataset without validation images scores NaN."""
    import torch

    model.eval()
    counts = [[PixelMetrics(0, 0, 0, 0) for _ in range(model.head.out_channels)] for _ in range(n_datasets)]
    with torch.inference_mode():
        for img, m, d in zip(images, masks, dataset):
            h, w = img.shape
            div = 2**model.depth
            ph, pw = -h % div + 32, -w % div + 32
            x = torch.from_numpy(np.pad(norm.to_network(img.astype(np.float32)), ((16, ph - 16), (16, pw - 16)), mode="symmetric"))
            x = x[None, None].to(device, memory_format=torch.channels_last).float()
            p = torch.sigmoid(model(x))[0, :, 16 : 16 + h, 16 : 16 + w].cpu().numpy() >= 0.5
            for c, (pc, tc) in enumerate(zip(p, m.astype(bool))):
                a, b = counts[d][c], pixel_metrics(pc, tc)
                counts[d][c] = PixelMetrics(a.tp + b.tp, a.fp + b.fp, a.fn + b.fn, a.tn + b.tn)
    seen = set(dataset)
    return [[c.f1 if d in seen else float("nan") for c in per_set] for d, per_set in enumerate(counts)]


def evaluate_f1(model, images, masks, norm: Normalization, device) -> list[float]:
    """Pixel F1 per class at threshold 0.5 over all ``images`` (one dataset)."""
    return validation_f1(model, images, masks, [0] * len(images), 1, norm, device)[0]


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
