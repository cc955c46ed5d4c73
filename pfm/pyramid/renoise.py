"""Renoising at jump points with block-correlated corrective noise.

Pyramidal Flow Matching, Sec. 3.2.2 and Appendix A (Eqs. 13-15, 20-27). The coarser stage's endpoint
x̂_{e_{k+1}} is upsampled (nearest neighbour) so each low-resolution value fills an m-element block
(m = 4 for a 2x2 spatial block); its noise is then perfectly correlated inside each block. Rescaling
and adding corrective noise n' whose in-block correlation is gamma restores the start-point
distribution of the next stage, Eq. (8): N(s Up(Down(x1)), (1 - s)^2 I).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pfm.pyramid import resample
from pfm.pyramid.windows import MIN_SPATIAL_GAMMA


def block_noise(key, shape, gamma: float = MIN_SPATIAL_GAMMA, factor: int = 2,
                dtype=jnp.float32):
  """Corrective noise n' ~ N(0, Sigma') with the block structure of Eq. (14).

  Unit variance, correlation ``gamma`` between elements of the same ``factor x factor`` spatial
  block, independent across blocks. Vectorised: with z ~ N(0, I) and P z = Up(Down(z)) the block
  mean, n' = sqrt(1 - gamma) (z - P z) + sqrt(1 + (m - 1) gamma) P z has covariance
  (1 - gamma) I + gamma 1 1^T inside each block (m = factor^2).

  Args:
    key: PRNG key.
    shape: ``[..., H, W, C]`` at the upsampled resolution; H and W divisible by ``factor``.
    gamma: in ``[-1/(m-1), 0]``.
    factor: block side.
    dtype: output dtype.

  Raises:
    ValueError: if gamma is outside its range.
  """
  m = factor * factor
  if not -1.0 / (m - 1) - 1e-9 <= gamma <= 0.0:
    raise ValueError(f"gamma must lie in [{-1.0 / (m - 1):.4f}, 0] for {m}-element blocks, got {gamma}")
  z = jax.random.normal(key, shape, dtype)
  block_mean = resample.up(resample.down(z, factor), factor)
  return (math.sqrt(1.0 - gamma) * (z - block_mean)
          + math.sqrt(max(1.0 + (m - 1) * gamma, 0.0)) * block_mean)


def renoise_coefficients(start: float, end: float, gamma: float = MIN_SPATIAL_GAMMA):
  """Eqs. (20)-(25): (rescale, noise weight) mapping Up(x̂_{e_{k+1}}) to x̂_{s_k}.

  Returns ``(s_k / e_{k+1}, alpha)`` with alpha = (1 - s_k) / sqrt(1 - gamma); for gamma = -1/3 and
  e_{k+1} = 2 s_k / (1 + s_k) these are ((1 + s_k) / 2, sqrt(3) (1 - s_k) / 2), Eq. (15).
  """
  return start / end, (1.0 - start) / math.sqrt(1.0 - gamma)


def renoise(key, x_end_coarse, start: float, end: float, gamma: float = MIN_SPATIAL_GAMMA):
  """Eq. (13)/(15): x̂_{s_k} = (s_k / e_{k+1}) Up(x̂_{e_{k+1}}) + alpha n'.

  Args:
    key: PRNG key for n'.
    x_end_coarse: x̂_{e_{k+1}}, ``[..., H/2, W/2, C]``.
    start: s_k of the next (finer) stage.
    end: e_{k+1} of the coarser stage; must satisfy the jump relation with ``start`` for the
      distributions to match (see :func:`pfm.pyramid.windows.jump_end`).
    gamma: the block correlation used to derive the windows.

  Returns:
    x̂_{s_k}, ``[..., H, W, C]``.
  """
  upsampled = resample.up(x_end_coarse, 2)
  rescale, alpha = renoise_coefficients(start, end, gamma)
  return rescale * upsampled + alpha * block_noise(key, upsampled.shape, gamma, 2, upsampled.dtype)
