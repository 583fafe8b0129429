"""The block function: one output block from the section, as a short chain of named steps.

    read (source level, block + halo, reflected at borders)
      → normalize intensity (lookup table)            ┐
      → resample to the network grid                  │ on the runner's device
      → run every lattice tile touching the block     │ (batches of fixed size)
      → accumulate Σ w·p and Σ w, divide once         │
      → resample to the output grid                   ┘
      → quantize / threshold → numpy

Every step treats a pixel the same way whichever block it falls in (global lattice, global
resampling taps, tiles accumulated in lattice order), so the output is bit-identical however the
section is split into blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .blend import device_window, tile_ramps
from .geometry import Box, Pair, resample_taps
from .plan import BlockGeometry, Plan
from .profile import PROFILE
from .tilecache import cache_for, consumers


@dataclass
class BlockOutput:
    """What a block writes: probabilities in the output dtype, one binary label plane per class, and
    (``--uncertainty``) the disagreement of the test-time augmentations as 0..255."""

    box: Box
    probabilities: np.ndarray  #: (C, h, w)
    labels: np.ndarray | None  #: (C, h, w) uint8, or None
    uncertainty: np.ndarray | None = None  #: (h, w) uint8, or None
    z: int | None = None  #: a stack's output section the block is of (None: a section's block)


def compute_block(plan: Plan, index: tuple[int, int], image: Any, runner: Any) -> torch.Tensor:
    """Float32 probabilities ``(C, h, w)`` of output block ``index``, on the runner's device; 0
    outside the tissue mask (a block wholly outside it reads nothing and runs nothing)."""
    geo = plan.block(*index)
    if not plan.block_active(*index):
        return torch.zeros((plan.channels, *geo.out_box.shape), dtype=torch.float32, device=runner.device)
    device = runner.device
    with PROFILE.stage("read"):
        raw = image.read(plan.level, geo.src_box)
    with PROFILE.stage("upload", device):
        x = normalize(raw, plan, device)
    with PROFILE.stage("resample_in", device):
        x = to_network_grid(x, geo, plan)
    p = blend_tiles(x, geo, plan, runner)
    with PROFILE.stage("resample_out", device):
        p = to_output_grid(p, geo, plan)
    kept = plan.kept_pixels(geo.out_box)
    if kept is not None and not kept.all():
        p = p * torch.from_numpy(kept).to(p.device, p.dtype)  # × 1.0 inside: the same bits as without a mask
    return p


def finish_block(p: torch.Tensor, plan: Plan, box: Box) -> BlockOutput:
    """Quantize probabilities to the stored dtype and threshold the labels (on the device), then copy to host."""
    with PROFILE.stage("download", p.device):
        return _finish(p, plan, box)


def _finish(p: torch.Tensor, plan: Plan, box: Box) -> BlockOutput:
    s = plan.settings
    n = len(plan.engine.classes)
    probs = p[:n]
    if p.device.type == "cpu" and s.output_dtype == "uint8" and not s.uncertainty:
        return _finish_numpy(probs.numpy(), plan, box)
    if s.output_dtype == "uint8":
        q = torch.round(probs * 255.0).clamp_(0, 255).to(torch.uint8)
    else:
        q = probs.to(torch.float16 if s.output_dtype == "float16" else torch.float32)
    labels = (probs >= s.threshold).to(torch.uint8).cpu().numpy() if s.labels else None
    spread = torch.round(p[n] * 255.0).clamp_(0, 255).to(torch.uint8).cpu().numpy() if s.uncertainty else None
    return BlockOutput(box, q.cpu().numpy(), labels, spread)


def _finish_numpy(probs: np.ndarray, plan: Plan, box: Box) -> BlockOutput:
    """:func:`_finish` on the CPU for uint8 output, in place with numpy (one pass each, no
    temporaries torch's out-of-place ops make): the same float32 arithmetic, the same bits
    (round half to even in both; the threshold compared in float32, as torch compares a tensor
    with a Python number)."""
    s = plan.settings
    labels = (probs >= np.float32(s.threshold)).view(np.uint8) if s.labels else None
    q = np.multiply(probs, np.float32(255.0), dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, 0, 255, out=q)
    return BlockOutput(box, q.astype(np.uint8), labels, None)


# ------------------------------------------------------------------------------------- steps


@lru_cache(maxsize=8)
def device_lut(imap: Any, dtype: str, device: str) -> torch.Tensor | None:
    """The intensity map as a lookup table on ``device`` for an 8/16-bit dtype (None for floats);
    a few are kept per process (one per section being segmented), cleared by ``tilefeet.clear_caches``."""
    table = imap.lut(np.dtype(dtype))
    return None if table is None else torch.from_numpy(table).to(device)


def normalize(raw: np.ndarray, plan: Plan, device: torch.device) -> torch.Tensor:
    """Raw intensities → float32 network input via the section's intensity map (a LUT for 8/16-bit data)."""
    imap = plan.intensity
    lut = device_lut(imap, str(raw.dtype), str(device))
    if lut is not None and lut.device.type == "cpu":
        # numpy gathers from a table with the narrow index as it is, several times faster than
        # torch's int64/int32 indexing on the CPU; the values are the table's either way.
        table = lut.numpy()
        offset = int(np.iinfo(raw.dtype).min)
        return torch.from_numpy(table[raw] if not offset else table[raw.astype(np.int32) - offset])
    if lut is not None:
        # Upload the narrow dtype, widen on the device (an 8-bit index would be read as a mask).
        idx = torch.from_numpy(np.ascontiguousarray(raw)).to(device).to(torch.int32)
        offset = int(np.iinfo(raw.dtype).min)
        if offset:
            idx -= offset
        return lut[idx]
    # Float data: non-finite pixels (NaN gaps in a montage) become network input 0 (the training
    # mean for mean/std engines) instead of spreading NaN over the receptive field around them.
    return torch.from_numpy(np.nan_to_num(imap(raw), nan=0.0, posinf=0.0, neginf=0.0)).to(device)


def apply_taps(x: torch.Tensor, idx: np.ndarray, w: np.ndarray, dim: int) -> torch.Tensor:
    """``out[..., i, ...] = Σ_t w[i, t] · x[..., idx[i, t], ...]`` along ``dim``, summed in tap order.

    Plain multiply and add (no fused ops) keep each output pixel's arithmetic identical whatever
    the size of the array it is part of.
    """
    idx_t = torch.from_numpy(idx).to(x.device)
    w_t = torch.from_numpy(w).to(x.device, x.dtype)
    shape = [1] * x.ndim
    shape[dim] = -1
    out = x.index_select(dim, idx_t[:, 0]) * w_t[:, 0].view(shape)
    for t in range(1, idx.shape[1]):
        out = out + x.index_select(dim, idx_t[:, t]) * w_t[:, t].view(shape)
    return out


def to_network_grid(x: torch.Tensor, geo: BlockGeometry, plan: Plan) -> torch.Tensor:
    """Source-level pixels of ``geo.src_box`` → network-grid pixels of ``geo.net_box``."""
    if not plan.resamples_input:
        return x
    net, src = geo.net_box, geo.src_box
    iy, wy = resample_taps(net.y0, net.y1, plan.src_from_net.y)
    ix, wx = resample_taps(net.x0, net.x1, plan.src_from_net.x)
    x = apply_taps(x, iy - src.y0, wy, 0)
    return apply_taps(x, ix - src.x0, wx, 1)


def blend_tiles(x: torch.Tensor, geo: BlockGeometry, plan: Plan, runner: Any) -> torch.Tensor:
    """Run every tile of ``geo`` and blend the predictions over ``geo.need`` (network grid).

    Tiles are accumulated in lattice order whatever happens around them: some come from the
    process's tile cache (computed by a neighbouring block), the others are run here in batches
    of the runner's fixed size, in lattice order.
    """
    lattice, need = plan.lattice, geo.need
    crop, kind = plan.crop, plan.settings.blend
    n_out = plan.channels
    acc = torch.zeros((n_out, *need.shape), dtype=torch.float32, device=x.device)
    wsum = None if crop else torch.zeros(need.shape, dtype=torch.float32, device=x.device)
    # lattice order fixes the summation order; tiles outside the tissue mask do not run
    tiles = [(iy, ix) for iy in geo.tiles[0] for ix in geo.tiles[1] if plan.tile_runs(iy, ix)]
    for (iy, ix), p in _predictions(x, tiles, geo, plan, runner):
        tb = lattice.tile_box(iy, ix)
        region = (lattice.kept_box(iy, ix) if crop else tb).intersect(need)
        if region.empty:
            continue
        dst, src = region.relative_to(need), region.relative_to(tb)
        with PROFILE.stage("blend", x.device):
            p = p[(slice(None), *src)]
            if wsum is None:  # crop: each pixel is kept by exactly one tile
                acc[(slice(None), *dst)] = p
            else:  # the tile's window depends on its place in the lattice (module blend), not on the block
                w = device_window(lattice.tile, kind, tile_ramps(lattice, iy, ix), str(x.device))[src]
                acc[(slice(None), *dst)] += p * w
                wsum[dst] += w
    if wsum is None:
        return acc
    if plan.mask is None:
        return acc / wsum
    return torch.where(wsum > 0, acc / wsum, 0.0)  # pixels no running tile reaches lie outside the mask: 0


def _predictions(x: torch.Tensor, tiles: list[Pair], geo: BlockGeometry, plan: Plan, runner: Any) -> Iterator[tuple[Pair, torch.Tensor]]:
    """``(tile, prediction)`` for every tile, in the order given. A tile found in the tile cache is
    not run; the others run in fixed-size batches made of the next tiles still missing (a tile's
    bits do not depend on its batch companions), and those other blocks need go into the cache."""
    lattice, net = plan.lattice, geo.net_box
    cache = cache_for(runner, plan.settings.tile_cache_mb)
    key = plan.fingerprint() if cache is not None else ""
    uses_y, uses_x = consumers(plan, key) if cache is not None else (None, None)
    batch_size = runner.spec.batch_size
    batch = torch.zeros((batch_size, 1, *lattice.tile), dtype=torch.float32, device=x.device)
    ahead: dict[Pair, torch.Tensor] = {}  # run with an earlier batch, not yet handed out
    for j, tile in enumerate(tiles):
        p = ahead.pop(tile, None)
        if p is None and cache is not None:
            p = cache.take((key, *tile))
        if p is None:
            group = [tile]
            for later in tiles[j + 1 :]:
                if len(group) == batch_size:
                    break
                if later not in ahead and (cache is None or (key, *later) not in cache):
                    group.append(later)
            with PROFILE.stage("tiles", x.device):
                for k, (iy, ix) in enumerate(group):
                    batch[k, 0] = x[lattice.tile_box(iy, ix).relative_to(net)]
                if len(group) < batch_size:
                    batch[len(group) :] = 0
            pred = predict(runner, batch, plan.tta, uncertainty=plan.settings.uncertainty)
            for k, t in enumerate(group):
                if cache is not None:
                    assert uses_y is not None and uses_x is not None
                    # A copy: a view would keep the whole batch's output alive.
                    cache.put((key, *t), pred[k].clone(), int(uses_y[t[0]] * uses_x[t[1]]))
                if k:
                    ahead[t] = pred[k]
            p = pred[0]
        yield tile, p


def predict(runner: Any, batch: torch.Tensor, transforms: tuple[int, ...], *, uncertainty: bool = False) -> torch.Tensor:
    """The runner's probabilities for ``batch``, averaged over the test-time ``transforms`` (indices
    into :data:`TRANSFORMS`, each undone on its output), summed in the order given so every tile
    gets the same arithmetic; with ``uncertainty``, one more channel: twice the standard deviation
    of the members' probabilities, averaged over classes (0 = the members agree, 1 = they split
    evenly between 0 and 1). Each member is a full fixed-size batch (compiled runners keep one shape)."""
    total = squares = None
    for t in transforms:
        with runner.lock, PROFILE.stage("network", batch.device):
            out = undo(runner(apply(batch, t)), t)
        total = out if total is None else total + out
        if uncertainty:
            squares = out * out if squares is None else squares + out * out
    assert total is not None
    n = float(len(transforms))
    mean = total / n if len(transforms) > 1 else total
    if not uncertainty:
        return mean
    assert squares is not None
    spread = (2.0 * torch.sqrt(torch.clamp(squares / n - mean * mean, min=0.0))).mean(dim=1, keepdim=True)
    return torch.cat([mean, spread], dim=1)


#: The dihedral group of the square as (quarter turns, then a left-right flip?), in the order
#: ``--tta N`` takes its first N: 2 = + left-right flip, 4 = + up-down flip and half turn, 8 = all.
TRANSFORMS: tuple[tuple[int, bool], ...] = ((0, False), (0, True), (2, True), (2, False), (1, False), (1, True), (3, False), (3, True))


def apply(x: torch.Tensor, t: int) -> torch.Tensor:
    turns, flip = TRANSFORMS[t]
    if turns:
        x = torch.rot90(x, turns, dims=(2, 3))
    if flip:
        x = torch.flip(x, dims=(3,))
    return x.contiguous()


def undo(y: torch.Tensor, t: int) -> torch.Tensor:
    turns, flip = TRANSFORMS[t]
    if flip:
        y = torch.flip(y, dims=(3,))
    if turns:
        y = torch.rot90(y, -turns, dims=(2, 3))
    return y.contiguous()


def to_output_grid(p: torch.Tensor, geo: BlockGeometry, plan: Plan) -> torch.Tensor:
    """Network-grid probabilities over ``geo.need`` → output-grid probabilities over ``geo.out_box``."""
    if not plan.resamples_output:
        return p
    out, need = geo.out_box, geo.need
    h, w = plan.network.shape
    iy, wy = resample_taps(out.y0, out.y1, plan.net_from_out.y)
    ix, wx = resample_taps(out.x0, out.x1, plan.net_from_out.x)
    p = apply_taps(p, np.clip(iy, 0, h - 1) - need.y0, wy, 1)
    return apply_taps(p, np.clip(ix, 0, w - 1) - need.x0, wx, 2)
