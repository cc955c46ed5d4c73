"""Tests of the pyramid samplers (``pfm/pyramid/samplers.py``) driven by exact fields.

With the exact stage target of a single data point x1, ``sample_pyramid`` (Euler on straight
coupled paths with the Eq. (15) jumps, Pyramidal Flow Algorithm 1; DDIM for the VP schedule) lands
on x1 for any seed, for 2x2 spatial pyramids and for every block and both schedules, and
``integrate_stage`` lands each stage on its coupled endpoint gamma_e D + sigma_e n with the same n
for any number of steps (not only the last stage, whose sigma_e = 0 hides noise errors). A batch
draws each sample's noise from its own key. Wrong fields miss: one scaled by the window width
instead of the Eq. (11) velocity, or by 0.5. Bad arguments (steps per stage, indivisible shapes,
zero steps) are rejected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfm.pyramid import paths, samplers, stages
from tests.pyramid_fixtures import (BLOCK_IDS, BLOCKS, DIFFUSIONS, FM, exact_model_fn, fast_key,
                                    make, normal, sampler_shape, uniform_video)


# --- 2x2 spatial pyramids, flow matching ----------------------------------------------------------


@pytest.mark.parametrize("correlation", [-1 / 3, -0.15])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_sampler_with_exact_velocity_returns_the_data_point(correlation, seed):
  """Euler on straight coupled paths + Eq. (15) jumps must land exactly on x1, for any seed."""
  pyramid = stages.make_pyramid(3, correlation=correlation)
  x1 = jax.random.uniform(jax.random.key(100), (16, 16, 3), minval=-1, maxval=1)

  def velocity_fn(x, t, k):
    s, e = pyramid.windows[k]
    clean = pyramid.level(x1, k)
    return paths.exact_single_point_target(x, t, s, e, clean, pyramid.clean_start(clean, k), FM)

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
    v = paths.exact_single_point_target(x, t, s, e, clean, pyramid.clean_start(clean, k), FM)
    return v * (e - s)

  out = samplers.sample_pyramid(velocity_fn, jax.random.key(0), x1.shape, pyramid, [4, 4, 4])
  assert float(jnp.abs(out - x1).max()) > 1e-1


# --- every block, both schedules ------------------------------------------------------------------


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_sample_pyramid_with_exact_target_returns_the_data_point(block, diffusion):
  pyramid = make(3, block, diffusion)
  shape = sampler_shape(block)
  x1 = uniform_video(100, shape)
  model_fn = exact_model_fn(pyramid, x1)
  keys = jax.random.split(fast_key(7), 3)  # three seeds at once
  out = jax.jit(jax.vmap(
      lambda key: samplers.sample_pyramid(model_fn, key, shape, pyramid, [2, 3, 4])))(keys)
  assert out.shape == (3, *shape)
  np.testing.assert_allclose(out, np.broadcast_to(x1, out.shape), atol=1e-4)


STEPS = (1, 3, 7)


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
def test_each_stage_lands_on_its_coupled_endpoint(block, diffusion):
  """From x̂_s = gamma_s U + sigma_s n the exact field must reach gamma_e D + sigma_e n with the
  same n, at every stage (not only the last, whose sigma_e = 0 hides noise errors), for any
  number of steps; a field scaled by 0.5 must miss."""
  pyramid = make(3, block, diffusion)
  sched = pyramid.noise_schedule
  shape = sampler_shape(block)
  x1 = uniform_video(100, shape)

  def errors(scale):
    model_fn = exact_model_fn(pyramid, x1, scale)
    out = []
    for k in range(pyramid.num_stages):
      s, e = pyramid.windows[k]
      clean = pyramid.level(x1, k)
      clean_start = pyramid.clean_start(clean, k)
      n = normal(30 + k, clean.shape)
      x_s, x_e = paths.stage_endpoints(clean, clean_start, n, s, e, sched)
      for steps in STEPS:
        x = samplers.integrate_stage(model_fn, x_s, k, s, e, steps, sched)
        out.append(jnp.abs(x - x_e).max())
    return jnp.stack(out)

  errors = jax.jit(errors)  # one compilation for both scales
  err = np.asarray(errors(1.0))
  np.testing.assert_allclose(err, 0.0, atol=1e-4)
  err_wrong = np.asarray(errors(0.5))
  assert np.all(err_wrong > 0.05), err_wrong


def test_a_batch_draws_each_sample_as_its_own_key_does():
  """``sample_pyramid_batch``: sample b equals ``sample_pyramid`` with ``keys[b]``, for a field
  that does not remove the noise (half the exact one), so every noise draw shows."""
  pyramid = make(2, (2, 2))
  shape = sampler_shape((2, 2))
  model_fn = exact_model_fn(pyramid, uniform_video(100, shape), 0.5)
  keys = jax.random.split(jax.random.key(3), 2)  # threefry, the sampler's: exact under vmap
  batch = jax.jit(lambda keys: samplers.sample_pyramid_batch(
      model_fn, keys, shape, pyramid, [1, 2]))(keys)
  single = jax.jit(lambda key: samplers.sample_pyramid(model_fn, key, shape, pyramid, [1, 2]))
  for b in range(2):
    np.testing.assert_allclose(batch[b], single(keys[b]), atol=1e-6)
  assert float(jnp.abs(batch[0] - batch[1]).max()) > 0.1


def test_sample_pyramid_rejects_bad_arguments():
  pyramid = make(3, (2, 2))
  fn = exact_model_fn(pyramid, jnp.zeros((8, 8, 8, 1)))
  with pytest.raises(ValueError, match="steps_per_stage"):
    samplers.sample_pyramid(fn, jax.random.key(0), (8, 8, 8, 1), pyramid, [2, 2])
  with pytest.raises(ValueError, match="divisible"):
    samplers.sample_pyramid(fn, jax.random.key(0), (6, 8, 8, 1), pyramid, [2, 2, 2])
  with pytest.raises(ValueError):
    samplers.integrate_stage(fn, jnp.zeros((8, 8, 8, 1)), 0, 0.5, 1.0, 0, FM)
