"""Numerical tests of the spatial pyramid maths against the paper's distributions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfm.pyramid import paths, renoise, resample, samplers, schedules, stages, windows

FLOW_MATCHING = schedules.FlowMatching()
MIN_GAMMA = windows.MIN_SPATIAL_GAMMA  # a 2x2 block's smallest in-block correlation, -1/3


def eq25_end(s, gamma):
  """Eq. (25) exactly as printed in Appendix A."""
  a, b = math.sqrt(1 - gamma), math.sqrt(-gamma)
  return s * a / ((1 - s) * b + s * a)


def test_uniform_three_stage_windows():
  w = windows.stage_windows(3, None, MIN_GAMMA, FLOW_MATCHING)
  np.testing.assert_allclose(w, [[0.5, 1.0], [0.2, 2 / 3], [0.0, 1 / 3]], atol=1e-12)


@pytest.mark.parametrize("gamma", [-1 / 3, -0.25, -0.1])
def test_jump_relation_matches_eq25(gamma):
  for s in [0.1, 0.2, 0.5, 0.8]:
    assert windows.jump_end(s, gamma, FLOW_MATCHING) == pytest.approx(eq25_end(s, gamma))
    end = windows.jump_end(s, gamma, FLOW_MATCHING)
    assert windows.jump_start(end, gamma, FLOW_MATCHING) == pytest.approx(s)
  # Eq. (26) at gamma = -1/3.
  assert windows.jump_end(0.3, MIN_GAMMA, FLOW_MATCHING) == pytest.approx(2 * 0.3 / 1.3)


@pytest.mark.parametrize("bad", [[0.5], [0.6, 0.4], [0.0, 0.5], [0.5, 1.0]])
def test_bad_boundaries_raise(bad):
  with pytest.raises(ValueError, match="boundar"):
    windows.stage_windows(3, bad, MIN_GAMMA, FLOW_MATCHING)


def test_down_up_levels():
  x = np.arange(4 * 4, dtype=np.float32).reshape(4, 4, 1)
  d = resample.down(x, 2)
  np.testing.assert_allclose(d[..., 0], [[2.5, 4.5], [10.5, 12.5]])
  u = resample.up(d, 2)
  assert u.shape == x.shape and u[0, 1, 0] == u[1, 0, 0] == 2.5
  # Down composes: Down(Down(x, 2), 2) == Down(x, 4).
  y = np.random.default_rng(0).normal(size=(8, 8, 3))
  np.testing.assert_allclose(resample.down(resample.down(y, 2), 2), resample.down(y, 4))


def _block_covariance(noise):
  """[N, 2, 2, 1] -> empirical 4x4 covariance of the block elements."""
  flat = np.asarray(noise).reshape(noise.shape[0], 4)
  return flat.T @ flat / flat.shape[0]


@pytest.mark.parametrize("gamma", [-1 / 3, -0.2, 0.0])
def test_block_noise_covariance(gamma):
  n = renoise.block_noise(jax.random.key(0), (200_000, 2, 2, 1), gamma)
  cov = _block_covariance(n)
  expected = (1 - gamma) * np.eye(4) + gamma * np.ones((4, 4))
  np.testing.assert_allclose(cov, expected, atol=0.015)
  assert abs(float(np.mean(n))) < 0.01


def test_block_noise_independent_across_blocks():
  n = np.asarray(renoise.block_noise(jax.random.key(1), (50_000, 4, 4, 1), MIN_GAMMA))
  # Pixel (0, 1) is in the first block, (0, 2) in the next: uncorrelated; (0, 0)-(0, 1): -1/3.
  assert abs(np.mean(n[:, 0, 1, 0] * n[:, 0, 2, 0])) < 0.02
  assert np.mean(n[:, 0, 0, 0] * n[:, 0, 1, 0]) == pytest.approx(-1 / 3, abs=0.02)


def test_block_noise_rejects_gamma_out_of_range():
  with pytest.raises(ValueError, match="gamma"):
    renoise.block_noise(jax.random.key(0), (2, 2, 1), -0.5)


def _renoised_start_samples(x1, k, w, gamma, num, corrective=True):
  """Draws x̂_{e_{k+1}} by Eq. (9) at stage k + 1 and maps it to stage k by Eq. (13)."""
  clean_coarse = resample.down(x1, 2 ** (k + 1))
  end = float(w[k + 1, 1])
  start = float(w[k, 0])

  def one(key):
    key_n, key_r = jax.random.split(key)
    x_end = end * clean_coarse + (1 - end) * jax.random.normal(key_n, clean_coarse.shape)
    if corrective:
      return renoise.renoise(key_r, x_end, start, end, gamma, FLOW_MATCHING)
    return (start / end) * resample.up(x_end, 2)

  return jax.vmap(one)(jax.random.split(jax.random.key(2), num)), start


@pytest.mark.parametrize("gamma", [-1 / 3, -0.2])
@pytest.mark.parametrize("k", [0, 1])
def test_renoised_endpoint_matches_start_distribution(gamma, k):
  """Eq. (13) applied to Eq. (12) must reproduce Eq. (8) in mean and covariance."""
  w = windows.stage_windows(3, None, gamma, FLOW_MATCHING)
  x1 = jax.random.uniform(jax.random.key(3), (8, 8, 1), minval=-1, maxval=1)
  samples, start = _renoised_start_samples(x1, k, w, gamma, 100_000)
  # Eq. (8) mean at stage k's resolution: Up(Down(x, 2^(k+1))).
  target_mean = start * resample.up(resample.down(x1, 2 ** (k + 1)), 2)
  samples = np.asarray(samples).reshape(samples.shape[0], -1)
  np.testing.assert_allclose(samples.mean(0), np.asarray(target_mean).reshape(-1), atol=0.02)
  centred = samples - samples.mean(0)
  cov = centred.T @ centred / samples.shape[0]
  np.testing.assert_allclose(cov, (1 - start) ** 2 * np.eye(cov.shape[0]), atol=0.02)


def test_upsampling_without_corrective_noise_is_detected():
  """The same check fails for the naive jump (rescale only): blocks stay correlated."""
  w = windows.stage_windows(3, None, MIN_GAMMA, FLOW_MATCHING)
  x1 = jnp.zeros((8, 8, 1))
  samples, start = _renoised_start_samples(x1, 0, w, -1 / 3, 20_000, corrective=False)
  samples = np.asarray(samples).reshape(samples.shape[0], -1)
  cov = samples.T @ samples / samples.shape[0]
  assert not np.allclose(cov, (1 - start) ** 2 * np.eye(cov.shape[0]), atol=0.02)


def test_coupled_path_endpoints_and_target():
  key = jax.random.key(4)
  d, u, n = jax.random.normal(key, (3, 4, 4, 3))
  s, e = 0.2, 2 / 3
  x_s, x_e = paths.stage_endpoints(d, u, n, s, e, FLOW_MATCHING)
  np.testing.assert_allclose(paths.interpolate(x_s, x_e, 0.0), x_s)
  np.testing.assert_allclose(paths.interpolate(x_s, x_e, 1.0), x_e)
  # The noise coefficient of x̂_t is 1 - t (Eq. 6 with Eqs. 9-10).
  t_local = 0.3
  t = paths.global_time(t_local, s, e)
  x_t_noise_only = paths.interpolate(
      *paths.stage_endpoints(0 * d, 0 * u, n, s, e, FLOW_MATCHING), t_local)
  np.testing.assert_allclose(x_t_noise_only, (1 - t) * n, rtol=1e-6, atol=1e-6)
  # The target is the derivative of the path in t'.
  h = 1e-3
  finite = (paths.interpolate(x_s, x_e, t_local + h) - paths.interpolate(x_s, x_e, t_local)) / h
  np.testing.assert_allclose(finite, paths.velocity_target(x_s, x_e), atol=1e-2)


def test_local_time_distributions():
  u = paths.sample_local_time(jax.random.key(0), (100_000,))
  assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.01
  ln = paths.sample_local_time(jax.random.key(0), (100_000,), "logit_normal")
  assert abs(float(jnp.median(ln)) - 0.5) < 0.01 and float(ln.std()) < float(u.std())
  with pytest.raises(ValueError):
    paths.sample_local_time(jax.random.key(0), (1,), "beta")


@pytest.mark.parametrize("gamma", [-1 / 3, -0.15])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_sampler_with_exact_velocity_returns_the_data_point(gamma, seed):
  """Euler on straight coupled paths + Eq. (15) jumps must land exactly on x1, for any seed."""
  pyramid = stages.make_pyramid(3, gamma=gamma)
  x1 = jax.random.uniform(jax.random.key(100), (16, 16, 3), minval=-1, maxval=1)

  def velocity_fn(x, t, k):
    s, e = pyramid.windows[k]
    clean = pyramid.level(x1, k)
    return paths.exact_single_point_target(x, t, s, e, clean, pyramid.start_mean(clean, k),
                                           FLOW_MATCHING)

  out = jax.jit(lambda key: samplers.sample_pyramid(
      velocity_fn, key, x1.shape, pyramid, [3, 5, 2]))(jax.random.key(seed))
  np.testing.assert_allclose(out, x1, atol=1e-4)


def test_sampler_is_bound_to_the_eq11_velocity_scale():
  """A field scaled by the window width instead of the Eq. (11) velocity must miss the data
  point: the test can fail."""
  pyramid = stages.make_pyramid(3)
  x1 = jax.random.uniform(jax.random.key(100), (16, 16, 3), minval=-1, maxval=1)

  def velocity_fn(x, t, k):
    s, e = pyramid.windows[k]
    clean = pyramid.level(x1, k)
    v = paths.exact_single_point_target(x, t, s, e, clean, pyramid.start_mean(clean, k),
                                        FLOW_MATCHING)
    return v * (e - s)

  out = samplers.sample_pyramid(velocity_fn, jax.random.key(0), x1.shape, pyramid, [4, 4, 4])
  assert float(jnp.abs(out - x1).max()) > 1e-1


def test_target_from_clean_is_exact_for_the_true_clean_endpoint():
  key = jax.random.key(5)
  x1 = jax.random.uniform(key, (8, 8, 3), minval=-1, maxval=1)
  d, u = x1, resample.up(resample.down(x1, 2), 2)
  n = jax.random.normal(jax.random.key(6), d.shape)
  s, e, t_local = 0.5, 1.0, 0.7
  x_s, x_e = paths.stage_endpoints(d, u, n, s, e, FLOW_MATCHING)
  x_t = paths.interpolate(x_s, x_e, t_local)
  np.testing.assert_allclose(
      paths.target_from_clean(x_t, d, u, t_local, s, e, FLOW_MATCHING), paths.velocity_target(x_s, x_e),
      atol=1e-5)
  # A wrong clean prediction gives a wrong velocity.
  assert not np.allclose(paths.target_from_clean(x_t, d + 0.1, u, t_local, s, e, FLOW_MATCHING),
                         paths.velocity_target(x_s, x_e), atol=1e-2)
