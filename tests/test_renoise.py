"""Tests of block noise and renoising at jump points (``pfm/pyramid/renoise.py``).

Block noise: the in-block covariance (1 - gamma) I + gamma 1 1^T, independence across blocks, the
lower bound gamma >= -1/(m - 1) and Down(n') = 0 at that bound, for 2x2 spatial blocks (Pyramidal
Flow) and for every block of ``BLOCKS`` (2x2, frame pairs, 2x2x2, 4 frames). Renoising: an
endpoint x̂_{e_{k+1}} drawn by Pyramidal Flow Eq. (9) and mapped by Eq. (13) reproduces the start
distribution of Eq. (8) in mean and covariance (Eq. (13) applied to Eq. (12)), and more generally
TPDiff Eqs. (16)-(18) / Pyramidal Flow Eqs. (18)-(21) hold for any block and both schedules
(mean gamma_s Up(Down(D_k)), covariance sigma_s^2 I); the rescale without corrective noise fails
the same check. The VP renoise coefficients satisfy the jump relation and the covariance match of
TPDiff Eqs. (18)-(19). The statistical tolerances (6 standard errors, fixed seeds) are explained
at ``tests.pyramid_fixtures.n_sigma_tol``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfm.pyramid import renoise, resample, windows
from tests.pyramid_fixtures import (BLOCK_IDS, BLOCKS, DIFFUSIONS, FM, MIN_CORRELATION, VP,
                                    block_covariance_2x2, empirical_covariance,
                                    expected_block_covariance, fast_key, full_shape, make,
                                    n_sigma_tol, renoised_starts, renoised_starts_2x2,
                                    uniform_video)


# --- block noise: 2x2 spatial blocks --------------------------------------------------------------


@pytest.mark.parametrize("correlation", [-1 / 3, -0.2, 0.0])
def test_block_noise_covariance_2x2_block(correlation):
  n = renoise.block_noise(jax.random.key(0), (200_000, 2, 2, 1), correlation)
  cov = block_covariance_2x2(n)
  expected = (1 - correlation) * np.eye(4) + correlation * np.ones((4, 4))
  np.testing.assert_allclose(cov, expected, atol=0.015)
  assert abs(float(np.mean(n))) < 0.01


def test_block_noise_independent_across_blocks():
  n = np.asarray(renoise.block_noise(jax.random.key(1), (50_000, 4, 4, 1), MIN_CORRELATION))
  # Pixel (0, 1) is in the first block, (0, 2) in the next: uncorrelated; (0, 0)-(0, 1): -1/3.
  assert abs(np.mean(n[:, 0, 1, 0] * n[:, 0, 2, 0])) < 0.02
  assert np.mean(n[:, 0, 0, 0] * n[:, 0, 1, 0]) == pytest.approx(-1 / 3, abs=0.02)


def test_block_noise_rejects_correlation_out_of_range_2x2_block():
  with pytest.raises(ValueError, match="correlation"):
    renoise.block_noise(jax.random.key(0), (2, 2, 1), -0.5)


# --- block noise: every block ---------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0], ids=["min", "half_min", "zero"])
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_block_noise_covariance(block, fraction):
  spatial, temporal = block
  m = renoise.block_size(spatial, temporal)
  assert renoise.min_block_correlation(spatial, temporal) == pytest.approx(-1 / (m - 1))
  correlation = fraction * renoise.min_block_correlation(spatial, temporal)
  # Two blocks along every axis: in-block pairs and neighbours in time and in space.
  shape = (2 * temporal, 2 * spatial, 2 * spatial, 1)
  num = 200_000
  noise = renoise.block_noise(fast_key(11), (num, *shape), correlation, spatial, temporal)
  mean, cov = empirical_covariance(noise)
  tol = n_sigma_tol(num)  # about 0.019
  np.testing.assert_allclose(mean, 0.0, atol=n_sigma_tol(num, var=1.0))
  np.testing.assert_allclose(cov, expected_block_covariance(shape, spatial, temporal, correlation),
                             atol=tol)
  if fraction == 1.0:  # at the smallest gamma the block sums vanish: Down(n') = 0 exactly
    np.testing.assert_allclose(resample.down_video(noise[:1000], spatial, temporal), 0.0,
                               atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_block_noise_rejects_correlation_out_of_range(block):
  spatial, temporal = block
  shape = (2 * temporal, 2 * spatial, 2 * spatial, 1)
  lower = renoise.min_block_correlation(spatial, temporal)
  with pytest.raises(ValueError, match="correlation"):
    renoise.block_noise(fast_key(0), shape, lower - 0.01, spatial, temporal)
  with pytest.raises(ValueError, match="correlation"):
    renoise.block_noise(fast_key(0), shape, 0.1, spatial, temporal)
  renoise.block_noise(fast_key(0), shape, lower, spatial, temporal)  # the bound is allowed


# --- renoising: 2x2 spatial blocks, flow matching -------------------------------------------------


@pytest.mark.parametrize("correlation", [-1 / 3, -0.2])
@pytest.mark.parametrize("k", [0, 1])
def test_renoised_endpoint_matches_start_distribution(correlation, k):
  """Eq. (13) applied to Eq. (12) must reproduce Eq. (8) in mean and covariance."""
  w = windows.stage_windows(3, None, correlation, FM)
  x1 = jax.random.uniform(jax.random.key(3), (8, 8, 1), minval=-1, maxval=1)
  samples, start = renoised_starts_2x2(x1, k, w, correlation, 100_000)
  # Eq. (8) mean at stage k's resolution: Up(Down(x, 2^(k+1))).
  target_mean = start * resample.up(resample.down(x1, 2 ** (k + 1)), 2)
  samples = np.asarray(samples).reshape(samples.shape[0], -1)
  np.testing.assert_allclose(samples.mean(0), np.asarray(target_mean).reshape(-1), atol=0.02)
  centred = samples - samples.mean(0)
  cov = centred.T @ centred / samples.shape[0]
  np.testing.assert_allclose(cov, (1 - start) ** 2 * np.eye(cov.shape[0]), atol=0.02)


def test_upsampling_without_corrective_noise_is_detected():
  """The same check fails for the naive jump (rescale only): blocks stay correlated."""
  w = windows.stage_windows(3, None, MIN_CORRELATION, FM)
  x1 = jnp.zeros((8, 8, 1))
  samples, start = renoised_starts_2x2(x1, 0, w, -1 / 3, 20_000, corrective=False)
  samples = np.asarray(samples).reshape(samples.shape[0], -1)
  cov = samples.T @ samples / samples.shape[0]
  assert not np.allclose(cov, (1 - start) ** 2 * np.eye(cov.shape[0]), atol=0.02)


# --- renoising: every block, both schedules -------------------------------------------------------


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("k", [0, 1])
def test_renoise_matches_next_stage_start(block, diffusion, k):
  """TPDiff Eqs. (16)-(18) / Pyramidal Flow Eqs. (18)-(21): mean gamma_s Up(Down(D_k)) and
  covariance sigma_s^2 I over all elements of stage k, for any block and schedule."""
  pyramid = make(3, block, diffusion)
  assert pyramid.jump(k) == block
  stage_shape = (8, 4, 4, 1) if block == (1, 4) else (4, 4, 4, 1)
  x = uniform_video(3, full_shape(pyramid, stage_shape, k))
  num = 100_000
  samples = renoised_starts(pyramid, x, k, num, 10 + k)
  assert samples.shape == (num, *stage_shape)
  sched = pyramid.noise_schedule
  start = pyramid.windows[k][0]
  gamma_s, sigma_s = float(sched.signal(start)), float(sched.noise(start))
  d_k = pyramid.level(x, k)
  target_mean = gamma_s * np.asarray(pyramid.clean_start(d_k, k), np.float64).reshape(-1)
  mean, cov = empirical_covariance(samples)
  # Normalised by sigma_s, mean errors have unit standard error / sqrt(N), covariance entries
  # at most sqrt(2 / N): 6 standard errors each (``tests.pyramid_fixtures.n_sigma_tol``).
  np.testing.assert_allclose((mean - target_mean) / sigma_s, 0.0,
                             atol=n_sigma_tol(num, var=1.0))
  np.testing.assert_allclose(cov / sigma_s**2, np.eye(cov.shape[0]), atol=n_sigma_tol(num))


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_rescale_without_corrective_noise_fails_the_same_check(block, diffusion):
  pyramid = make(2, block, diffusion)
  stage_shape = (8, 4, 4, 1) if block == (1, 4) else (4, 4, 4, 1)
  x = uniform_video(3, full_shape(pyramid, stage_shape, 0))
  num = 20_000
  samples = renoised_starts(pyramid, x, 0, num, 4, corrective=False)
  sigma_s = float(pyramid.noise_schedule.noise(pyramid.windows[0][0]))
  _, cov = empirical_covariance(samples)
  cov = cov / sigma_s**2
  assert not np.allclose(cov, np.eye(cov.shape[0]), atol=n_sigma_tol(num))
  # The elements of a block stay perfectly correlated with variance 1/m: the missing noise.
  m = renoise.block_size(*block)
  partner = 1 if block[0] == 2 else 4 * 4  # the next pixel, or the same pixel in the next frame
  np.testing.assert_allclose(cov[0, 0], 1 / m, rtol=0.05)
  np.testing.assert_allclose(cov[0, partner], 1 / m, rtol=0.05)


# --- renoise coefficients -------------------------------------------------------------------------


@pytest.mark.parametrize("correlation", [-1.0, -1 / 3, -1 / 7, -0.05])
def test_vp_renoise_coefficients(correlation):
  for s in (0.2, 0.5, 0.8):
    e = windows.jump_end(s, correlation, VP)
    ab_s, ab_e = float(VP.alpha_bar(s)), float(VP.alpha_bar(e))
    assert math.sqrt((1 - ab_e) / ab_e) == pytest.approx(
        math.sqrt(-correlation / (1 - correlation) * (1 - ab_s) / ab_s), rel=1e-9)
    rescale, alpha = renoise.renoise_coefficients(s, e, correlation, VP)
    assert rescale == pytest.approx(math.sqrt(ab_s / ab_e), rel=1e-12)
    assert alpha == pytest.approx(math.sqrt((1 - ab_s) / (1 - correlation)), rel=1e-12)
    # Covariance match, diagonal and off-diagonal (TPDiff Eqs. 18-19).
    sigma_e2 = 1 - ab_e
    assert rescale**2 * sigma_e2 + alpha**2 == pytest.approx(1 - ab_s, rel=1e-9)
    assert rescale**2 * sigma_e2 + alpha**2 * correlation == pytest.approx(0.0, abs=1e-12)
