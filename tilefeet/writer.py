"""Writing the output OME-Zarr: probabilities as a multiscale image, ``labels/<class>`` as NGFF labels.

Layout (NGFF 0.5, zarr v3)::

    out.ome.zarr/                 multiscales "probabilities", axes c, y, x (nm); provenance in metadata
      0/ 1/ 2/ ...                (classes, y, x) uint8 0..255 (or float); level k is 2^k × coarser
      labels/                     {"labels": [class, ...]}
        <class>/                  multiscales + image-label; (1, y, x) uint8, 1 = class

Safety: everything is written into a staging folder beside the output (``out.ome.zarr.partial``)
and renamed into place only when complete, so an existing output is never half-overwritten and a
crash never leaves a broken store at the output path. Blocks own whole chunks (no two tasks write
one chunk) and record their completion *after* their data, so ``--resume`` redoes exactly the
blocks that were not finished and the result does not depend on where the crash happened.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, OutputExistsError
from .geometry import BlockGrid, Box, Pair
from .ngff import LABEL_COLORS, compressor, label_name, multiscales, pyramid_shapes
from .plan import Plan

STATE_DIR = ".tilefeet"
def check_paths(inp: str | None, out: Path) -> None:
    """Refuse an output that is, contains, or lies inside the input."""
    if not inp:
        return
    a, b = Path(inp).resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ConfigError(f"output {out} overlaps the input {inp}; write the output somewhere else")


@dataclass
class OutputStore:
    """An output being written (in its staging folder) and its completion records."""

    path: Path  #: final output path
    plan: Plan
    done: set[str]

    @property
    def staging(self) -> Path:
        return staging_path(self.path)

    # ---- setup

    @classmethod
    def prepare(cls, path: str | os.PathLike, plan: Plan, *, overwrite: bool = False, resume: bool = False) -> OutputStore:
        """Check the output path, then create (or reopen, with ``resume``) the staging store."""
        path = Path(path)
        check_paths(plan.image.source if plan.image.version else None, path)
        staging = staging_path(path)
        if path.exists() and not (overwrite or resume):
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it (it is kept until the new output is complete)")
        if staging.exists():
            if resume:
                state = _read_state(staging)
                if state.get("fingerprint") != plan.fingerprint():
                    raise OutputExistsError(
                        f"{staging} was started with other settings, input or engine; rerun with the same options to "
                        f"resume it, or pass --overwrite to start over"
                    )
                done = {p.name for p in (staging / STATE_DIR / "done").iterdir()}
                return cls(path, plan, done)
            if not overwrite:
                raise OutputExistsError(
                    f"an interrupted run left {staging}; pass --resume to continue it or --overwrite to start over"
                )
            shutil.rmtree(staging)
        if path.exists() and resume and not overwrite:
            raise OutputExistsError(f"{path} is already complete; nothing to resume (pass --overwrite to redo it)")
        if path.exists() and not path.is_dir():
            raise OutputExistsError(f"{path} exists and is not a folder; remove it or choose another output path")
        store = cls(path, plan, set())
        store._create()
        return store

    def _create(self) -> None:
        import zarr

        plan, s = self.plan, self.plan.settings
        staging = self.staging
        staging.parent.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(staging), mode="w", zarr_format=3)
        n_classes = len(plan.engine.classes)
        shapes = pyramid_shapes(plan.output.shape, s.chunk_size)
        compressor_ = compressor()
        for k, (h, w) in enumerate(shapes):
            root.create_array(
                str(k),
                shape=(n_classes, h, w),
                chunks=(1, *_clip(s.chunk_size, (h, w))),
                shards=(n_classes, *s.shard_size) if s.shard_size and k == 0 else None,
                dtype=s.output_dtype,
                compressors=compressor_,
                fill_value=0,
                dimension_names=["c", "y", "x"],
            )
        root.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [_multiscales("probabilities", plan, len(shapes), _provenance(plan))],
            "omero": {
                "channels": [
                    {
                        "label": c,
                        "color": "FFFFFF",
                        "active": True,
                        "window": {"start": 0, "end": _max_value(s.output_dtype), "min": 0, "max": _max_value(s.output_dtype)},
                    }
                    for c in plan.engine.classes
                ],
                "rdefs": {"model": "greyscale"},
            },
        }
        if s.labels:
            labels = root.create_group("labels")
            names = [label_name(c) for c in plan.engine.classes]
            labels.attrs["ome"] = {"version": "0.5", "labels": names}
            for i, (cls, name) in enumerate(zip(plan.engine.classes, names)):
                g = labels.create_group(name)
                for k, (h, w) in enumerate(shapes):
                    g.create_array(
                        str(k),
                        shape=(1, h, w),
                        chunks=(1, *_clip(s.chunk_size, (h, w))),
                        shards=(1, *s.shard_size) if s.shard_size and k == 0 else None,
                        dtype="uint8",
                        compressors=compressor_,
                        fill_value=0,
                        dimension_names=["c", "y", "x"],
                    )
                rgb = LABEL_COLORS[i % len(LABEL_COLORS)]
                g.attrs["ome"] = {
                    "version": "0.5",
                    "multiscales": [_multiscales(name, plan, len(shapes), None, method="threshold of the mean probability")],
                    "image-label": {
                        "version": "0.5",
                        "colors": [{"label-value": 1, "rgba": [*rgb, 255]}],
                        "properties": [{"label-value": 1, "class": cls, "threshold": s.threshold}],
                        "source": {"image": "../../"},
                    },
                }
        state = staging / STATE_DIR
        (state / "done").mkdir(parents=True, exist_ok=True)
        (state / "plan.json").write_text(
            json.dumps(
                {
                    "fingerprint": self.plan.fingerprint(),
                    "levels": len(shapes),
                    "backend": s.backend,
                    "backend_options": [list(kv) for kv in s.backend_options],
                }
            )
        )

    # ---- writing

    def write_block(self, out: Any, record: str) -> None:
        """Write one block's probabilities and labels to level 0, then its completion record."""
        import zarr

        root: Any = zarr.open_group(str(self.staging), mode="r+")
        b = out.box
        root["0"][:, b.y0 : b.y1, b.x0 : b.x1] = out.probabilities
        if out.labels is not None:
            for i, cls in enumerate(self.plan.engine.classes):
                root[f"labels/{label_name(cls)}/0"][:, b.y0 : b.y1, b.x0 : b.x1] = out.labels[i : i + 1]
        self.mark_done(record)

    def discard_if_nothing_done(self) -> None:
        """Remove the staging folder of a run that failed before finishing any block (and did not
        resume an earlier one): there is nothing in it to resume."""
        done = self.staging / STATE_DIR / "done"
        if not self.done and self.staging.exists() and not (done.exists() and any(done.iterdir())):
            shutil.rmtree(self.staging, ignore_errors=True)

    def mark_done(self, record: str) -> None:
        (self.staging / STATE_DIR / "done" / record).touch()

    def pyramid_tasks(self, level: int) -> list[tuple[str, Box]]:
        """The (record, box) of each block of pyramid ``level`` (≥ 1), in that level's pixels."""
        import zarr

        _, h, w = zarr.open_array(str(self.staging / str(level)), mode="r").shape
        # Half a block per task, in whole chunks (pyramid levels are chunked, not sharded): a task
        # then reads one block's worth of the level below, not four.
        s = self.plan.settings
        side = tuple(max(c, b // 2 // c * c) for b, c in zip(s.block_size, s.chunk_size))
        grid = BlockGrid((h, w), side)
        return [(f"p{level}_{by}_{bx}", grid.box(by, bx)) for by, bx in grid]

    def levels(self) -> int:
        return int(_read_state(self.staging)["levels"])

    def write_pyramid_block(self, level: int, box: Box, record: str) -> None:
        """Level ``level`` over ``box`` from level ``level - 1``: 2×2 means of the probabilities; labels
        are the mean probability thresholded (so every label level agrees with its probability level)."""
        import zarr

        root: Any = zarr.open_group(str(self.staging), mode="r+")
        s = self.plan.settings
        src = root[str(level - 1)]
        hs, ws = src.shape[1:]
        region = Box(2 * box.y0, 2 * box.x0, min(2 * box.y1, hs), min(2 * box.x1, ws))
        mean = downsample_mean(np.asarray(src[:, region.y0 : region.y1, region.x0 : region.x1]), box.shape)
        scale = 255.0 if s.output_dtype == "uint8" else 1.0
        if s.output_dtype == "uint8":
            root[str(level)][:, box.y0 : box.y1, box.x0 : box.x1] = np.round(mean).astype(np.uint8)
        else:
            root[str(level)][:, box.y0 : box.y1, box.x0 : box.x1] = mean.astype(s.output_dtype)
        if s.labels:
            for i, cls in enumerate(self.plan.engine.classes):
                lab = (mean[i : i + 1] >= s.threshold * scale).astype(np.uint8)
                root[f"labels/{label_name(cls)}/{level}"][:, box.y0 : box.y1, box.x0 : box.x1] = lab
        self.mark_done(record)

    def finalize(self) -> Path:
        """Drop the completion records and move the finished store into place (replacing an old one)."""
        staging = self.staging
        shutil.rmtree(staging / STATE_DIR, ignore_errors=True)
        old = None
        if self.path.exists():
            old = self.path.with_name(self.path.name + f".old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(staging, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path


def staged_settings(path: Path) -> dict | None:
    """What an interrupted run into ``path`` recorded (its backend, ...), or None."""
    state = _read_state(staging_path(path))
    return state or None


def staging_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".partial")


def downsample_mean(a: np.ndarray, out_shape: Pair) -> np.ndarray:
    """2×2 means (float32) of ``(C, h, w)`` into ``(C, *out_shape)``; an odd last row/column repeats."""
    _, h, w = a.shape
    H, W = 2 * out_shape[0], 2 * out_shape[1]
    if (h, w) != (H, W):
        a = np.pad(a, ((0, 0), (0, H - h), (0, W - w)), mode="edge")
    if a.dtype == np.uint8:  # integer sums are exact: the same bits as the float path, a quarter of the memory
        total = a[:, 0::2, 0::2].astype(np.uint16) + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2]
        return total.astype(np.float32) * np.float32(0.25)
    a = a.astype(np.float32)
    return (a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2]) * np.float32(0.25)


