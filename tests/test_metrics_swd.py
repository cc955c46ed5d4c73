"""Sliced Wasserstein distance of Laplacian-pyramid patches (``pfm/metrics/swd.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pfm.data import manifest, pipeline
from pfm.metrics import swd


@pytest.fixture(scope="module")
def frames():
  """The default videos at 64x64: even frames (the "generated" side) and odd ones (held out)."""
  videos = [pipeline.record_frames(r, (64, 64)) for r in manifest.default_manifest()]
  return (np.concatenate([v[0:80:2] for v in videos]),
          np.concatenate([v[1:80:2] for v in videos]))


def test_laplacian_pyramid_sums_back_to_the_frame():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 64, 64, 3))
  levels = swd.laplacian_pyramid(x, 3)
  assert [lv.shape[1] for lv in levels] == [64, 32, 16]
  recon = levels[-1]
  for band in reversed(levels[:-1]):
    recon = band + swd._upsample(recon, band.shape[1:3])
  np.testing.assert_allclose(recon, x, atol=1e-12)
  # The band-pass levels of a constant image are zero; the low-pass keeps the constant.
  const = swd.laplacian_pyramid(np.full((1, 32, 32, 3), 0.3), 2)
  np.testing.assert_allclose(const[0], 0.0, atol=1e-12)
  np.testing.assert_allclose(const[1], 0.3, atol=1e-12)
  with pytest.raises(ValueError, match="under one"):
    swd.laplacian_pyramid(x, 5)


def test_sliced_wasserstein_1_of_shifted_gaussians():
  """Projected on unit directions, N(0, I) and N(m, I) differ by a shift of m.u: the 1-D W1
  distance is |m.u|, whose mean over random directions in D dims is |m| E|u_1|."""
  rng = np.random.default_rng(0)
  d, n = 4, 40_000
  a = rng.standard_normal((n, d))
  b = rng.standard_normal((n, d)) + np.array([2.0, 0, 0, 0])
  u = rng.standard_normal((400_000, d))
  expected = 2.0 * np.mean(np.abs(u[:, 0]) / np.linalg.norm(u, axis=1))
  got = swd.sliced_wasserstein_1(a, b, 2048, rng)
  assert got == pytest.approx(expected, rel=0.03)
  assert swd.sliced_wasserstein_1(a, a.copy(), 256, rng) == pytest.approx(0.0, abs=1e-12)


def test_real_frames_score_below_corrupted_ones(frames):
  generated, held_out = frames
  rng = np.random.default_rng(0)
  real = swd.sliced_wasserstein(generated, held_out)
  assert set(real) == {"level_64", "level_32", "level_16", "avg"}
  noisy = np.clip(generated.astype(int) + rng.integers(-40, 41, generated.shape), 0, 255)
  blurred = ndimage.uniform_filter(generated.astype(float), size=(1, 5, 5, 1))
  # The 8x8 patch grid of a pixel-space DiT: a brightness offset per 8x8 block.
  offsets = np.repeat(np.repeat(rng.integers(-25, 26, (len(generated), 8, 8, 1)), 8, 1), 8, 2)
  seams = np.clip(generated.astype(int) + offsets, 0, 255)
  for name, corrupted in (("noise", noisy), ("blur", blurred), ("seams", seams)):
    score = swd.sliced_wasserstein(corrupted.astype(np.uint8), held_out)
    assert score["avg"] > 2.0 * real["avg"], (name, score, real)
  # Noise and blur are failures of fine detail: the finest level moves most.
  score = swd.sliced_wasserstein(noisy.astype(np.uint8), held_out)
  assert score["level_64"] > 5.0 * real["level_64"] and score["level_64"] > score["level_16"]


def test_default_levels_and_errors():
  assert swd.default_num_levels(64, 64) == 3 and swd.default_num_levels(32, 32) == 2
  assert swd.default_num_levels(16, 16) == 1
  with pytest.raises(ValueError, match="differ"):
    swd.sliced_wasserstein(np.zeros((2, 32, 32, 3), np.uint8), np.zeros((2, 64, 64, 3), np.uint8))
