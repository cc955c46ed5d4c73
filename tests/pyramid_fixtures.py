"""Shared helpers of the tests of ``pfm.pyramid``, one test file per module (not a test file).

The pyramids, fixed inputs, keys and statistics that the tests of the schedules, resampling,
renoising, windows, paths, samplers and stages build on, in the project's convention (t = 0 noise,
t = 1 data). Import as ``from tests.pyramid_fixtures import ...``. The statistical tolerances are
explained at ``n_sigma_tol``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pfm.pyramid import paths, renoise, resample, stages, windows
from pfm.pyramid import diffusions

FM = diffusions.FlowMatching()
VP = diffusions.VariancePreserving()
DIFFUSIONS = ("flow_matching", "ddim")
MIN_CORRELATION = windows.MIN_SPATIAL_CORRELATION  # a 2x2 block's smallest correlation, -1/3

# (spatial, temporal) upsampling factors of one jump and the block size m = spatial^2 * temporal.
BLOCKS = [(2, 1), (1, 2), (2, 2), (1, 4)]
BLOCK_IDS = ["2x2_m4", "t2_m2", "2x2x2_m8", "t4_m4"]
SQRT2 = math.sqrt(2.0)


def n_sigma_tol(num: int, n_sigma: float = 6.0, var: float = 2.0) -> float:
  """n_sigma standard errors of an empirical (co)variance entry of unit-variance data.

  Statistical tolerances. For N i.i.d. draws of a Gaussian vector with covariance C, the empirical
  mean of element i has standard error sqrt(C_ii / N) and the empirical covariance entry (i, j) has
  standard error sqrt((C_ii C_jj + C_ij^2) / N) <= sqrt(2 / N) once normalised to unit variance.
  The checks compare every entry of a covariance matrix of up to 128 x 128 (about 8 * 10^3
  distinct entries) at once; the largest of 10^4 standard normals is about 4 standard errors, so
  the tolerances are 6 standard errors (a false failure has probability below 10^-4 per test; the
  seeds are fixed, so the tests are deterministic). That is 0.019 for the block noise (N = 200k)
  and 0.027 for the renoised starts (N = 100k), while the smallest effects the tests must see are
  the in-block correlation -1/14 = -0.071 of a 2x2x2 block at half its minimum gamma and the
  missing variance 1 - 1/m >= 1/2 of a jump without corrective noise.
  """
  return n_sigma * math.sqrt(var / num)


# --- pyramids and inputs ------------------------------------------------------------------------


def make(num_stages: int, block, diffusion: str = "flow_matching", **kwargs) -> stages.Pyramid:
  """A pyramid whose every jump has the given (spatial, temporal) block."""
  spatial, temporal = block
  return stages.make_pyramid(num_stages, spatial=spatial == 2,
                             frame_rate_schedule=str(temporal) if temporal > 1 else "",
                             diffusion=diffusion, **kwargs)


def full_shape(pyramid: stages.Pyramid, stage_shape, k: int):
  """The full-size [T, H, W, C] whose stage-k size is ``stage_shape``."""
  t, h, w, c = stage_shape
  fs, ft = pyramid.spatial_factors[k], pyramid.temporal_factors[k]
  return (t * ft, h * fs, w * fs, c)


def uniform_video(seed: int, shape) -> jax.Array:
  """A fixed clean video in [-1, 1] (NumPy's generator: nothing to compile)."""
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


def normal(seed: int, shape) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def fast_key(seed: int):
  """A PRNG key for the code under test whose normals compile in a fraction of the default
  threefry's time (about 0.2 s instead of 0.9 s per shape on CPU); same maths, other bits."""
  return jax.random.key(seed, impl="rbg")


def rho(schedule, t):
  """Noise-to-signal ratio straight from the coefficients (not schedule.noise_to_signal)."""
  return float(schedule.noise(float(t))) / float(schedule.signal(float(t)))


def eq25_end(s, correlation):
  """Eq. (25) exactly as printed in Appendix A."""
  a, b = math.sqrt(1 - correlation), math.sqrt(-correlation)
  return s * a / ((1 - s) * b + s * a)


# --- empirical moments --------------------------------------------------------------------------


def block_covariance_2x2(noise):
  """[N, 2, 2, 1] -> empirical 4x4 covariance of the block elements."""
  flat = np.asarray(noise).reshape(noise.shape[0], 4)
  return flat.T @ flat / flat.shape[0]


def expected_block_covariance(shape, spatial, temporal, correlation):
  """(1 - gamma) I + gamma 1 1^T inside each block, 0 across blocks, over all elements."""
  t, h, w = np.meshgrid(*(np.arange(n) for n in shape[:3]), indexing="ij")
  block = (t // temporal * 10_000 + h // spatial * 100 + w // spatial).reshape(-1)
  same = block[:, None] == block[None, :]
  return np.where(same, correlation, 0.0) + (1 - correlation) * np.eye(len(block))


@jax.jit
def _chunked_moments(flat):
  """Per-chunk sums and centred cross-products of [N, D] (N divisible by 10^4) in float32; 10^4
  terms per float32 sum keep the rounding error near 1e-5, far below the tolerances."""
  num = flat.shape[0]
  mean = flat.mean(0)
  chunks = (flat - mean).reshape(num // 10_000, 10_000, -1)
  return mean, jnp.einsum("cni,cnj->cij", chunks, chunks, precision="highest")


def empirical_covariance(samples):
  """[N, ...] -> (mean [D], covariance [D, D]), the chunks summed in float64. (jitted XLA: this
  NumPy's matmul is 20x slower.)"""
  flat = jnp.asarray(samples, jnp.float32).reshape(samples.shape[0], -1)
  mean, cross = _chunked_moments(flat)
  return np.asarray(mean, np.float64), np.asarray(cross, np.float64).sum(0) / flat.shape[0]


# --- renoised starts ----------------------------------------------------------------------------


def renoised_starts_2x2(x1, k, w, correlation, num, corrective=True):
  """Draws x̂_{e_{k+1}} by Eq. (9) at stage k + 1 and maps it to stage k by Eq. (13)."""
  clean_coarse = resample.down(x1, 2 ** (k + 1))
  end = float(w[k + 1, 1])
  start = float(w[k, 0])

  def one(key):
    key_n, key_r = jax.random.split(key)
    x_end = end * clean_coarse + (1 - end) * jax.random.normal(key_n, clean_coarse.shape)
    return renoise.renoise(key_r, x_end, start, end, correlation, FM, corrective=corrective)

  return jax.vmap(one)(jax.random.split(jax.random.key(2), num)), start


def renoised_starts(pyramid, x, k, num, seed, corrective=True):
  """Draws x̂_{e_{k+1}} = gamma_e D_{k+1} + sigma_e n at stage k + 1 and jumps into stage k."""
  sched = pyramid.noise_schedule
  end = pyramid.windows[k + 1][1]
  d_coarse = pyramid.level(x, k + 1)
  x_end = (float(sched.signal(end)) * d_coarse
           + float(sched.noise(end)) * normal(seed, (num, *d_coarse.shape)))
  return pyramid.renoise(fast_key(seed), x_end, k, corrective=corrective)


# --- stage paths and exact fields ---------------------------------------------------------------


def path_fixture():
  d, u, n = normal(21, (3, 4, 4, 4, 3))
  return d, u, n


def exact_model_fn(pyramid, x1, scale=1.0):
  """The exact stage target of the single data point x1 (optionally scaled: a wrong field)."""

  def model_fn(x, t, k):
    s, e = pyramid.windows[k]
    clean = pyramid.level(x1, k)
    return scale * paths.exact_single_point_target(x, t, s, e, clean,
                                                   pyramid.clean_start(clean, k),
                                                   pyramid.noise_schedule)

  return model_fn


def sampler_shape(block):
  spatial, temporal = block
  return (2 * temporal**2, 2 * spatial**2, 2 * spatial**2, 2)  # coarsest stage [2, 2, 2, 2]
