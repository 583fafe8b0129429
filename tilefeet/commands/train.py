"""``tilefeet train``: a new engine bundle from annotated OME-Zarr, from scratch or fine-tuned from another.

    tilefeet convert slices/ train.ome.zarr --stack --pixel-size 5nm
    tilefeet convert masks/ train.ome.zarr --labels mito
    tilefeet train train.ome.zarr --labels train.ome.zarr/labels/mito --out engines/mito --val-slices 24-26

    # fine-tune a shipped engine on a few annotated tiles of your own data (minutes on a CPU)
    tilefeet train mine.ome.zarr --labels mine.ome.zarr/labels/membrane --out engines/my-membrane --from isbi-membrane

    # several datasets, each resampled to the engine's pixel size, drawn 2 : 1
    tilefeet train --data a.ome.zarr:a.ome.zarr/labels/membrane:2 --data b.ome.zarr:b.ome.zarr/labels/membrane --out engines/ab

Reading and splitting live in :mod:`tilefeet.training_data`, training in :mod:`tilefeet.train`;
this module maps flags onto them one to one and decides what happens to an earlier run's
checkpoint (continue it with ``--resume``, or refuse) and to an existing bundle (``--overwrite``).
Whatever about the output can be refused is refused before the data are read; Ctrl-C says where
the checkpoint is and how to continue (``--resume``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..augment import ALL
from ..train import FINETUNE_DEFAULTS, TrainConfig

#: TrainConfig's defaults, so each flag's default has one home
_D = TrainConfig(name="", pixel_size_nm=(1.0, 1.0))


def _default(name: str) -> str:
    """Help text for an option whose default differs with --from."""
    value = getattr(_D, name)
    if name in FINETUNE_DEFAULTS:
        return f" (default {_show(value)}; {_show(FINETUNE_DEFAULTS[name])} with --from)"
    return f" (default {_show(value)}; the parent's with --from)"


def _show(value: object) -> str:
    """A default as the user types it: ``5e-4``, ``300``, ``all``, ``legacy``."""
    if isinstance(value, tuple):
        return "all" if value == ALL else ",".join(value)
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)


def train_cmd(
    image: Optional[Path] = typer.Argument(
        None, help="OME-Zarr image: one 2-D section or a (z, y, x) stack (tilefeet convert --stack). Optional with --data."
    ),
    labels: list[Path] = typer.Option(
        [], "--labels", "-l", help="Label image of a class (e.g. IMAGE/labels/mito), same shape; repeat for several classes."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write, e.g. engines/NAME."),
    data: list[str] = typer.Option(
        [], "--data", help="Another dataset IMAGE:LABELS[:WEIGHT] (label images of several classes joined by +); repeatable. "
        "Each is resampled to the engine's pixel size; WEIGHT (default 1) is how often crops come from it relative to the others.",
    ),
    parent: Optional[str] = typer.Option(
        None, "--from", help="Fine-tune this engine (name or folder): its weights, architecture, classes and pixel size."
    ),
    new_head: bool = typer.Option(False, "--new-head", help="With --from: a new output layer for classes the parent does not have."),
    freeze_encoder: bool = typer.Option(False, "--freeze-encoder", help="With --from: train the decoder only."),
    name: Optional[str] = typer.Option(None, help="Engine name (default: the --out folder's name)."),
    class_names: Optional[list[str]] = typer.Option(
        None, "--class", "-c", help="Class name per --labels, in order (default: each label image's name)."
    ),
    pixel_size: Optional[str] = typer.Option(None, "--pixel-size", help="Pixel size of IMAGE, e.g. 5nm (default: from its metadata)."),
    engine_pixel_size: Optional[str] = typer.Option(
        None, "--engine-pixel-size", help="Pixel size the engine works at (default: the first dataset's; the parent's with --from)."
    ),
    val_slices: Optional[str] = typer.Option(None, "--val-slices", help="z-slices of a stack held out for validation, e.g. 24,25,26 or 24-26."),
    val_fraction: Optional[float] = typer.Option(
        None, "--val-fraction", help="Hold out the last fraction of the slices (stack) or of the longer axis (2-D image); default 0.1, 0 = none."
    ),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps in all; more with --resume extends a finished run." + _default("steps")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Crops per step." + _default("batch_size")),
    crop: int = typer.Option(_D.crop, help="Crop side in pixels, a multiple of 2 ** depth."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW, warm-up then cosine decay)." + _default("lr")),
    base_channels: Optional[int] = typer.Option(None, "--base-channels", help="U-Net channels at full resolution." + _default("base_channels")),
    depth: Optional[int] = typer.Option(None, help="U-Net down-sampling steps." + _default("depth")),
    scale_jitter: str = typer.Option(
        ",".join(map("{:g}".format, _D.scale_jitter)), "--scale-jitter", help="Random zoom range LOW,HIGH (1 or 1,1 = off)."
    ),
    augment: Optional[str] = typer.Option(
        None, "--augment", help="Domain randomization: all, none, legacy, or groups of intensity, noise, blur, elastic, artefacts "
        "(e.g. all,-elastic)." + _default("augment"),
    ),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="Validate (and save the checkpoint) every N steps." + _default("val_every")),
    seed: int = typer.Option(_D.seed, help="Random seed (weights, crops, augmentation)."),
    device: str = typer.Option(_D.device, help="auto (CUDA when present), cpu, cuda, cuda:N."),
    checkpoint_dir: Optional[Path] = typer.Option(
        None, "--checkpoint-dir", help="Checkpoint folder (default: in $TILEFEET_CACHE or the per-user cache, keyed by --out)."
    ),
    resume: bool = typer.Option(False, help="Continue the run whose checkpoint is in --checkpoint-dir (same settings)."),
    overwrite: bool = typer.Option(False, help="Replace a bundle that already exists in --out."),
    tile: Optional[int] = typer.Option(None, help="Inference tile recommended in the bundle." + _default("tile")),
    overlap: Optional[int] = typer.Option(None, help="Inference overlap recommended in the bundle." + _default("overlap")),
    description: str = typer.Option(_D.description, help="One line describing the engine (written to engine.toml)."),
    max_pixels: int = typer.Option(1 << 28, "--max-pixels", help="Refuse images larger than this (they are read into memory)."),
) -> None:
    """Train a U-Net on annotated OME-Zarr images or stacks (or fine-tune an engine) and write it as an engine bundle."""
    from .. import console
    from ..errors import Interrupted
    from ..train import CHECKPOINT, default_checkpoint_dir, train_from_zarr
    from ..training_data import DataSpec, ValidationSplit

    name = name or out.name
    split = ValidationSplit.create(val_slices, val_fraction)
    specs = [DataSpec.parse(d) for d in data]
    ckpt_dir = checkpoint_dir or default_checkpoint_dir(out, name)
    check_outputs(out, ckpt_dir, resume=resume, overwrite=overwrite)
    console.echo(f"checkpoints: {ckpt_dir}" + ("" if (ckpt_dir / CHECKPOINT).is_file() else " (starting at step 0)"))
    t0 = time.perf_counter()
    try:
        result = train_from_zarr(
            image,
            labels,
            out,
            data=specs,
            parent=parent,
            new_head=new_head,
            name=name,
            classes=class_names or None,
            pixel_size=pixel_size,
            engine_pixel_size=engine_pixel_size,
            split=split,
            checkpoint_dir=ckpt_dir,
            progress=console.progress_enabled(),
            max_pixels=max_pixels,
            steps=steps,
            batch_size=batch_size,
            crop=crop,
            lr=lr,
            base_channels=base_channels,
            depth=depth,
            scale_jitter=parse_scale_jitter(scale_jitter),
            augment=augment,
            freeze_encoder=freeze_encoder,
            val_every=val_every,
            seed=seed,
            device=device,
            tile=tile,
            overlap=overlap,
            description=description,
        )
    except KeyboardInterrupt:  # before the training loop (reading the data, scoring the parent): nothing was written
        raise Interrupted(f"training interrupted before its first step; nothing was written to {out}") from None
    f1 = ", ".join(f"{c} {v:.4f}" for c, v in zip(result.bundle.classes, result.best_val_f1))
    line = f"wrote {out} in {time.perf_counter() - t0:.0f} s: best validation F1 {f1} at step {result.best_step}"
    first = result.history[0] if result.history and result.history[0]["step"] == 0 else None
    if first is not None:
        line += " (the parent scored " + ", ".join(f"{v:.4f}" for v in first["val_f1"]) + ")"
    console.echo(line)


def check_outputs(out: Path, ckpt_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """An earlier run's checkpoint continues only with --resume; an existing bundle is replaced only
    with --overwrite or --resume (whose run was writing it); and everything
    :func:`tilefeet.train.check_bundle_output` refuses (a read-only or refused path, a file, a folder
    of other files, an unwritable checkpoint folder), before any data is read."""
    from ..engine import ENGINE_FILE
    from ..errors import OutputExistsError
    from ..train import CHECKPOINT, check_bundle_output

    if (ckpt_dir / CHECKPOINT).is_file() and not resume:
        raise OutputExistsError(
            f"{ckpt_dir} holds the checkpoint of an earlier run; pass --resume to continue it, or delete {ckpt_dir} to start over"
        )
    if (out / ENGINE_FILE).is_file() and not (overwrite or resume):
        raise OutputExistsError(f"{out} already holds an engine bundle; pass --overwrite to replace it, or choose another --out")
    check_bundle_output(out, ckpt_dir)  # writable, not a file, not someone else's folder


def parse_scale_jitter(text: str) -> tuple[float, float]:
    """``"0.8,1.25"`` → (0.8, 1.25); ``"1"`` or ``"off"`` → (1, 1)."""
    from ..errors import ConfigError

    if text.strip().lower() in ("off", "none", "1"):
        return (1.0, 1.0)
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--scale-jitter takes LOW,HIGH zoom factors, e.g. 0.8,1.25 (or 1 for none); got {text!r}") from None
    return (lo, hi)
