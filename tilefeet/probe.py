"""The polarity probe: a few lattice tiles of a section run through the network, under each of
several intensity maps (the section as it is and inverted), each tile also mirrored, packed into
the runner's fixed-size batches. What comes out (:class:`tilefeet.polarity.OutputStats`) is the
evidence :func:`tilefeet.polarity.decide` weighs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .block import to_network_grid
from .geometry import Box
from .polarity import OutputStats, output_stats

#: Lattice tiles a probe runs (each in both polarities, as it is and mirrored: four network
#: passes each). Chosen among up to PROBE_CANDIDATES² evenly spread tiles, the most textured first.
PROBE_TILES = 4
PROBE_CANDIDATES = 6


def probe_candidates(plan: Any) -> list[tuple[int, int]]:
    """Up to PROBE_CANDIDATES² lattice tiles spread evenly over the section, those that run."""
    ny, nx = plan.lattice.counts
    ys = np.unique(np.linspace(0, ny - 1, min(ny, PROBE_CANDIDATES)).round().astype(int))
    xs = np.unique(np.linspace(0, nx - 1, min(nx, PROBE_CANDIDATES)).round().astype(int))
    return [(int(y), int(x)) for y in ys for x in xs if plan.tile_runs(int(y), int(x))]


def probe_tiles(plan: Any, image: Any, count: int = PROBE_TILES) -> list[tuple[int, int]]:
    """Up to ``count`` lattice tiles to probe: among evenly spread candidates that run (tissue
    mask), the ones whose source pixels vary most (tissue, not resin or padding)."""
    candidates = probe_candidates(plan)
    if len(candidates) <= count:
        return candidates
    spread = _spreads(plan, image, [plan.tile_geometry(iy, ix).src_box for iy, ix in candidates])
    order = sorted(range(len(candidates)), key=lambda i: (-spread[i], i))[:count]
    return [candidates[i] for i in sorted(order)]


#: The candidates' spreads come from one read of a whole pyramid level at most this large (the
#: finest such level at or below the one segmented), not one read per candidate tile: on a remote
#: gigapixel section that is one small GET or a few instead of dozens of full-resolution tiles.
SPREAD_LEVEL_PIXELS = 4_000_000


def _spreads(plan: Any, image: Any, boxes: Sequence[Any]) -> list[float]:
    """The standard deviation of the source pixels under each box (at ``plan.level``), measured on
    one whole coarser level when the pyramid has a small enough one, else tile by tile."""
    levels = image.meta.levels
    base = levels[plan.level].shape
    small = [k for k in range(plan.level, len(levels)) if levels[k].shape[0] * levels[k].shape[1] <= SPREAD_LEVEL_PIXELS]
    if small:
        k = small[0]
        h, w = levels[k].shape
        whole = np.asarray(image.read(k, Box(0, 0, h, w)), dtype=np.float64)
        fy, fx = h / base[0], w / base[1]

        def window(b: Any) -> np.ndarray:
            y0, x0 = max(0, int(b.y0 * fy)), max(0, int(b.x0 * fx))
            y1, x1 = min(h, max(y0 + 1, int(np.ceil(b.y1 * fy)))), min(w, max(x0 + 1, int(np.ceil(b.x1 * fx))))
            return whole[y0:y1, x0:x1]

        raws = [window(b) for b in boxes]
    else:
        raws = [np.asarray(image.read(plan.level, b), dtype=np.float64) for b in boxes]
    out = []
    for raw in raws:
        raw = raw[np.isfinite(raw)]
        out.append(float(raw.std()) if raw.size else 0.0)
    return out


def probe(plan: Any, image: Any, runner: Any, imaps: Sequence[Any], tiles: Sequence[tuple[int, int]]) -> list[OutputStats]:
    """The network's :class:`OutputStats` on ``tiles`` under each intensity map of ``imaps``: every
    tile under every map, as it is and mirrored, packed into the runner's fixed-size batches."""
    import torch


    activation = getattr(runner.bundle, "activation", "sigmoid")
    th, tw = plan.lattice.tile
    geos = [plan.tile_geometry(iy, ix) for iy, ix in tiles]
    raws = [image.read(plan.level, geo.src_box) for geo in geos]
    key = _probe_key(plan, runner, imaps, geos, raws)
    cached = _load(_cache_file(key), key)
    if cached is not None:
        return cached
    inputs = []
    for imap in imaps:
        for geo, raw in zip(geos, raws):
            x = torch.from_numpy(np.nan_to_num(imap(raw), nan=0.0, posinf=0.0, neginf=0.0)).to(runner.device)
            x = to_network_grid(x, geo, plan)
            inputs += [x, torch.flip(x, dims=(1,))]
    outputs = []
    size = runner.spec.batch_size
    for start in range(0, len(inputs), size):
        group = inputs[start : start + size]
        batch = torch.zeros((size, 1, th, tw), dtype=torch.float32, device=runner.device)
        for k, x in enumerate(group):
            batch[k, 0] = x
        with runner.lock:
            out = runner(batch)
        outputs += [out[k].float().cpu().numpy() for k in range(len(group))]
    # statistics over each tile's centre (its border sees cut context), where the section is
    # (reflected padding mirrors the section's content, which would flatter the mirror test)
    valid = np.zeros((len(tiles), th, tw), dtype=bool)
    my, mx = (o // 2 for o in plan.lattice.overlap)
    h, w = plan.network.shape
    for k, geo in enumerate(geos):
        box = geo.net_box
        y0, x0 = max(my, -box.y0), max(mx, -box.x0)
        y1, x1 = min(th - my, h - box.y0), min(tw - mx, w - box.x0)
        valid[k, y0:y1, x0:x1] = True
    n = len(tiles)
    # A probe of one tile (a section smaller than a tile or two) judges its four quarters as it
    # would judge tiles: one patch of tissue can fool a network as a whole, and the quarters show it
    # (polarity.QUARTER_AGREEMENT).
    regions = _quarters(valid) if n == 1 else [valid[k : k + 1] for k in range(n)]
    stats = []
    for m in range(len(imaps)):
        mine = outputs[2 * n * m : 2 * n * (m + 1)]
        p = np.stack(mine[0::2])
        q = np.stack([o[..., ::-1] for o in mine[1::2]])
        if n == 1:
            per_tile = tuple(output_stats(p, q, activation, r) for r in regions)
        else:
            per_tile = tuple(output_stats(p[k : k + 1], q[k : k + 1], activation, regions[k]) for k in range(n))
        stats.append(replace(output_stats(p, q, activation, valid), tiles=per_tile, quarters=n == 1))
    _store(key, stats)
    return stats


def _quarters(valid: np.ndarray) -> list[np.ndarray]:
    """``valid`` ``(1, H, W)`` cut into the four quarters of its bounding box (none if it is empty)."""
    ys, xs = np.nonzero(valid[0])
    if not len(ys):
        return []
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    ym, xm = (y0 + y1) // 2, (x0 + x1) // 2
    out = []
    for a, b, c, d in ((y0, ym, x0, xm), (y0, ym, xm, x1), (ym, y1, x0, xm), (ym, y1, xm, x1)):
        part = np.zeros_like(valid)
        part[:, a:b, c:d] = valid[:, a:b, c:d]
        out.append(part)
    return out


# A probe is a pure function of the pixels it reads, the network and how it runs, so its result is
# kept in the cache folder under a hash of all of them: a `--dry-run` and the run that follows, a
# `--resume`, or the same section segmented again with other output options pay for it once (2-4 s
# of network passes on a CPU). Any change to the pixels, the engine's files, the backend, precision,
# thread count, tiling or intensity map is another key. A cache that cannot be read or written is
# passed over: the probe runs.
PROBE_CACHE_VERSION = 2


def _probe_key(plan: Any, runner: Any, imaps: Sequence[Any], geos: Sequence[Any], raws: Sequence[np.ndarray]) -> str:
    import torch

    bundle = runner.bundle
    h = hashlib.sha256(json.dumps({
        "version": PROBE_CACHE_VERSION, "engine": bundle.fingerprint, "spec": repr(runner.spec), "device": str(runner.device),
        "threads": torch.get_num_threads(), "maps": [repr(m) for m in imaps], "tiles": [repr(g) for g in geos],
        "lattice": repr(plan.lattice), "network": repr(plan.network), "level": plan.level,
        "resampling": repr(plan.src_from_net) if plan.resamples_input else None,
    }, sort_keys=True).encode())
    for raw in raws:
        a = np.ascontiguousarray(raw)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _cache_file(key: str) -> Any:
    from .artifacts import cache_dir

    return cache_dir() / "probe" / f"{key[:40]}.json"


def _load(path: Any, key: str) -> list[OutputStats] | None:
    try:
        doc = json.loads(path.read_text())
        return [_stats_from(d) for d in doc["stats"]] if doc.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(key: str, stats: Sequence[OutputStats]) -> None:
    from .artifacts import build_once

    path = _cache_file(key)
    text = json.dumps({"key": key, "stats": [_stats_doc(st) for st in stats]})

    def write(tmp: Any) -> None:
        tmp.write_text(text)

    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)  # only a damaged entry can be there: a readable one was returned
        build_once(path, write)
        _prune(path.parent)


