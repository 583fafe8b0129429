"""The block function's steps on their own: lookup tables, resampling taps, test-time views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilefeet.block import apply_taps, device_lut
from tilefeet.geometry import AxisMap, resample_taps
from tilefeet.intensity import Normalization, make_intensity_map


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_the_lookup_table_is_the_intensity_map(dtype):
    imap = make_intensity_map("bundle", Normalization(mean=100.0, std=30.0), None, dtype=np.dtype(dtype))
    info = np.iinfo(dtype)
    raw = np.random.default_rng(0).integers(info.min, info.max, (50, 60), endpoint=True).astype(dtype)
    lut = device_lut(imap, np.dtype(dtype).name, "cpu")
    idx = torch.from_numpy(raw.astype(np.int64) - int(info.min))
    np.testing.assert_allclose(lut[idx].numpy(), imap(raw), rtol=0, atol=1e-6)


def test_taps_are_a_weighted_sum_in_tap_order():
    x = torch.from_numpy(np.random.default_rng(1).random((3, 40)).astype(np.float32))
    idx, w = resample_taps(0, 25, AxisMap(1.6, 0.3))
    idx = np.clip(idx, 0, 39)
    got = apply_taps(x, idx, w, 1).numpy()
    ref = sum(x.numpy()[:, idx[:, t]] * w[:, t] for t in range(idx.shape[1]))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