def _read_state(staging: Path) -> dict:
    try:
        return json.loads((staging / STATE_DIR / "plan.json").read_text())
    except (OSError, ValueError):
        return {}


def _clip(chunk: Pair, shape: Pair) -> Pair:
    return (max(1, min(chunk[0], shape[0])), max(1, min(chunk[1], shape[1])))


def _max_value(dtype: str) -> float:
    return 255 if dtype == "uint8" else 1.0


def _multiscales(name: str, plan: Plan, n_levels: int, metadata: dict | None, method: str = "mean") -> dict:
    return multiscales(
        name, plan.output.pixel_size_nm, n_levels, origin_nm=plan.output.origin_nm, lead_axes=[{"name": "c", "type": "channel"}],
        method=method, metadata=metadata,
    )


def _provenance(plan: Plan) -> dict:
    from . import __version__

    s = plan.summary()
    return {
        "method": "tilefeet.segment",
        "version": __version__,
        "engine": plan.engine.name,
        "engine_sha256": plan.engine.fingerprint,
        "input": plan.image.source,
        "input_level": plan.level,
        "scale_factor": list(s["scale_factor"]),
        "network_pixel_size_nm": list(plan.network.pixel_size_nm),
        "intensity": plan.intensity.mode,
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in plan.settings.__dict__.items()
            if k not in ("blocks_in_flight", "device")
        },
    }
