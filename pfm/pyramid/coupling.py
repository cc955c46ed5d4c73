r"""The toy of Pyramidal Flow Fig. 13 (App. C.4): coupled against independent endpoint noise.

Piecewise flow matching from noise to a few 2-D data points through ``K`` stages, with the exact
marginal velocity field (no network, so the comparison has no training noise). The data points
``x_1`` sit in clusters; the coarse version of a point ("Down") is its cluster's centre, and the
coarsest stage starts from pure noise, as the pyramid's coarsest stage does. Stage ``k`` covers
``[s_k, e_k]`` (time 0 is noise, 1 is data) with contiguous windows (``s_k = e_{k+1}``), so the
end of one stage is the start of the next in distribution and no renoising is needed (the 2-D
"upsampling" of a centre is the centre itself):

* end    ``x_e = e_k D_k + (1 - e_k) n_e``,   start ``x_s = s_k U_k + (1 - s_k) n_s``,

with ``D_0 = x_1``, ``D_k`` = the cluster centre for ``k >= 1`` (one level of clusters; the
coarsest stage's start mean ``U_{K-1}`` is 0), ``U_k = D_{k+1}``. *Coupled* (Eqs. 9-10):
``n_e = n_s = n``; *independent* (Fig. 13's random coupling): ``n_e``, ``n_s`` drawn apart. On
the stage's line ``x_t = t' x_e + (1 - t') x_s`` the conditional velocity is ``x_e - x_s``
(Eq. 11); given the data point ``i`` it is Gaussian in ``x_t``, so its conditional mean is exact:

* coupled: ``x_t | i ~ N(mu_i, sigma^2 I)``, ``sigma = t' sigma_e + (1 - t') sigma_s``,
  ``E[u | x_t, i] = a_i + (sigma_e - sigma_s) (x_t - mu_i) / sigma``;
* independent: ``sigma^2 = (t' sigma_e)^2 + ((1 - t') sigma_s)^2``,
  ``E[u | x_t, i] = a_i + (t' sigma_e^2 - (1 - t') sigma_s^2) (x_t - mu_i) / sigma^2``,

with ``mu_i = t' e D_i + (1 - t') s U_i``, ``a_i = e D_i - s U_i``, ``sigma_{s,e} = 1 - {s, e}``.
The marginal field averages them with the posterior weights of the points (a softmax of their
Gaussian log-likelihoods). Both couplings have the same marginals at every window's ends; only
the paths between differ.

Straightness (Liu et al., 2022, "Flow straight and fast", Eq. 4, per stage in local time):
``S = int_0^1 E || (Z_e - Z_s) - v(Z_t') ||^2 dt'`` along the ODE's own trajectories; 0 for
straight paths, which one Euler step per stage integrates exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ToyData:
  """Data points in clusters.

  Attributes:
    points: float64 ``[N, 2]``, the data ``x_1``.
    centres: float64 ``[N, 2]``, each point's cluster centre (its coarse version).
  """

  points: np.ndarray
  centres: np.ndarray


def toy_data(num_clusters: int = 4, points_per_cluster: int = 2, radius: float = 1.5,
             spread: float = 0.35, seed: int = 0) -> ToyData:
  """Clusters on a circle of ``radius``, points at distance ``spread`` around their centre."""
  rng = np.random.default_rng(seed)
  angles = 2 * np.pi * (np.arange(num_clusters) + 0.5) / num_clusters
  centres = radius * np.stack([np.cos(angles), np.sin(angles)], -1)
  offsets = rng.normal(size=(num_clusters, points_per_cluster, 2))
  offsets *= spread / np.linalg.norm(offsets, axis=-1, keepdims=True)
  points = (centres[:, None] + offsets).reshape(-1, 2)
  return ToyData(points, np.repeat(centres, points_per_cluster, axis=0))


def contiguous_windows(num_stages: int) -> list[tuple[float, float]]:
  """``[(s_k, e_k)]`` for k = 0..K-1 (finest first): K equal windows, s_k = e_{k+1}."""
  edges = np.linspace(0.0, 1.0, num_stages + 1)
  return [(float(edges[num_stages - 1 - k]), float(edges[num_stages - k]))
          for k in range(num_stages)]


def stage_means(data: ToyData, k: int, num_stages: int) -> tuple[np.ndarray, np.ndarray]:
  """``(D_k, U_k)`` ``[N, 2]``: the end and start means' data (before the time factors)."""
  end = data.points if k == 0 else data.centres
  start = data.centres if k < num_stages - 1 else np.zeros_like(data.centres)
  return end, start


