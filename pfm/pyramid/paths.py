"""The piecewise coupled-noise flow of one pyramid stage (Pyramidal Flow Matching, Sec. 3.2.1).

All functions are elementwise in the paper's notation and broadcast, so they apply equally to an
image ``[H, W, C]`` at stage k's resolution and to a packed token batch ``[B, L, P]`` whose window
times ``s, e`` are given per token (``[B, L, 1]``). Time t = 0 is noise, t = 1 is data.
"""

from __future__ import annotations

import jax


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
  t_local = (t - s) / (e - s)
  mean = t_local * e * clean_end + (1.0 - t_local) * s * clean_start
  noise = (x - mean) / (1.0 - t)
  return e * clean_end - s * clean_start - (e - s) * noise


__all__ = [
    "stage_endpoints", "interpolate", "velocity_target", "global_time", "sample_local_time",
    "exact_single_point_velocity",
]
