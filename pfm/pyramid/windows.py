"""Stage time windows and jump points of the spatial pyramid (Pyramidal Flow Matching, Sec. 3.2).

Stages are indexed as in the paper: stage k works at resolution ``H / 2^k``, so k = 0 is the
full-resolution stage and k = K - 1 the coarsest. Sampling runs k = K-1, ..., 0. Stage k covers the
time window ``[s_k, e_k]`` (t = 0 noise, t = 1 data) with ``s_{K-1} = 0`` and ``e_0 = 1``.

At a jump point the endpoint ``x̂_{e_{k+1}}`` of the coarser stage is upsampled and renoised into
the start ``x̂_{s_k}`` of the next stage. Matching covariances for a block of upsampled elements
whose corrective noise has in-block correlation ``gamma`` (Appendix A, Eqs. 21-25) ties the two
times together: the noise-to-signal ratio sigma/alpha at ``e_{k+1}`` must be ``sqrt(-gamma / (1 -
gamma))`` times the ratio at ``s_k``. For flow matching (signal t, noise 1 - t) this is Eq. (25),
and for gamma = -1/3 Eq. (26): ``e_{k+1} = 2 s_k / (1 + s_k)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MIN_SPATIAL_GAMMA = -1.0 / 3.0  # lower bound for a 2x2 block: Sigma' stays semidefinite (Eq. 14).


def min_gamma(block_size: int) -> float:
  """The smallest in-block correlation for a block of ``block_size`` elements: -1 / (m - 1)."""
  return -1.0 / (block_size - 1)


def jump_ratio(gamma: float) -> float:
  """sqrt(-gamma / (1 - gamma)): NSR(end of coarser stage) / NSR(start of next stage).

  Derived from the diagonal and off-diagonal equations (23)-(24) of Appendix A. Equals 1/2 for the
  spatial default gamma = -1/3.
  """
  return math.sqrt(-gamma / (1.0 - gamma))


def jump_end(start: float, gamma: float = MIN_SPATIAL_GAMMA) -> float:
  """Eq. (25): e_{k+1} as a function of s_k for flow matching (= 2s/(1+s) at gamma = -1/3)."""
  c = jump_ratio(gamma)
  if start <= 0.0:
    return 0.0
  return start / (start + c * (1.0 - start))


def jump_start(end: float, gamma: float = MIN_SPATIAL_GAMMA) -> float:
  """Inverse of :func:`jump_end`: s_k given e_{k+1} (= e / (2 - e) at gamma = -1/3)."""
  c = jump_ratio(gamma)
  return c * end / (c * end + 1.0 - end)


def stage_windows(
    num_stages: int,
    boundaries: Sequence[float] | None = None,
    gamma: float = MIN_SPATIAL_GAMMA,
) -> np.ndarray:
  """Time windows ``[s_k, e_k]`` of all stages.

  Args:
    num_stages: K >= 1.
    boundaries: the end times of the coarser stages in sampling order, i.e.
      ``(e_{K-1}, e_{K-2}, ..., e_1)``: K - 1 strictly increasing values in (0, 1). ``None`` gives
      the uniform split ``(1/K, 2/K, ...)``. The start of each finer stage follows from the jump
      point relation (Eq. 25), so windows overlap: for K = 3, uniform, gamma = -1/3 the windows
      are ``[0, 1/3], [0.2, 2/3], [0.5, 1]`` for k = 2, 1, 0.
    gamma: in-block correlation of the corrective noise, in ``[-1/3, 0]``.

  Returns:
    float64 ``[K, 2]`` array; row k is ``(s_k, e_k)``.

  Raises:
    ValueError: for a wrong number of boundaries, boundaries outside (0, 1) or not increasing, or
      gamma outside [-1/3, 0].
  """
  if num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages}")
  if not MIN_SPATIAL_GAMMA - 1e-12 <= gamma <= 0.0:
    raise ValueError(f"gamma must lie in [-1/3, 0], got {gamma}")
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
    windows[k, 0] = 0.0 if k == num_stages - 1 else jump_start(ends[k + 1], gamma)
  return windows
