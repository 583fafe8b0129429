"""Train a segmentation network and write it as an engine bundle (``tilefeet train``).

Data: 2-D raw images (any integer or float dtype) with per-class binary masks ``(C, H, W)`` at
the engine's pixel size. Training samples random crops with augmentation that covers what
differs between microscopes: flips and 90° rotations, scale jitter (so a pixel size that is a few
percent off does not matter), and intensity jitter (gamma, contrast, brightness, noise, blur).
Inputs are normalized exactly as inference normalizes them (:class:`tilefeet.engine.Normalization`
in ``meanstd`` mode, from the training data's statistics, recorded in the bundle with a reference
histogram). Checkpoints make an interrupted run resumable; the best validation checkpoint becomes
the bundle.

:func:`train_engine` trains on arrays; :func:`train_from_zarr` (behind ``tilefeet train``) reads an
annotated OME-Zarr image or stack and its label images first (:mod:`tilefeet.training_data`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .engine import ENGINE_FILE, EngineBundle, Normalization, dump_toml, load_engine, write_bundle
from .errors import BackendUnavailableError, ConfigError, InvalidEngineError
from .intensity import training_normalization
from .training_data import MAX_TRAINING_PIXELS, ValidationSplit, load_training_set

#: Settings that only label the bundle (or say how long to train), so a checkpoint made with other
#: values still resumes: more ``steps`` extends a finished run.
_RESUMABLE_CHANGES = ("steps", "description", "tile", "overlap")


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
    intensity_jitter: bool = True
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


def train_engine(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    out_dir: Path,
    config: TrainConfig,
    *,
    val_images: Sequence[np.ndarray] = (),
    val_masks: Sequence[np.ndarray] = (),
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    training_info: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train, validate every ``val_every`` steps, and write the best network as a bundle in ``out_dir``.

    ``masks[i]`` is ``(C, H, W)`` (or ``(H, W)`` for one class), non-zero inside the class.
    With ``checkpoint_dir``, the run saves its state there (at every validation and at the end) and
    resumes from it when restarted; a checkpoint made with other settings is refused, except for
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
    for a, m in zip(images + val_images, masks + val_masks):
        if a.ndim != 2 or a.shape != m.shape[1:]:
            raise ConfigError(f"image of shape {a.shape} does not match its label image of shape {m.shape[1:]}")
    validate_config(config)
    if not images:
        raise ConfigError("no training images")
    if min(min(a.shape) for a in images) < 16:
        raise ConfigError("training images must be at least 16 pixels on each side")

    device = _pick_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    norm = training_normalization(images)
    model = UNet2d(1, len(config.classes), config.base_channels, config.depth).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)

    def lr_factor(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history: list[dict] = []
    best = {"f1": [-1.0], "step": 0, "state": None}
    start = 0

    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None
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

    sampler = _CropSampler(images, masks, config, norm, rng)
    bar = _progress(config.steps, start, progress)
    t0 = time.perf_counter()
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
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % config.val_every == 0 or done == config.steps:
            f1 = evaluate_f1(model, val_images, val_masks, norm, device) if val_images else [float("nan")]
            history.append({"step": done, "loss": float(loss.item()), "val_f1": f1, "seconds": time.perf_counter() - t0})
            score = float(np.nanmean(f1)) if val_images else float(done)
            if score >= float(np.nanmean(best["f1"])) or not val_images:
                best = {"f1": f1, "step": done, "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            if ckpt is not None:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                tmp = ckpt.with_suffix(".tmp")
                torch.save(
                    {
                        "config": _config_dict(config),
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(),
                        "history": history,
                        "best": best,
                        "step": done,
                    },
                    tmp,
                )
                tmp.replace(ckpt)  # atomic: a crash mid-save keeps the previous checkpoint
    bar.close()

    arch = {"name": "unet2d", "base_channels": config.base_channels, "depth": config.depth}
    bundle = write_bundle(
        Path(out_dir),
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
            **dict(training_info or {}),
        },
    )
    (Path(out_dir) / "training_history.json").write_text(json.dumps(history, indent=1))
    return TrainResult(bundle, int(best["step"]), list(best["f1"]), history)


def train_from_zarr(
    image: str | os.PathLike,
    labels: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    classes: Sequence[str] | None = None,
    pixel_size: str | float | tuple | None = None,
    split: ValidationSplit = ValidationSplit(),
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    max_pixels: int = MAX_TRAINING_PIXELS,
    **options: Any,
) -> TrainResult:
    """Train an engine from an annotated OME-Zarr image or (z, y, x) stack and one label image per class.

    ``options`` are :class:`TrainConfig` fields (``steps``, ``crop``, ``base_channels``, ...); the
    pixel size comes from the image's metadata unless ``pixel_size`` overrides it; ``split`` chooses
    the validation slices (or region). The data's fingerprint is part of the checkpoint's settings,
    so a resumed run refuses other data or another split.
    """
    data = load_training_set(image, labels, classes=classes, pixel_size=pixel_size, split=split, max_pixels=max_pixels)
    config = make_config(name or Path(out_dir).name, data.pixel_size_nm, data.classes, data.fingerprint(), **options)
    return train_engine(
        data.images,
        data.masks,
        Path(out_dir),
        config,
        val_images=data.val_images,
        val_masks=data.val_masks,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
        progress=progress,
        training_info=data.provenance,
    )


def make_config(name: str, pixel_size_nm: tuple[float, float], classes: Sequence[str], data_sha256: str, **options: Any) -> TrainConfig:
    """A :class:`TrainConfig` from keyword options, refusing names it does not have."""
    known = {f.name for f in fields(TrainConfig)} - {"name", "pixel_size_nm", "classes", "notes"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "scale_jitter" in options:
        options["scale_jitter"] = tuple(float(v) for v in options["scale_jitter"])
    config = TrainConfig(name=name, pixel_size_nm=tuple(pixel_size_nm), classes=tuple(classes), notes={"data_sha256": data_sha256}, **options)
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
        return "the training data or its split changed"
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

    def __init__(self, images, masks, config: TrainConfig, norm: Normalization, rng: np.random.Generator):
        self.images, self.masks, self.cfg, self.norm, self.rng = images, masks, config, norm, rng
        self.weights = np.array([a.size for a in images], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.max_value = 255.0 if images[0].dtype == np.uint8 else float(max(a.max() for a in images))

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
        k = rng.integers(4)
        x, y = np.rot90(x, k), np.rot90(y, k, axes=(1, 2))
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, :, ::-1]
        if cfg.intensity_jitter:
            x = self._jitter(x)
        x = self.norm.to_network(x).astype(np.float32)
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    def _jitter(self, x: np.ndarray) -> np.ndarray:
        """Contrast, brightness, gamma, blur and noise, in raw units (so normalization follows as at inference)."""
        rng, top = self.rng, self.max_value
        u = np.clip(x / top, 0, 1)
        u = u ** math.exp(rng.uniform(-0.35, 0.35))
        mean = u.mean()
        u = (u - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-0.1, 0.1)
        if rng.random() < 0.3:
            from scipy.ndimage import gaussian_filter

            u = gaussian_filter(u, rng.uniform(0.3, 1.2))
        if rng.random() < 0.5:
            u = u + rng.normal(0, rng.uniform(0.0, 0.06), u.shape)
        return (np.clip(u, 0, 1) * top).astype(np.float32)


def evaluate_f1(model, images, masks, norm: Normalization, device) -> list[float]:
    """Pixel F1 per class at threshold 0.5 of whole validation images (padded to the divisor)."""
    import torch

    model.eval()
    tp = fp = fn = None
    with torch.inference_mode():
        for img, m in zip(images, masks):
            h, w = img.shape
            div = 2**model.depth
            ph, pw = -h % div + 32, -w % div + 32
            x = torch.from_numpy(np.pad(norm.to_network(img.astype(np.float32)), ((16, ph - 16), (16, pw - 16)), mode="symmetric"))
            x = x[None, None].to(device, memory_format=torch.channels_last).float()
            p = torch.sigmoid(model(x))[0, :, 16 : 16 + h, 16 : 16 + w].cpu().numpy() >= 0.5
            t = m.astype(bool)
            a, b, c = (p & t).sum((1, 2)), (p & ~t).sum((1, 2)), (~p & t).sum((1, 2))
            tp, fp, fn = (a, b, c) if tp is None else (tp + a, fp + b, fn + c)
    return [float(2 * a / max(2 * a + b + c, 1)) for a, b, c in zip(tp, fp, fn)]


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
