"""The piecewise coupled-noise flow of one pyramid stage (Pyramidal Flow Matching, Sec. 3.2.1).

All functions are elementwise in the paper's notation and broadcast, so they apply equally to an
image ``[H, W, C]`` at stage k's resolution and to a packed token batch ``[B, L, P]`` whose window
times ``s, e`` are given per token (``[B, L, 1]``). Time t = 0 is noise, t = 1 is data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stage_endpoints(clean_end, clean_start, noise, s, e):
  """Eqs. (9)-(10): the stage's end and start points, coupled through one noise ``n``.

  Args:
    clean_end: Down(x1, 2^k), the clean data at stage k's resolution; pixels in [-1, 1].
    clean_start: Up(Down(x1, 2^(k+1))), same shape.
    noise: n ~ N(0, I), same shape.
    s, e: the stage window ``[s_k, e_k]``, broadcastable, 0 <= s < e <= 1.

  Returns:
    ``(x_start, x_end)``: x̂_{s_k} = s Up(Down(x1)) + (1 - s) n and x̂_{e_k} = e Down(x1) + (1 - e) n.
  """
  x_end = e * clean_end + (1.0 - e) * noise
  x_start = s * clean_start + (1.0 - s) * noise
  return x_start, x_end


def interpolate(x_start, x_end, t_local):
  """Eq. (6): x̂_t = t' x̂_{e_k} + (1 - t') x̂_{s_k} for the rescaled time t' = (t - s_k)/(e_k - s_k)."""
  return t_local * x_end + (1.0 - t_local) * x_start


def velocity_target(x_start, x_end):
  """Eq. (11): the regression target u = x̂_{e_k} - x̂_{s_k}, the velocity d x̂_t / d t'."""
  return x_end - x_start


def global_time(t_local, s, e):
  """t = s_k + t' (e_k - s_k): the time in [0, 1] that conditions the model."""
  return s + t_local * (e - s)


def sample_local_time(key, shape, distribution: str = "uniform", mean: float = 0.0,
                      std: float = 1.0):
  """Draws the rescaled stage time t' in [0, 1).

  Args:
    key: a PRNG key.
    shape: output shape.
    distribution: ``"uniform"`` (the paper) or ``"logit_normal"`` (t' = sigmoid(mean + std z), the
      SD3 timestep density).
    mean, std: logit-normal parameters.

  Returns:
    float32 array of ``shape``.

  Raises:
    ValueError: for an unknown distribution.
  """
  if distribution == "uniform":
    return jax.random.uniform(key, shape)
  if distribution == "logit_normal":
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape))
  raise ValueError(f"unknown time distribution {distribution!r}; use 'uniform' or 'logit_normal'")


def velocity_from_clean(x_t, clean_end_hat, clean_start_hat, t_local, s, e,
                        min_noise: float = 1e-6):
  """The stage velocity implied by a prediction of the clean endpoint (x-prediction).

  On the coupled path x̂_t = m + (1 - t) n with m = t' e D + (1 - t') s U (Eqs. 6, 9, 10), a
  prediction D̂ of D = Down(x1, 2^k) (and Û = Up(Down(D̂, 2)), the start mean it implies) gives
  n̂ = (x̂_t - m̂) / (1 - t) and the Eq. (11) velocity v̂ = e D̂ - s Û - (e - s) n̂.

  Predicting clean pixels rather than the velocity lets a network whose width is below the patch
  dimension (p * p * 3) still denoise: the noise is recovered analytically instead of being carried
  through the network, which cannot pass a full-rank noise vector through a narrower bottleneck.

  Args:
    x_t: x̂_t. clean_end_hat: D̂. clean_start_hat: Û. All the same shape.
    t_local: t' in [0, 1). s, e: the stage window (broadcastable).
    min_noise: lower clip of 1 - t, guarding the division near t = 1.

  Returns:
    v̂, the shape of ``x_t``.
  """
  t = global_time(t_local, s, e)
  mean = t_local * e * clean_end_hat + (1.0 - t_local) * s * clean_start_hat
  noise = (x_t - mean) / jnp.maximum(1.0 - t, min_noise)
  return e * clean_end_hat - s * clean_start_hat - (e - s) * noise


def exact_single_point_velocity(x, t, s, e, clean_end, clean_start):
  """The exact marginal velocity d x̂/dt' when the data distribution is a single point.

  On the coupled path x̂_t = m(t) + (1 - t) n with m(t) = t' e D + (1 - t') s U (from Eqs. 6, 9, 10),
  n is recovered from x̂_t, so the marginal velocity equals the conditional one,
  u = e D - s U - (e - s) n (Eq. 11). Used to test samplers: Euler integration of a straight path
  is exact, so a sampler driven by this field must return the data point itself.

  Args:
    x: x̂_t at stage resolution. t: global time in [s, e), scalar or broadcastable.
    s, e: the stage window. clean_end: D = Down(x1, 2^k). clean_start: U = Up(Down(x1, 2^(k+1))).
  """
  return velocity_from_clean(x, clean_end, clean_start, (t - s) / (e - s), s, e)
