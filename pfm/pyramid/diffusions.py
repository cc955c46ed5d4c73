"""The two diffusion forms: their noise schedules x_t = gamma_t x + sigma_t n and native targets.

TPDiff (Ran & Shou), Eq. (6), writes every diffusion framework this way; the stage-wise
equations of ``pfm.pyramid.paths`` take any such noise schedule. Project convention: t in [0, 1],
t = 0 is noise and t = 1 is data (the pyramidal-flow paper's; TPDiff counts the other way, so its
t maps to 1 - t here).

* ``FlowMatching``: gamma_t = t, sigma_t = 1 - t (Pyramidal Flow Eq. 6; TPDiff Eq. 4 with
  t -> 1 - t).
* ``VariancePreserving``: gamma_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) (TPDiff
  Eq. 1 and Sec. 3.4, the DDIM form) with the cosine schedule of Nichol & Dhariwal (2021) in
  continuous time, alpha_bar_t = sin^2(pi/2 * u_t), u_t = u_0 + (1 - u_0) t. Like every discrete
  DDPM schedule it keeps a little signal at the noisiest end (alpha_bar_0 = ``min_alpha_bar``,
  default 1e-3), so the noise-to-signal ratio and the stage equations (which divide by gamma)
  stay finite; the sampler still starts from N(0, sigma_0^2 I).

The jump relation between stages (``pfm.pyramid.windows``) is a statement about the
noise-to-signal ratio rho_t = sigma_t / gamma_t, so each noise schedule gives rho and its inverse.

A diffusion form (``Diffusion``, by name with ``get``) is a noise schedule with the target its
network can predict directly, sampled by its own integrator: ``"flow_matching"``
(``FlowMatching``, velocity, Euler) or ``"ddim"`` (``VariancePreserving``, epsilon, DDIM), TPDiff
Sec. 3.4's two frameworks.
All methods accept Python floats and NumPy arrays (computed in float64 with NumPy, as the stage
windows are) and JAX arrays, traced or not (computed with ``jax.numpy``, jit-able).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def _xp(x):
  """jax.numpy for JAX arrays (and tracers), NumPy for everything else."""
  return jnp if isinstance(x, jax.Array) else np


@dataclasses.dataclass(frozen=True)
class FlowMatching:
  """Rectified flow: gamma_t = t, sigma_t = 1 - t."""

  def signal(self, t):
    """gamma_t = t."""
    return _xp(t).asarray(t) * 1.0

  def noise(self, t):
    """sigma_t = 1 - t."""
    return 1.0 - _xp(t).asarray(t)

  def noise_to_signal(self, t):
    """rho_t = (1 - t) / t; +inf at t = 0."""
    t = _xp(t).asarray(t)
    with np.errstate(divide="ignore"):
      return (1.0 - t) / t

  max_noise_to_signal = math.inf

  def time_at(self, rho):
    """Inverse of ``noise_to_signal``: t = 1 / (1 + rho), for rho in [0, inf]."""
    return 1.0 / (1.0 + _xp(rho).asarray(rho))


@dataclasses.dataclass(frozen=True)
class VariancePreserving:
  """The cosine variance-preserving schedule of DDPM/DDIM in continuous time.

  Attributes:
    min_alpha_bar: alpha_bar at t = 0, in (0, 1); the largest noise-to-signal ratio is
      sqrt((1 - min_alpha_bar) / min_alpha_bar) (about 31.6 for 1e-3).
  """

  min_alpha_bar: float = 1e-3

  @property
  def _u0(self) -> float:
    return 2.0 / math.pi * math.asin(math.sqrt(self.min_alpha_bar))

  def _angle(self, t):
    return 0.5 * math.pi * (self._u0 + (1.0 - self._u0) * _xp(t).asarray(t))

  @property
  def max_noise_to_signal(self) -> float:
    """rho at t = 0: sqrt((1 - min_alpha_bar) / min_alpha_bar)."""
    return math.sqrt((1.0 - self.min_alpha_bar) / self.min_alpha_bar)

  def alpha_bar(self, t):
    """alpha_bar_t = sin^2(pi/2 (u_0 + (1 - u_0) t)), increasing from min_alpha_bar to 1."""
    return _xp(t).sin(self._angle(t)) ** 2

  def signal(self, t):
    """gamma_t = sqrt(alpha_bar_t)."""
    return _xp(t).sin(self._angle(t))

  def noise(self, t):
    """sigma_t = sqrt(1 - alpha_bar_t); 0 at t = 1 (up to rounding: 6e-17 in float64)."""
    xp = _xp(t)
    return xp.maximum(xp.cos(self._angle(t)), 0.0)

  def noise_to_signal(self, t):
    """rho_t = sigma_t / gamma_t = cot(pi/2 u_t)."""
    return self.noise(t) / self.signal(t)

  def time_at(self, rho):
    """Inverse of ``noise_to_signal``, clipped to [0, 1]: u = (2/pi) arccot(rho).

    Ratios above ``max_noise_to_signal`` (beyond t = 0) clip to t = 0.
    """
    xp = _xp(rho)
    u = 2.0 / math.pi * xp.arctan2(1.0, xp.asarray(rho))
    return xp.clip((u - self._u0) / (1.0 - self._u0), 0.0, 1.0)


NoiseSchedule = FlowMatching | VariancePreserving


@dataclasses.dataclass(frozen=True)
class Diffusion:
  """A diffusion form: a noise schedule and the stage target a network may output in place of
  the clean data. Its sampler follows from the noise schedule
  (``pfm.pyramid.samplers.integrate_stage``: Euler for flow matching, DDIM otherwise).

  Attributes:
    name: ``"flow_matching"`` or ``"ddim"``.
    noise_schedule: gamma_t and sigma_t.
    native_prediction: ``"velocity"`` (flow matching, Pyramidal Flow Eq. 11) or ``"epsilon"``
      (DDIM, the stage noise eps_k of TPDiff Eq. 11).
  """

  name: str
  noise_schedule: NoiseSchedule
  native_prediction: str


DIFFUSIONS = {
    "flow_matching": Diffusion("flow_matching", FlowMatching(), "velocity"),
    "ddim": Diffusion("ddim", VariancePreserving(), "epsilon"),
}
NAMES = tuple(DIFFUSIONS)


def get(name: str) -> Diffusion:
  """The diffusion form called ``name``: ``"flow_matching"`` or ``"ddim"``.

  Raises:
    ValueError: for any other name.
  """
  if name not in DIFFUSIONS:
    raise ValueError(f"unknown diffusion {name!r}; use one of {NAMES}")
  return DIFFUSIONS[name]
