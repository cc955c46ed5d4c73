"""Stage-wise diffusion: the path and target inside one pyramid stage, for flow matching and DDIM.

Stage k runs from x̂_{s_k} to x̂_{e_k}, two points coupled through one noise draw n (Pyramidal Flow
Eqs. 9-10, TPDiff Eqs. 7-8, project convention t = 0 noise, t = 1 data):

    x̂_{s_k} = gamma_{s_k} Up(Down(D)) + sigma_{s_k} n,     x̂_{e_k} = gamma_{e_k} D + sigma_{e_k} n,

with D the clean data at stage k's size and (gamma_t, sigma_t) the noise schedule
(``pfm.pyramid.diffusions``). Inside the stage (TPDiff Sec. 3.3-3.4, Algorithm 2):

* flow matching: a complete flow between the endpoints, x̂_t = (1 - t') x̂_s + t' x̂_e with
  t' = (t - s_k) / (e_k - s_k), target the velocity d x̂_t / d t' = x̂_e - x̂_s (TPDiff Eqs. 12-13,
  Pyramidal Flow Eqs. 6, 11);
* DDIM: the stage noise eps_k of TPDiff Eq. (11) and x_t on the DDIM path of Eq. (10), target eps_k.

All functions are elementwise and broadcast, so they apply equally to a video ``[T, H, W, C]`` at
stage k's size and to a packed token batch ``[B, L, P]`` whose window times are given per token
(``[B, L, 1]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pfm.pyramid import diffusions

def is_ddim(noise_schedule: diffusions.NoiseSchedule) -> bool:
  """True for the variance-preserving schedule, whose stages use TPDiff's DDIM equations."""
  return isinstance(noise_schedule, diffusions.VariancePreserving)


def stage_endpoints(clean_end, clean_start, noise, s, e, noise_schedule: diffusions.NoiseSchedule):
  """Pyramidal Flow Eqs. (9)-(10), TPDiff Eqs. (7)-(8): the stage's start and end points.

  Args:
    clean_end: D = Down(x, 2^k), the clean data at stage k's size; pixels in [-1, 1].
    clean_start: Up(Down(D)), the start mean, same shape (zero at the coarsest stage, whose start
      is pure noise for flow matching and nearly so for DDIM).
    noise: n ~ N(0, I), same shape.
    s, e: the stage window ``[s_k, e_k]``, broadcastable, 0 <= s < e <= 1.
    noise_schedule: the diffusion's coefficients.

  Returns:
    ``(x_start, x_end)`` = (gamma_s U + sigma_s n, gamma_e D + sigma_e n).
  """
  x_start = noise_schedule.signal(s) * clean_start + noise_schedule.noise(s) * noise
  x_end = noise_schedule.signal(e) * clean_end + noise_schedule.noise(e) * noise
  return x_start, x_end


def interpolate(x_start, x_end, t_local):
  """Flow matching, TPDiff Eq. (12) / Pyramidal Flow Eq. (6): x̂_t = (1 - t') x̂_s + t' x̂_e."""
  return t_local * x_end + (1.0 - t_local) * x_start


def velocity_target(x_start, x_end):
  """Flow matching, TPDiff Eq. (13) / Pyramidal Flow Eq. (11): d x̂_t / d t' = x̂_e - x̂_s."""
  return x_end - x_start


def stage_noise(x_start, x_end, s, e, noise_schedule):
  """DDIM, TPDiff Eq. (11): eps_k = (x̂_e / gamma_e - x̂_s / gamma_s) / (rho_e - rho_s).

  With rho = sigma / gamma the noise-to-signal ratio. The stage's DDIM path is a straight line in
  the coordinates (rho, x / gamma), and eps_k is its slope.
  """
  rho_s, rho_e = noise_schedule.noise_to_signal(s), noise_schedule.noise_to_signal(e)
  return (x_end / noise_schedule.signal(e) - x_start / noise_schedule.signal(s)) / (rho_e - rho_s)


def ddim_point(x_start, eps, t, s, noise_schedule):
  """DDIM, TPDiff Eq. (10): x_t = (gamma_t / gamma_s) x̂_s + gamma_t eps_k (rho_t - rho_s)."""
  gamma_t = noise_schedule.signal(t)
  rho_t, rho_s = noise_schedule.noise_to_signal(t), noise_schedule.noise_to_signal(s)
  return gamma_t / noise_schedule.signal(s) * x_start + gamma_t * eps * (rho_t - rho_s)


def global_time(t_local, s, e):
  """t = s_k + t' (e_k - s_k): the time in [0, 1] that conditions the model."""
  return s + t_local * (e - s)


