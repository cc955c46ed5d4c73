"""The patch-grid seam ratio (``pfm/metrics/seams.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pfm.data import manifest, pipeline
from pfm.metrics import seams


@pytest.fixture(scope="module")
def frames():
  """Every 4th frame of the default videos at 64x64, uint8."""
  videos = [pipeline.record_frames(r, (64, 64)) for r in manifest.default_manifest()]
  return np.concatenate([v[:80:4] for v in videos])


def test_a_ramp_has_no_seams_and_a_patchwise_offset_has_them():
  ramp = np.broadcast_to(np.arange(32.0)[None, :, None], (32, 32, 3))   # steps of 1 along x
  assert seams.seam_ratio(ramp, 8) == pytest.approx(1.0, abs=1e-12)
  # +d on a checkerboard of 8x8 patches: every border step becomes 2d (plus 1 along x).
  d = 5.0
  board = d * (2 * ((np.arange(32)[:, None] // 8 + np.arange(32)[None] // 8) % 2) - 1)
  border, interior = seams.border_and_interior_steps(ramp + board[..., None], 8)
  assert interior == pytest.approx(0.5)                  # half the pairs step 1, half 0
  # Across x: |1 +- 2d| averaged over the alternating signs = 2d; across y: 2d.
  assert border == pytest.approx(2 * d)
  assert seams.seam_ratio(np.kron(np.eye(4), np.ones((8, 8)))[..., None], 8) == float("inf")


def test_real_frames_score_about_one_and_seamed_ones_above(frames):
  real = seams.seam_ratio(frames, 8)
  assert 0.8 < real < 1.25, real
  rng = np.random.default_rng(0)
  offsets = np.repeat(np.repeat(rng.integers(-12, 13, (len(frames), 8, 8, 1)), 8, 1), 8, 2)
  seamed = np.clip(frames.astype(int) + offsets, 0, 255)
  assert seams.seam_ratio(seamed, 8) > 1.3 * real
  # Blur inside each patch only (the look of a patch head that cannot resolve detail) raises
  # it; blur across the patches (what blending does) lowers it.
  patches = frames.reshape(len(frames), 8, 8, 8, 8, 3).astype(float)
  inside = ndimage.uniform_filter(patches, size=(1, 1, 3, 1, 3, 1), mode="nearest")
  assert seams.seam_ratio(inside.reshape(frames.shape), 8) > 1.2 * real
  across = ndimage.uniform_filter(frames.astype(float), size=(1, 3, 3, 1))
  assert seams.seam_ratio(across, 8) < 1.1 * real
  # A grid at another period is not this model's seams.
  assert seams.seam_ratio(seamed, 16) < seams.seam_ratio(seamed, 8)


def test_bad_patch_sizes_are_refused():
  with pytest.raises(ValueError, match="divide"):
    seams.seam_ratio(np.zeros((2, 30, 32, 3)), 8)
  with pytest.raises(ValueError, match=">= 2"):
    seams.seam_ratio(np.zeros((2, 32, 32, 3)), 1)


def test_each_stage_grid_is_told_apart():
  """Offsets per 16x16 block show at the 16 and 32 grids, not at the 8 grid alone."""
  rng = np.random.default_rng(1)
  frames = rng.normal(size=(4, 64, 64, 3))
  blocks = np.repeat(np.repeat(rng.normal(size=(4, 4, 4, 1)) * 5, 16, 1), 16, 2)
  ratios = seams.seam_ratios_by_period(frames + blocks, (8, 16, 32))
  assert list(ratios) == [8, 16, 32]
  assert ratios[8] == pytest.approx(1.0, abs=0.05)
  assert ratios[16] > 2 and ratios[32] > 2
  # One period is the plain seam ratio.
  assert seams.seam_ratios_by_period(frames + blocks, (16,))[16] == pytest.approx(
    seams.seam_ratio(frames + blocks, 16))
  with pytest.raises(ValueError, match="nest"):
    seams.seam_ratios_by_period(frames[:, :48, :48], (12, 16))
