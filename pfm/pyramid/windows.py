"""Stage time windows and jump points of a pyramid (Pyramidal Flow Sec. 3.2, TPDiff Sec. 3.2).

Stages are indexed as in the pyramidal-flow paper: stage k works at the k-th level of the pyramid
(resolution H / 2^k for the spatial pyramid, frame rate / 2^k for the temporal one), so k = 0 is
the full-size stage and k = K - 1 the coarsest. Sampling runs k = K-1, ..., 0. Stage k covers the
time window ``[s_k, e_k]`` (t = 0 noise, t = 1 data) with ``s_{K-1} = 0`` and ``e_0 = 1``.
(TPDiff numbers its stages from 1 and runs time the other way; its stage k is our k - 1.)

At a jump point the endpoint ``x̂_{e_{k+1}}`` of the coarser stage is upsampled and renoised into
the start ``x̂_{s_k}`` of the next stage. Matching covariances for a block of upsampled elements
whose corrective noise has in-block correlation ``gamma`` (Pyramidal Flow Appendix A, Eqs. 21-25;
TPDiff Appendix A.1, Eqs. 18-20) ties the two times together: the noise-to-signal ratio
rho = sigma/gamma_t at ``e_{k+1}`` must be ``sqrt(-gamma / (1 - gamma))`` times the ratio at
``s_k``. This holds for any noise schedule (``pfm.pyramid.diffusions``). For flow matching it is
Pyramidal Flow Eq. (25), for gamma = -1/3 Eq. (26), ``e_{k+1} = 2 s_k / (1 + s_k)``, and for
gamma = -1 TPDiff Eq. (21), ``e = sqrt(2) s / (1 - s + sqrt(2) s)``.
"""


from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pfm.pyramid import diffusions

# The lower bound of the in-block correlation for a 2x2 block: Sigma' stays semidefinite (Eq. 14).
MIN_SPATIAL_CORRELATION = -1.0 / 3.0


def jump_ratio(correlation: float) -> float:
  """sqrt(-gamma / (1 - gamma)): rho(end of coarser stage) / rho(start of next stage).

  Derived from the diagonal and off-diagonal equations of the covariance match (Pyramidal Flow
  Eqs. 23-24, TPDiff Eqs. 18-19). 1/2 for the spatial gamma = -1/3, 1/sqrt(2) for the temporal
  gamma = -1, 1/sqrt(m) for the smallest gamma -1/(m - 1) of any m-element block.
  """
  if not -1.0 - 1e-12 <= correlation <= 0.0:
    raise ValueError(f"the in-block correlation must lie in [-1, 0], got {correlation}")
  return math.sqrt(-correlation / (1.0 - correlation))


def jump_end(start: float, correlation: float, noise_schedule: diffusions.NoiseSchedule) -> float:
  """e_{k+1} for a given s_k: rho(e_{k+1}) = jump_ratio(correlation) * rho(s_k).

  Flow matching: Pyramidal Flow Eq. (25) (= 2s/(1+s) at gamma = -1/3), TPDiff Eq. (21) at
  gamma = -1. Any other noise schedule: the same relation on its noise-to-signal ratio.
  """
  if start <= 0.0:
    return 0.0
  rho_start = noise_schedule.noise_to_signal(float(start))
  return float(noise_schedule.time_at(jump_ratio(correlation) * rho_start))


def jump_start(end: float, correlation: float, noise_schedule: diffusions.NoiseSchedule) -> float:
  """Inverse of :func:`jump_end`: s_k given e_{k+1} (e / (2 - e) at gamma = -1/3, flow matching)."""
  c = jump_ratio(correlation)
  if c == 0.0 or end <= 0.0:
    return 0.0
  rho = float(noise_schedule.noise_to_signal(float(end))) / c
  if rho > noise_schedule.max_noise_to_signal:
    raise ValueError(
        f"a stage ending at t={end:.4f} is too noisy to jump from with correlation="
        f"{correlation:.4f}: the next stage would have to start at a noise-to-signal ratio "
        f"{rho:.1f}, beyond the noise schedule's largest "
        f"{noise_schedule.max_noise_to_signal:.1f}; give the coarser stages a longer part of the "
        "time axis (partition)")
  return float(noise_schedule.time_at(rho))


def partition_boundaries(partition: Sequence[float]) -> tuple[float, ...]:
  """Stage end times from TPDiff's partition of the time axis (Table 2: "1-1-1", "2-1-1", ...).

  Args:
    partition: K positive relative lengths in sampling order (coarsest stage first).

  Returns:
    the K - 1 ``boundaries`` of :func:`stage_windows`: cumulative fractions, e.g. (2, 1, 1) ->
    (0.5, 0.75).

  Raises:
    ValueError: for a non-positive entry.
  """
  parts = np.asarray(partition, np.float64)
  if parts.ndim != 1 or len(parts) < 1 or np.any(parts <= 0):
    raise ValueError(f"a partition needs positive relative lengths, got {tuple(partition)}")
  return tuple(float(b) for b in np.cumsum(parts)[:-1] / parts.sum())