def stage_point(x_start, x_end, t_local, s, e, noise_schedule: diffusions.NoiseSchedule):
  """x_t at rescaled stage time t' in [0, 1]: Eq. (12) for flow matching, Eq. (10) for DDIM."""
  if not is_ddim(noise_schedule):
    return interpolate(x_start, x_end, t_local)
  eps = stage_noise(x_start, x_end, s, e, noise_schedule)
  return ddim_point(x_start, eps, global_time(t_local, s, e), s, noise_schedule)


def stage_target(x_start, x_end, s, e, noise_schedule: diffusions.NoiseSchedule):
  """The regression target of the stage: the velocity (Eq. 13) or eps_k (Eq. 11)."""
  if not is_ddim(noise_schedule):
    return velocity_target(x_start, x_end)
  return stage_noise(x_start, x_end, s, e, noise_schedule)


def sample_local_time(key, shape, distribution: str = "uniform", mean: float = 0.0,
                      std: float = 1.0):
  """Draws the rescaled stage time t' in [0, 1).

  Args:
    key: a PRNG key.
    shape: output shape.
    distribution: ``"uniform"`` (both papers) or ``"logit_normal"`` (t' = sigmoid(mean + std z),
      the SD3 timestep density).
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


def target_from_clean(x_t, clean_end_hat, clean_start_hat, t_local, s, e,
                      noise_schedule: diffusions.NoiseSchedule, min_noise: float = 1e-6):
  """The stage target implied by a prediction of the clean data (x-prediction).

  A prediction D̂ of D (and Û = Up(Down(D̂)), the start mean it implies) fixes the path's mean, so
  the noise follows from x_t, and with it the target:

  * flow matching: x̂_t = m + sigma_path n with m = (1 - t') gamma_s Û + t' gamma_e D̂ and
    sigma_path = (1 - t') sigma_s + t' sigma_e; the velocity is gamma_e D̂ - gamma_s Û +
    (sigma_e - sigma_s) n̂ (Eq. 13 with the endpoints of Eqs. 9-10).
  * DDIM: x_t / gamma_t = Û + w (D̂ - Û) + rho_t n with w = (rho_t - rho_s) / (rho_e - rho_s)
    (Eqs. 10-11 with the same endpoints); eps_k = n̂ + (D̂ - Û) / (rho_e - rho_s).

  Predicting clean pixels rather than the target lets a network whose width is below the patch
  dimension (p * p * 3) still denoise: the noise is recovered analytically instead of being carried
  through the network, which cannot pass a full-rank noise vector through a narrower bottleneck.

  Args:
    x_t: the current point. clean_end_hat: D̂. clean_start_hat: Û. All the same shape.
    t_local: t' in [0, 1). s, e: the stage window (broadcastable).
    noise_schedule: the diffusion's coefficients.
    min_noise: lower clip of the noise coefficient (sigma_path or rho_t) near t = 1.

  Returns:
    the velocity (flow matching) or eps_k (DDIM), the shape of ``x_t``.
  """
  gamma_s, gamma_e = noise_schedule.signal(s), noise_schedule.signal(e)
  sigma_s, sigma_e = noise_schedule.noise(s), noise_schedule.noise(e)
  if not is_ddim(noise_schedule):
    mean = (1.0 - t_local) * gamma_s * clean_start_hat + t_local * gamma_e * clean_end_hat
    sigma_path = (1.0 - t_local) * sigma_s + t_local * sigma_e
    noise = (x_t - mean) / jnp.maximum(sigma_path, min_noise)
    return gamma_e * clean_end_hat - gamma_s * clean_start_hat + (sigma_e - sigma_s) * noise
  t = global_time(t_local, s, e)
  rho_s, rho_e, rho_t = (noise_schedule.noise_to_signal(s), noise_schedule.noise_to_signal(e),
                         noise_schedule.noise_to_signal(t))
  w = (rho_t - rho_s) / (rho_e - rho_s)
  diff = clean_end_hat - clean_start_hat
  noise = ((x_t / noise_schedule.signal(t) - clean_start_hat - w * diff)
           / jnp.maximum(rho_t, min_noise))
  return noise + diff / (rho_e - rho_s)


def exact_single_point_target(x, t, s, e, clean_end, clean_start,
                              noise_schedule: diffusions.NoiseSchedule):
  """The exact marginal target at x when the data distribution is a single point.

  On the coupled path the noise is recovered from x̂_t, so the marginal target equals the
  conditional one (``target_from_clean`` with the true D and U). Used to test samplers: Euler on a
  straight flow path and DDIM on its (rho, x / gamma) line are exact, so a sampler driven by this
  field must return the data point itself.

  Args:
    x: x̂_t at stage size. t: global time in [s, e), scalar or broadcastable.
    s, e: the stage window. clean_end: D. clean_start: U (zero at the coarsest stage).
    noise_schedule: the diffusion's coefficients.
  """
  return target_from_clean(x, clean_end, clean_start, (t - s) / (e - s), s, e, noise_schedule)
