"""Writing the output OME-Zarr: probabilities as a multiscale image, ``labels/<class>`` as NGFF labels.

Layout (NGFF 0.5, zarr v3)::

    out.ome.zarr/                 multiscales "probabilities", axes c, y, x (nm); provenance in metadata
      0/ 1/ 2/ ...                (classes, y, x) uint8 0..255 (or float); level k is 2^k × coarser
      labels/                     {"labels": [class, ...]}
        <class>/                  multiscales + image-label; (y, x) uint8, 1 = class
      uncertainty/                (--uncertainty) an image of its own: (y, x) uint8, the disagreement
                                  of the test-time augmentations, 0 (agree) .. 255 (split evenly)

Safety: everything is written into a staging folder beside the output (``out.ome.zarr.partial``)
and moved into place only when complete (:mod:`tilefeet.storage`), so an existing output is never
half-overwritten and a crash never leaves a broken store at the output path. Blocks own whole
chunks (no two tasks write one chunk) and record their completion *after* their data, so
``--resume`` redoes exactly the blocks that were not finished and the result does not depend on
where the crash happened. The completion records (``.tilefeet/done/<block>``) hold the backend
that computed the block (and its count of uncertain pixels); the finished output's provenance
lists them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, OutputExistsError, OutputWriteError
from .geometry import BlockGrid, Box, Pair
from .ngff import LABEL_COLORS, add_label, create_levels, image_metadata, label_metadata, label_name, multiscales, pyramid_shapes
from .plan import Plan
from .storage import os_error, recover, replace_dir, staging_path

STATE_DIR = ".tilefeet"
#: An output pixel counts as uncertain (for the section's summary) at this disagreement (0..1).
UNCERTAIN_AT = 0.25


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
    done: set[str] = field(default_factory=set)
    runner: dict = field(default_factory=dict)  #: the runner spec as recorded (backend, options, ...)

    @property
    def staging(self) -> Path:
        return staging_path(self.path)

    @property
    def shapes(self) -> list[Pair]:
        """Pyramid level shapes: a pure function of the output grid and chunk size."""
        return pyramid_shapes(self.plan.output.shape, self.plan.settings.chunk_size)

    # ---- setup

    @classmethod
    def prepare(
        cls, path: str | os.PathLike, plan: Plan, *, runner: dict | None = None, overwrite: bool = False, resume: bool = False
    ) -> OutputStore:
        """Check the output path, then create (or reopen, with ``resume``) the staging store."""
        path = Path(path)
        recover(path)
        check_paths(plan.image.source if plan.image.version else None, path)
        staging = staging_path(path)
        if path.exists() and not (overwrite or resume):
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it (it is kept until the new output is complete)")
        if (path / STATE_DIR).exists() and not staging.exists():
            shutil.rmtree(path / STATE_DIR, ignore_errors=True)  # a finalize interrupted after its rename
        if staging.exists() and not read_state(staging):
            shutil.rmtree(staging)  # a run that died while creating it: nothing in it to resume
        if staging.exists():
            if resume:
                state = read_state(staging)
                differs = describe_difference(state, plan_state(plan))
                if differs:
                    raise OutputExistsError(
                        f"{staging} was started with {differs}; rerun with the same options to resume it, "
                        f"or pass --overwrite to start over"
                    )
                done = {p.name for p in (staging / STATE_DIR / "done").iterdir()}
                return cls(path, plan, done, dict(state.get("runner") or runner or {}))
            if not overwrite:
                raise OutputExistsError(
                    f"an interrupted run left {staging}; pass --resume to continue it or --overwrite to start over"
                )
            shutil.rmtree(staging)
        if path.exists() and resume and not overwrite:
            raise OutputExistsError(f"{path} is already complete; nothing to resume (pass --overwrite to redo it)")
        if path.exists() and not path.is_dir():
            raise OutputExistsError(f"{path} exists and is not a folder; remove it or choose another output path")
        store = cls(path, plan, set(), dict(runner or {}))
        try:
            store._create()
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise os_error(e, path) from None
        return store

    def _create(self) -> None:
        import zarr

        plan, s = self.plan, self.plan.settings
        self.staging.parent.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(self.staging), mode="w", zarr_format=3)
        classes = plan.engine.classes
        shapes = self.shapes
        create_levels(
            root,
            [(len(classes), h, w) for h, w in shapes],
            chunks=(1, *s.chunk_size),
            shards=(len(classes), *s.shard_size) if s.shard_size else None,
            dtype=s.output_dtype,
            dimension_names=["c", "y", "x"],
        )
        top = _max_value(s.output_dtype)
        window = {"start": 0, "end": top, "min": 0, "max": top}
        root.attrs.update(
            image_metadata(
                self._multiscales("probabilities", len(shapes), _provenance(plan, self.runner), lead=True),
                channels=[{"label": c, "color": "FFFFFF", "active": True, "window": window} for c in classes],
            )
        )
        if s.labels:
            for i, cls in enumerate(classes):
                name = label_name(cls)
                g = root.create_group(f"labels/{name}")
                create_levels(g, shapes, chunks=s.chunk_size, shards=s.shard_size, dtype="uint8", dimension_names=["y", "x"])
                g.attrs.update(
                    label_metadata(
                        self._multiscales(name, len(shapes), None, method="threshold of the mean probability"),
                        colors=[{"label-value": 1, "rgba": [*LABEL_COLORS[i % len(LABEL_COLORS)], 255]}],
                        properties=[{"label-value": 1, "class": cls, "threshold": s.threshold}],
                    )
                )
                add_label(root, name)
        if s.uncertainty:
            g = root.create_group("uncertainty")
            create_levels(g, shapes, chunks=s.chunk_size, shards=s.shard_size, dtype="uint8", dimension_names=["y", "x"])
            g.attrs.update(
                image_metadata(
                    self._multiscales("uncertainty", len(shapes), {
                        "method": "tilefeet.segment --uncertainty",
                        "description": "twice the standard deviation of the test-time augmentations' probabilities, "
                        "averaged over classes, as 0..255",
                        "tta": s.tta,
                        "uncertain_at": UNCERTAIN_AT,
                    }),
                    channels=[{"label": "uncertainty", "color": "FF00FF", "active": True,
                               "window": {"start": 0, "end": 255, "min": 0, "max": 255}}],
                )
            )
        state = self.staging / STATE_DIR
        (state / "done").mkdir(parents=True, exist_ok=True)
        (state / "plan.json").write_text(json.dumps({**plan_state(plan), "runner": self.runner}, default=str))

    def _multiscales(self, name: str, n_levels: int, metadata: dict | None, *, lead: bool = False, method: str = "mean") -> dict:
        out = self.plan.output
        return multiscales(
            name, out.pixel_size_nm, n_levels, origin_nm=out.origin_nm,
            lead_axes=[{"name": "c", "type": "channel"}] if lead else [], method=method, metadata=metadata,
        )

    # ---- writing

    def write_block(self, out: Any, record: str, backend: str = "") -> None:
        """Write one block's probabilities and labels to level 0, then its completion record."""
        import zarr

        root: Any = zarr.open_group(str(self.staging), mode="r+")
        b = out.box
        root["0"][:, b.y0 : b.y1, b.x0 : b.x1] = out.probabilities
        if out.labels is not None:
            for i, cls in enumerate(self.plan.engine.classes):
                root[f"labels/{label_name(cls)}/0"][b.y0 : b.y1, b.x0 : b.x1] = out.labels[i]
        counts = {}
        if out.uncertainty is not None:
            root["uncertainty/0"][b.y0 : b.y1, b.x0 : b.x1] = out.uncertainty
            counts = {"uncertain": int((out.uncertainty >= round(UNCERTAIN_AT * 255)).sum()), "pixels": int(out.uncertainty.size)}
        self.mark_done(record, backend, **counts)

    def discard_if_nothing_done(self) -> bool:
        """Remove the staging folder of a run that failed before finishing any block (and did not
        resume an earlier one): there is nothing in it to resume. True if it was removed."""
        if not self.staging.exists() or self.done or self.anything_done():
            return False
        shutil.rmtree(self.staging, ignore_errors=True)
        return True

    def anything_done(self) -> bool:
        done = self.staging / STATE_DIR / "done"
        return done.exists() and any(done.iterdir())

    def write_error(self, e: OSError) -> OutputWriteError:
        """An OS error met while writing, as one line that says whether the staging folder is kept."""
        kept = not self.discard_if_nothing_done()
        return os_error(e, self.path, staging=self.staging, kept=kept)

    def mark_done(self, record: str, backend: str = "", **counts: int) -> None:
        (self.staging / STATE_DIR / "done" / record).write_text(json.dumps({"backend": backend, **counts}))

    def records(self) -> list[dict]:
        """The completion records of the output blocks (backend, counts)."""
        done = self.staging / STATE_DIR / "done"
        return [json.loads(p.read_text() or "{}") for p in done.iterdir() if p.name.startswith("b")]

    def pyramid_tasks(self, level: int) -> list[tuple[str, Box]]:
        """The (record, box) of each block of pyramid ``level`` (≥ 1), in that level's pixels."""
        # Half a block per task, in whole chunks (pyramid levels are chunked, not sharded): a task
        # then reads one block's worth of the level below, not four.
        s = self.plan.settings
        assert s.block_size is not None  # the plan fills it in
        side = tuple(max(c, b // 2 // c * c) for b, c in zip(s.block_size, s.chunk_size))
        grid = BlockGrid(self.shapes[level], side)  # type: ignore[arg-type]
        return [(f"p{level}_{by}_{bx}", grid.box(by, bx)) for by, bx in grid]

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
                lab = (mean[i] >= s.threshold * scale).astype(np.uint8)
                root[f"labels/{label_name(cls)}/{level}"][box.y0 : box.y1, box.x0 : box.x1] = lab
        if s.uncertainty:
            u = root[f"uncertainty/{level - 1}"][region.y0 : region.y1, region.x0 : region.x1]
            root[f"uncertainty/{level}"][box.y0 : box.y1, box.x0 : box.x1] = np.round(downsample_mean(u[None], box.shape)[0]).astype(np.uint8)
        self.mark_done(record)

    def finalize(self) -> Path:
        """Record which backends computed the blocks, move the finished store into place (replacing
        an old one, crash-safely), then drop the completion records."""
        import zarr

        records = self.records()
        summary: dict[str, Any] = {"backends": dict(Counter(r.get("backend") or "?" for r in records))}
        if self.plan.settings.uncertainty:
            pixels = sum(r.get("pixels", 0) for r in records)
            summary["uncertain_fraction"] = sum(r.get("uncertain", 0) for r in records) / max(pixels, 1)
            summary["uncertain_at"] = UNCERTAIN_AT
        root: Any = zarr.open_group(str(self.staging), mode="r+")
        ome = dict(root.attrs["ome"])
        ms = dict(ome["multiscales"][0])
        ms["metadata"] = {**ms.get("metadata", {}), **summary}
        ome["multiscales"] = [ms, *ome["multiscales"][1:]]
        root.attrs["ome"] = ome
        replace_dir(self.staging, self.path)
        shutil.rmtree(self.path / STATE_DIR, ignore_errors=True)
        return self.path


def plan_state(plan: Plan) -> dict[str, Any]:
    """What an output records about the run that writes it: enough to refuse resuming it with other
    options, and to say which."""
    return {
        "fingerprint": plan.fingerprint(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.settings.fingerprint_items().items()},
        "input": plan.image.source,
        "engine": plan.engine.fingerprint or plan.engine.path,
        "level": plan.level,
        "intensity": plan.intensity.describe(),
    }


def describe_difference(old: dict, new: dict) -> str:
    """``""`` when two runs' states agree, else what differs, in words (``"--tile 256 (now 512)"``)."""
    if old.get("fingerprint") == new.get("fingerprint"):
        return ""
    diffs = []
    for key, value in (old.get("settings") or {}).items():
        now = new["settings"].get(key)
        if json.loads(json.dumps(value)) != json.loads(json.dumps(now, default=str)):
            diffs.append(f"--{key.replace('_', '-')} {_show(value)} (now {_show(now)})")
    for key, what in (("input", "another input"), ("engine", "another engine (or other weights)"), ("intensity", "other intensity statistics")):
        if old.get(key) != new.get(key):
            diffs.append(f"{what} ({old.get(key)})" if key == "input" else what)
    return ", ".join(diffs) or "other settings, input or engine"


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        return str(v[0])
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return "default" if v is None else str(v)


def staged_runner(path: Path) -> dict | None:
    """The runner an interrupted run into ``path`` recorded (backend, options), or None."""
    state = read_state(staging_path(path))
    return state.get("runner") or None


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


def read_state(staging: Path) -> dict:
    try:
        return json.loads((staging / STATE_DIR / "plan.json").read_text())
    except (OSError, ValueError):
        return {}


def _max_value(dtype: str) -> float:
    return 255 if dtype == "uint8" else 1.0


def _provenance(plan: Plan, runner: dict) -> dict:
    from . import __version__

    s = plan.summary()
    source = plan.image.source
    return {
        "method": "tilefeet.segment",
        "version": __version__,
        "engine": plan.engine.name,
        "engine_sha256": plan.engine.fingerprint,
        # An absolute path: the output may be moved or read from another folder (preview finds the input by it).
        "input": str(Path(source).resolve()) if plan.image.version else source,
        "input_level": plan.level,
        "scale_factor": list(s["scale_factor"]),
        "network_pixel_size_nm": list(plan.network.pixel_size_nm),
        "intensity": plan.intensity.describe(),
        "runner": runner,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.settings.fingerprint_items().items()},
    }