def stage_windows(
    num_stages: int,
    boundaries: Sequence[float] | None,
    correlation: float | Sequence[float],
    noise_schedule: diffusions.NoiseSchedule,
) -> np.ndarray:
  """Time windows ``[s_k, e_k]`` of all stages.

  Args:
    num_stages: K >= 1.
    boundaries: the end times of the coarser stages in sampling order, i.e.
      ``(e_{K-1}, e_{K-2}, ..., e_1)``: K - 1 strictly increasing values in (0, 1). ``None`` gives
      the uniform split ``(1/K, 2/K, ...)``. The start of each finer stage follows from the jump
      point relation (Eq. 25), so windows overlap: for K = 3, uniform, gamma = -1/3 the windows
      are ``[0, 1/3], [0.2, 2/3], [0.5, 1]`` for k = 2, 1, 0.
    correlation: in-block correlation of the corrective noise, in ``[-1, 0]`` (its lower bound for a
      given block, -1/(m - 1), is checked by ``pfm.pyramid.stages``): one value for every jump,
      or K - 1 values in sampling order (the jump out of stage K - 1 first).
    noise_schedule: the diffusion's signal/noise coefficients (``pfm.pyramid.diffusions``).

  Returns:
    float64 ``[K, 2]`` array; row k is ``(s_k, e_k)``.

  Raises:
    ValueError: for a wrong number of boundaries, boundaries outside (0, 1) or not increasing, or
      correlation outside [-1, 0].
  """
  if num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages}")
  correlations = (list(correlation) if isinstance(correlation, Sequence)
                  else [correlation] * (num_stages - 1))
  if len(correlations) != num_stages - 1:
    raise ValueError(f"need one correlation per jump ({num_stages - 1}), got {correlation}")
  for g in correlations:
    jump_ratio(g)  # checks the range
  if boundaries is None:
    boundaries = [j / num_stages for j in range(1, num_stages)]
  boundaries = [float(b) for b in boundaries]
  if len(boundaries) != num_stages - 1:
    raise ValueError(
        f"need {num_stages - 1} stage boundaries for {num_stages} stages, got {boundaries}")
  if any(not 0.0 < b < 1.0 for b in boundaries) or any(
      b1 <= b0 for b0, b1 in zip(boundaries, boundaries[1:])):
    raise ValueError(f"stage boundaries must increase strictly inside (0, 1), got {boundaries}")
  windows = np.zeros((num_stages, 2))
  ends = [1.0] + boundaries[::-1]  # ends[k] = e_k: e_0 = 1, e_{K-1} = boundaries[0].
  for k in range(num_stages):
    windows[k, 1] = ends[k]
    if k < num_stages - 1:  # the jump from stage k + 1 into stage k is correlations[K - 2 - k]
      windows[k, 0] = jump_start(ends[k + 1], correlations[num_stages - 2 - k], noise_schedule)
  return windows


def released_timestep_windows(num_stages: int = 3, gamma: float = 1.0 / 3.0,
                              train_steps: int = 1000) -> tuple[tuple[float, float], ...]:
  """The model-time windows of Pyramid Flow's released models, in pfm's time (0 noise, 1 data).

  The official scheduler (``PyramidFlowMatchEulerDiscreteScheduler``) conditions its DiT not on
  the noise level but on a timestep from a stage-unique range: the stages' lengths in noise
  level (after the jump-point correction of each later stage's start with ``gamma``, the
  ``gamma`` of ``pfm.pyramid.windows.jump_start``'s correlation -gamma) are laid end to end on
  the 0..``train_steps`` axis, cut at whole steps, and stage k's Euler steps run linearly
  through its range. With the model fed ``(1 - t) * train_steps``
  (``MMDiTConfig.time_input="noise"``), stage k reads ``t = c_k + t' (d_k - c_k)`` at stage time
  t' for the returned ``(c_k, d_k)``. The stages split the noise axis evenly
  (``stage_range = [0, 1/3, 2/3, 1]``), as the released models were trained.

  Args:
    num_stages: K (the released models: 3).
    gamma: the official ``scheduler_gamma`` (1/3).
    train_steps: the official ``num_train_timesteps`` (1000).

  Returns:
    K pairs ``(c_k, d_k)`` for k = 0 (full size) .. K - 1 (coarsest), pfm's stage order;
    contiguous, ``c_{K-1} = 0`` and ``d_0 = (train_steps - 1) / train_steps``.
  """
  sigmas = (train_steps - np.arange(train_steps)) / train_steps  # timesteps 1000..1, shift 1
  bounds = [i / num_stages for i in range(num_stages + 1)]
  distances = []
  for i in range(num_stages):  # the official stage order: coarsest first
    start = int(bounds[i] * train_steps)
    end = int(bounds[i + 1] * train_steps)
    start_sigma = float(np.float32(sigmas[start]))
    end_sigma = float(np.float32(sigmas[end])) if end < train_steps else 0.0
    if i:
      signal = 1.0 - start_sigma
      start_sigma = 1.0 - signal / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - signal) + signal)
    distances.append(start_sigma - end_sigma)
  total = sum(distances)
  windows = []
  for i in range(num_stages):
    lo = 0.0 if i == 0 else sum(distances[:i]) / total
    hi = 1.0 if i == num_stages - 1 else sum(distances[:i + 1]) / total
    windows.append((int(lo * train_steps) / train_steps,
                    min(int(hi * train_steps), train_steps - 1) / train_steps))
  return tuple(windows[::-1])
