"""Writing the output OME-Zarr: probabilities as a multiscale image, ``labels/<class>`` as NGFF labels.

Layout (NGFF 0.5, zarr v3)::

    out.ome.zarr/                 multiscales "probabilities", axes c, y, x (nm); provenance in metadata
      0/ 1/ 2/ ...                (classes, y, x) uint8 0..255 (or float); level k is 2^k × coarser
      labels/                     {"labels": [class, ...]}
        <class>/                  multiscales + image-label; (y, x) uint8, 1 = class
      uncertainty/                (--uncertainty) an image of its own: (y, x) uint8, the disagreement
                                  of the test-time augmentations, 0 (agree) .. 255 (split evenly)

Safety: on a file system everything is written into a staging folder beside the output
(``out.ome.zarr.partial``) and moved into place only when complete, so an existing output is never
half-overwritten and a crash never leaves a broken store at the output path. On an object store
(``s3://``, no rename) the output is written in place with its Zarr metadata held back and
published last, root document last (:class:`tilefeet.storage.ObjectStoreOutput`). Blocks own whole
chunks (no two tasks write one chunk) and record their completion *after* their data, so
``--resume`` redoes exactly the blocks that were not finished and the result does not depend on
where the crash happened. The completion records (``.tilefeet/done/<block>``) hold the backend
that computed the block (and its count of uncertain pixels); the finished output's provenance
lists them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, OutputExistsError, TilefeetError
from .geometry import BlockGrid, Box, Pair
from .ngff import (
    LABEL_COLORS,
    add_label,
    create_levels,
    grey_compressor,
    image_metadata,
    label_metadata,
    label_name,
    multiscales,
    pyramid_shapes,
)
from .plan import Plan
from .storage import OutputLocation, Url, is_remote_error, is_url, location_text, output_location

#: An output pixel counts as uncertain (for the section's summary) at this disagreement (0..1).
UNCERTAIN_AT = 0.25


def check_paths(inp: str | None, out: str | os.PathLike) -> None:
    """Refuse an output that is, contains, or lies inside the input (paths or URLs)."""
    if not inp:
        return
    if is_url(inp) or is_url(out):
        a, b = location_text(inp).rstrip("/"), location_text(out).rstrip("/")
        overlap = a == b or b.startswith(a + "/") or a.startswith(b + "/")
    else:
        pa, pb = Path(inp).resolve(), Path(out).resolve()
        overlap = pa == pb or pa in pb.parents or pb in pa.parents
    if overlap:
        raise ConfigError(f"output {out} overlaps the input {inp}; write the output somewhere else")


@dataclass
class OutputStore:
    """An output being written (in its staging store) and its completion records."""

    location: OutputLocation  #: where: a local folder, or an S3 prefix (:mod:`tilefeet.storage`)
    plan: Plan
    done: set[str] = field(default_factory=set)
    runner: dict = field(default_factory=dict)  #: the runner spec as recorded (backend, options, ...)

    @property
    def path(self) -> Path | Url:
        """The finished output's path (or URL)."""
        return self.location.final

    @property
    def staging(self) -> Path | Url:
        """Where the run writes until it is finished (an object store output: the output itself)."""
        return self.location.staging

    @property
    def shapes(self) -> list[Pair]:
        """Pyramid level shapes: a pure function of the output grid and chunk size."""
        return pyramid_shapes(self.plan.output.shape, self.plan.settings.chunk_size)

    # ---- setup

    @classmethod
    def prepare(
        cls,
        path: str | os.PathLike | OutputLocation,
        plan: Plan,
        *,
        runner: dict | None = None,
        overwrite: bool = False,
        resume: bool = False,
        storage_options: dict | None = None,
    ) -> OutputStore:
        """Check the output (a path, an ``s3://`` URL reached with ``storage_options``, or a
        location), then create (or reopen, with ``resume``) the staging store. The same rules hold
        everywhere: an existing output needs ``overwrite``, an interrupted run ``resume`` or
        ``overwrite``; only what ``overwrite`` does to the old output differs (see the location's note)."""
        loc = output_location(path, storage_options)
        loc.recover()
        check_paths(plan.image.source if plan.image.version else None, loc.final)
        check_output(loc, overwrite=overwrite, resume=resume)
        if loc.has_staging():
            if resume:
                state = loc.read_state()
                differs = describe_difference(state, plan_state(plan))
                if differs:
                    raise OutputExistsError(
                        f"{loc.staging} was started with {differs}; rerun with the same options to resume it, "
                        f"or pass --overwrite to start over"
                    )
                return cls(loc, plan, loc.record_names(), dict(state.get("runner") or runner or {}))
            loc.discard_staging()
        if loc.exists() and resume and not overwrite:
            raise OutputExistsError(f"{loc.final} is already complete; nothing to resume (pass --overwrite to redo it)")
        loc.check_kind()
        store = cls(loc, plan, set(), dict(runner or {}))
        try:
            store._create()
        except Exception as e:
            if not (isinstance(e, OSError) or is_remote_error(e)):
                raise
            with contextlib.suppress(Exception):  # the cause may forbid this too: its error is the one to tell
                loc.discard_staging()
            raise loc.write_error(e, kept=None) from None
        return store

    @property
    def zlead(self) -> tuple[int, ...]:
        """The output's z extent before (y, x) on every array: ``(Z,)`` for a stack, ``()`` for a section."""
        return (self.plan.depth,) if self.plan.is_stack else ()

    def _at(self, box: Box, z: int | None) -> tuple[Any, ...]:
        """The (z,) y, x index of ``box`` in section ``z`` of an array without a channel axis."""
        return (*(() if z is None else (z,)), slice(box.y0, box.y1), slice(box.x0, box.x1))

    def _create(self) -> None:
        plan, s = self.plan, self.plan.settings
        root = self.location.open_group("w")
        classes = plan.engine.classes
        shapes = self.shapes
        zl, zc = self.zlead, (1,) * len(self.zlead)
        zdims = ["z"] if zl else []
        create_levels(
            root,
            [(len(classes), *zl, h, w) for h, w in shapes],
            chunks=(1, *zc, *s.chunk_size),
            shards=(len(classes), *zc, *s.shard_size) if s.shard_size else None,
            dtype=s.output_dtype,
            dimension_names=["c", *zdims, "y", "x"],
            compressors=grey_compressor(s.output_dtype),
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
                create_levels(g, [(*zl, *sh) for sh in shapes], chunks=(*zc, *s.chunk_size), shards=(*zc, *s.shard_size) if s.shard_size else None,
                              dtype="uint8", dimension_names=[*zdims, "y", "x"])
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
            create_levels(g, [(*zl, *sh) for sh in shapes], chunks=(*zc, *s.chunk_size), shards=(*zc, *s.shard_size) if s.shard_size else None,
                          dtype="uint8", dimension_names=[*zdims, "y", "x"], compressors=grey_compressor("uint8"))
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
        self.location.write_state({**plan_state(plan), "runner": self.runner})

    def _multiscales(self, name: str, n_levels: int, metadata: dict | None, *, lead: bool = False, method: str = "mean") -> dict:
        out, plan = self.plan.output, self.plan
        axes: list[dict] = [{"name": "c", "type": "channel"}] if lead else []
        scale, origin = [1.0] * len(axes), [0.0] * len(axes)
        if plan.is_stack:
            # z in nm when the stack says its spacing, else in section numbers (an axis without a unit)
            dz = plan.image.z_spacing_nm
            axes.append({"name": "z", "type": "space", **({"unit": "nanometer"} if dz else {})})
            scale.append(dz or 1.0)
            origin.append(plan.image.z_origin_nm + plan.sections[0] * (dz or 1.0))
        return multiscales(
            name, out.pixel_size_nm, n_levels, origin_nm=out.origin_nm,
            lead_axes=axes, lead_scale=scale, lead_origin=origin, method=method, metadata=metadata,
        )

    # ---- writing

    def write_block(self, out: Any, record: str, backend: str = "") -> None:
        """Write one block's probabilities and labels to level 0, then its completion record. A stack's
        block holds several sections (``out`` a list of them, each with its ``z``)."""
        counts = {"uncertain": 0, "pixels": 0}
        for one in out if isinstance(out, list) else [out]:
            for k, v in self._write_section(one).items():
                counts[k] += v
        self.mark_done(record, backend, **(counts if self.plan.settings.uncertainty else {}))

    def _write_section(self, out: Any) -> dict[str, int]:
        root: Any = self.location.open_group("r+")
        b, z = out.box, getattr(out, "z", None)
        at = self._at(b, z)
        every(root["0"])[(slice(None), *at)] = out.probabilities
        if out.labels is not None:
            for i, cls in enumerate(self.plan.engine.classes):
                every(root[f"labels/{label_name(cls)}/0"])[at] = out.labels[i]
        if out.uncertainty is None:
            return {}
        every(root["uncertainty/0"])[at] = out.uncertainty
        kept = self.plan.for_section(z).kept_pixels(b) if z is not None else self.plan.kept_pixels(b)
        uncertain = out.uncertainty >= round(UNCERTAIN_AT * 255)
        return {
            "uncertain": int(uncertain.sum() if kept is None else (uncertain & kept).sum()),
            "pixels": int(uncertain.size if kept is None else kept.sum()),
        }

    def discard_if_nothing_done(self) -> bool:
        """Remove the staging store of a run that failed before finishing any block (and did not
        resume an earlier one): there is nothing in it to resume. True if it was removed."""
        try:
            if self.done or not self.location.has_staging() or self.anything_done():
                return False
            self.location.discard_staging()
        except (OSError, TilefeetError):  # the store cannot be reached now: say it is kept
            return False
        return True

    def anything_done(self) -> bool:
        return bool(self.location.record_names())

    def write_error(self, e: BaseException) -> TilefeetError:
        """An error met while writing (the OS's, or a server's), as one line that says whether the
        staging store is kept."""
        kept = not self.discard_if_nothing_done()
        return self.location.write_error(e, kept=kept)

    def mark_done(self, record: str, backend: str = "", **counts: int) -> None:
        """The completion record of a block (its backend, counts), written after its data."""
        self.location.mark(record, json.dumps({"backend": backend, **counts}))

    def records(self) -> list[dict]:
        """The completion records of the output blocks (backend, counts)."""
        return [json.loads(text or "{}") for text in self.location.records("b").values()]

    def pyramid_grid(self, level: int) -> BlockGrid:
        """The task grid of pyramid ``level`` (≥ 1), in that level's pixels."""
        # Half a block per task, in whole chunks (pyramid levels are chunked, not sharded): a task
        # then reads one block's worth of the level below, not four.
        s = self.plan.settings
        assert s.block_size is not None  # the plan fills it in
        side = tuple(max(c, b // 2 // c * c) for b, c in zip(s.block_size, s.chunk_size))
        return BlockGrid(self.shapes[level], side)  # type: ignore[arg-type]

    def pyramid_tasks(self, level: int) -> list[tuple[Any, ...]]:
        """The (record, box) of each block of pyramid ``level`` (≥ 1), in that level's pixels; for a
        stack (record, box, sections), one task per block and :meth:`Plan.z_blocks` group of sections."""
        grid = self.pyramid_grid(level)
        if not self.plan.is_stack:
            return [(f"p{level}_{by}_{bx}", grid.box(by, bx)) for by, bx in grid]
        return [(f"p{level}_{zs.start}_{by}_{bx}", grid.box(by, bx), zs) for zs in self.plan.z_blocks() for by, bx in grid]

    def fuses_level1(self) -> bool:
        """Whether each output block writes pyramid level 1 itself, from the arrays it has just
        written to level 0, instead of a pyramid task reading them back (decoding every level-0
        chunk: most of the pyramid's cost). It does where a level-1 task covers exactly one block
        (half a block is a whole number of chunks): the same function on the same values, so the
        same bits either way."""
        s = self.plan.settings
        assert s.block_size is not None
        return len(self.shapes) > 1 and all(b % 2 == 0 for b in s.block_size) and self.pyramid_grid(1).block == tuple(
            b // 2 for b in s.block_size
        )

    def level1_task(self, index: tuple[int, ...]) -> tuple[str, Box, range | None]:
        """The level-1 pyramid task (record, box, sections) that output block ``index`` covers when
        :meth:`fuses_level1` (``index`` is (by, bx), or (section group, by, bx) for a stack)."""
        box = self.pyramid_grid(1).box(index[-2], index[-1])
        if not self.plan.is_stack:
            return f"p1_{index[-2]}_{index[-1]}", box, None
        zs = self.plan.z_blocks()[index[0]]
        return f"p1_{zs.start}_{index[-2]}_{index[-1]}", box, zs

    def write_level1(self, outs: list[Any], task: tuple[str, Box, range | None]) -> None:
        """Level 1 over one block from its level-0 output ``outs`` (one per section written; a
        section the block skipped, outside a tissue mask, reads as the fill value 0, as the pyramid
        task would read it), then the task's completion record."""
        record, box, zs = task
        by_z = {getattr(o, "z", None): o for o in outs}
        for z in zs if zs is not None else [None]:
            o = by_z.get(z)
            below = None if o is None else (o.probabilities, o.uncertainty)
            self._pyramid_section(1, box, z, below=below, zeros_below=o is None)
        self.mark_done(record)

    def write_pyramid_block(self, level: int, box: Box, record: str, zs: range | None = None) -> None:
        """Level ``level`` over ``box`` (of each section in ``zs``, a stack's) from level ``level - 1``:
        2×2 means of the probabilities; labels are the mean probability thresholded (so every label
        level agrees with its probability level). Stacks are downsampled in y and x only."""
        for z in zs if zs is not None else [None]:
            self._pyramid_section(level, box, z)
        self.mark_done(record)

    def _pyramid_section(
        self, level: int, box: Box, z: int | None, *, below: tuple[Any, Any] | None = None, zeros_below: bool = False
    ) -> None:
        """Level ``level`` over ``box`` of section ``z`` from the level below: read from the store, or
        ``below`` (its probabilities and uncertainty over the region, as written), or zeros."""
        root: Any = self.location.open_group("r+")
        s = self.plan.settings
        src = root[str(level - 1)]
        hs, ws = src.shape[-2:]
        region = Box(2 * box.y0, 2 * box.x0, min(2 * box.y1, hs), min(2 * box.x1, ws))
        at, src_at = self._at(box, z), self._at(region, z)
        if zeros_below:
            below = (np.zeros((src.shape[0], *region.shape), src.dtype), np.zeros(region.shape, np.uint8) if s.uncertainty else None)
        if below is not None:
            assert below[0].shape[-2:] == region.shape, (below[0].shape, region)
        probs = np.asarray(src[(slice(None), *src_at)]) if below is None else below[0]
        mean = downsample_mean(probs, box.shape)
        scale = 255.0 if s.output_dtype == "uint8" else 1.0
        if s.output_dtype == "uint8":
            every(root[str(level)])[(slice(None), *at)] = np.round(mean).astype(np.uint8)
        else:
            every(root[str(level)])[(slice(None), *at)] = mean.astype(s.output_dtype)
        if s.labels:
            for i, cls in enumerate(self.plan.engine.classes):
                lab = (mean[i] >= s.threshold * scale).astype(np.uint8)
                every(root[f"labels/{label_name(cls)}/{level}"])[at] = lab
        if s.uncertainty:
            u = root[f"uncertainty/{level - 1}"][src_at] if below is None else below[1]
            every(root[f"uncertainty/{level}"])[at] = np.round(downsample_mean(u[None], box.shape)[0]).astype(np.uint8)

    def finalize(self) -> Path | Url:
        """Record which backends computed the blocks, make the finished store the output (on a file
        system: moved into place, replacing an old one, crash-safely; on an object store: its
        metadata published, root last), then drop the completion records."""
        records = self.records()
        summary: dict[str, Any] = {"backends": dict(Counter(r.get("backend") or "?" for r in records if not r.get("skipped")))}
        if self.plan.mask is not None:
            summary["blocks_outside_mask"] = sum(1 for r in records if r.get("skipped"))
        # Blocks write every chunk they own, empty ones too (blocks outside a mask write none): a
        # chunk absent from a finished output without a mask was lost (tilefeet.chunks).
        summary["every_chunk_written"] = self.plan.mask is None
        if self.plan.settings.uncertainty:
            pixels = sum(r.get("pixels", 0) for r in records)
            summary["uncertain_fraction"] = sum(r.get("uncertain", 0) for r in records) / max(pixels, 1)
            summary["uncertain_at"] = UNCERTAIN_AT
        root: Any = self.location.open_group("r+")
        ome = dict(root.attrs["ome"])
        ms = dict(ome["multiscales"][0])
        ms["metadata"] = {**ms.get("metadata", {}), **summary}
        ome["multiscales"] = [ms, *ome["multiscales"][1:]]
        root.attrs["ome"] = ome
        return self.location.publish()


def every(array: Any) -> Any:
    """``array``, writing chunks that hold only its fill value too (zarr leaves them out by default)."""
    return array.with_config({"write_empty_chunks": True})


def check_output(location: OutputLocation, *, overwrite: bool, resume: bool) -> None:
    """The rules about what is already at an output, before anything is written (``--dry-run``
    says them too): an existing output needs ``overwrite`` (or ``resume``, which then says it is
    complete), an interrupted run ``resume`` or ``overwrite``."""
    if location.exists() and not (overwrite or resume):
        raise OutputExistsError(f"{location.final} already exists; pass --overwrite to replace it ({location.overwrite_note})")
    if location.has_staging() and not (overwrite or resume):
        raise OutputExistsError(f"an interrupted run left {location.staging}; pass --resume to continue it or --overwrite to start over")
    if resume and not overwrite and location.exists() and not location.has_staging():
        raise OutputExistsError(f"{location.final} is already complete; nothing to resume (pass --overwrite to redo it)")


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


def staged_runner(path: str | os.PathLike | OutputLocation, storage_options: dict | None = None) -> dict | None:
    """The runner an interrupted run into ``path`` recorded (backend, options), or None."""
    return output_location(path, storage_options).read_state().get("runner") or None


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


def _max_value(dtype: str) -> float:
    return 255 if dtype == "uint8" else 1.0


def _engine_recipes(path: str) -> dict:
    from .engine import engine_recipes

    return engine_recipes(path)


def _provenance(plan: Plan, runner: dict) -> dict:
    from . import __version__

    s = plan.summary()
    source = plan.image.source
    return {
        "method": "tilefeet.segment",
        "version": __version__,
        "engine": plan.engine.name,
        "engine_sha256": plan.engine.fingerprint,
        # the engine's object recipe per class (engine.toml [objects]): what `tilefeet objects` uses by default
        "objects": _engine_recipes(plan.engine.path),
        # An absolute path: the output may be moved or read from another folder (preview finds the input by it).
        "input": location_text(source) if plan.image.version else source,
        "input_level": plan.level,
        "scale_factor": list(s["scale_factor"]),
        "network_pixel_size_nm": list(plan.network.pixel_size_nm),
        "intensity": plan.intensity.describe(),
        "contrast": plan.polarity,  # the polarity decision and its evidence (tilefeet.polarity)
        "mask": {k: s[k] for k in ("mask", "tiles_skipped", "area_skipped") if k in s} or None,
        # chunk files of the input missing (and read as its fill value) with --allow-missing-chunks
        "missing_chunks": sum(c.missing for c in plan.chunks),
        "input_chunks": [c.summary() for c in plan.chunks],
        "runner": runner,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.settings.fingerprint_items().items()},
    }