#: Probe results kept in the cache (a few kB each): the least recently written beyond this are
#: deleted, so a cache that sees thousands of sections does not grow without end.
PROBE_CACHE_ENTRIES = 2048


def _prune(folder: Any, keep: int = PROBE_CACHE_ENTRIES) -> None:
    entries = []
    for p in folder.glob("*.json"):
        with contextlib.suppress(OSError):  # another process may prune at the same time
            entries.append((p.stat().st_mtime, p))
    for _, p in sorted(entries, key=lambda e: e[0], reverse=True)[keep:]:
        with contextlib.suppress(OSError):
            p.unlink()


def _stats_doc(st: OutputStats) -> dict[str, Any]:
    # full precision (JSON's NaN token for "no foreground"): a cached probe gives the same decision
    # and the same evidence in the plan as the probe itself
    return {"fraction": list(st.fraction), "consistency": list(st.consistency), "confidence": list(st.confidence),
            "tiles": [_stats_doc(t) for t in st.tiles], "quarters": st.quarters}


def _stats_from(doc: dict[str, Any]) -> OutputStats:
    def floats(values: Sequence[Any]) -> tuple[float, ...]:
        out = tuple(float(v) for v in values)
        if any(math.isinf(v) for v in out):
            raise ValueError("not a probe's statistics")
        return out

    return OutputStats(floats(doc["fraction"]), floats(doc["consistency"]), floats(doc["confidence"]),
                       tuple(_stats_from(t) for t in doc["tiles"]), bool(doc.get("quarters", False)))