def marginal_velocity(x: np.ndarray, t_local: float, data: ToyData, k: int, num_stages: int,
                      window: tuple[float, float], coupled: bool) -> np.ndarray:
  """The exact marginal velocity (module docstring) at ``x`` ``[M, 2]``, local time in [0, 1).

  Returns:
    float64 ``[M, 2]``, in units of the stage's local time (``dx / dt'``).
  """
  s, e = window
  d, u = stage_means(data, k, num_stages)
  sigma_s, sigma_e = 1.0 - s, 1.0 - e
  mu = t_local * e * d + (1.0 - t_local) * s * u                  # [N, 2]
  a = e * d - s * u                                                # [N, 2]
  if coupled:
    sigma = t_local * sigma_e + (1.0 - t_local) * sigma_s
    var, gain = sigma**2, (sigma_e - sigma_s) / sigma
  else:
    var = (t_local * sigma_e) ** 2 + ((1.0 - t_local) * sigma_s) ** 2
    gain = (t_local * sigma_e**2 - (1.0 - t_local) * sigma_s**2) / var
  diff = x[:, None, :] - mu[None]                                  # [M, N, 2]
  logp = -0.5 * np.sum(diff**2, -1) / var                          # equal priors
  w = np.exp(logp - logp.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  return np.einsum("mn,mnd->md", w, a[None] + gain * diff)


@dataclasses.dataclass(frozen=True)
class ToyFlow:
  """Trajectories of the probability-flow ODE through every stage.

  Attributes:
    paths: float64 ``[K, steps + 1, M, 2]``, stage by stage (coarsest first), each from its start
      to its end.
    straightness: float64 ``[K]``, ``S`` of each stage (coarsest first).
    one_step_error: float64 ``[K]``: mean distance between one Euler step over the stage and the
      fine integration, from the same start.
  """

  paths: np.ndarray
  straightness: np.ndarray
  one_step_error: np.ndarray


def integrate(data: ToyData, num_stages: int, coupled: bool, *, num_particles: int = 512,
              steps: int = 200, seed: int = 1) -> ToyFlow:
  """Integrates the flow from the coarsest stage's noise start to the data (midpoint rule)."""
  rng = np.random.default_rng(seed)
  windows = contiguous_windows(num_stages)
  x = (1.0 - windows[-1][0]) * rng.normal(size=(num_particles, 2))
  paths, straightness, one_step = [], [], []
  dt = 1.0 / steps
  for k in range(num_stages - 1, -1, -1):
    field = lambda z, t: marginal_velocity(z, t, data, k, num_stages, windows[k], coupled)
    start, path, velocities = x, [x], []
    for j in range(steps):
      v = field(x + 0.5 * dt * field(x, j * dt), (j + 0.5) * dt)
      velocities.append(v)
      x = x + dt * v
      path.append(x)
    chord = x - start
    straightness.append(np.mean([np.mean(np.sum((chord - v) ** 2, -1)) for v in velocities]))
    one_step.append(np.mean(np.linalg.norm(start + field(start, 0.0) - x, axis=-1)))
    paths.append(np.stack(path))
  return ToyFlow(np.stack(paths), np.array(straightness), np.array(one_step))
