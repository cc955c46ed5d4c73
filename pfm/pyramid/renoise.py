"""Renoising at jump points: one rule for any upsampled block and any noise schedule.

At a jump point the coarser stage's endpoint x̂_{e_{k+1}} is upsampled by nearest neighbour, so each
coarse value fills a block of m equal elements and its noise is perfectly correlated inside the
block: a 2x2 spatial block (m = 4, Pyramidal Flow Sec. 3.2.2), a duplicated frame pair (m = 2,
TPDiff Sec. 3.6), or a 2x2x2 space-time block (m = 8, the spatiotemporal pyramid). Rescaling and
adding corrective noise n' whose in-block correlation is gamma restores the next stage's start
point distribution N(gamma_{s_k} Up(Down(x)), sigma_{s_k}^2 I) (Pyramidal Flow Eq. 8, TPDiff Eq. 7):

    x̂_{s_k} = (gamma_{s_k} / gamma_{e_{k+1}}) Up(x̂_{e_{k+1}}) + alpha n',   n' ~ N(0, Sigma'),
    Sigma' = (1 - gamma) I + gamma 1 1^T in each block,   alpha = sigma_{s_k} / sqrt(1 - gamma).

Matching the diagonal and off-diagonal entries of the covariances (Pyramidal Flow Eqs. 20-24,
TPDiff Eqs. 17-20, written for general signal/noise coefficients) gives alpha and the jump relation
rho(e_{k+1}) = sqrt(-gamma / (1 - gamma)) rho(s_k) on the noise-to-signal ratio rho = sigma/gamma_t
(``pfm.pyramid.windows``). The block size m only bounds gamma from below: Sigma' is positive
semidefinite iff gamma >= -1/(m - 1). TPDiff's Eq. (21)/(22) is the flow-matching case with
gamma = -1 (its derivation assumes gamma_t + sigma_t = 1); the variance-preserving (DDIM) case uses
the same two formulas with gamma_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t).

Both papers write gamma for the in-block correlation and (TPDiff) gamma_t for the signal
coefficient; in code the first is ``correlation`` and the second ``noise_schedule.signal(t)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pfm.pyramid import diffusions, resample


def block_size(spatial: int = 2, temporal: int = 1) -> int:
  """m = spatial^2 * temporal: elements filled by one coarse value when upsampling."""
  return spatial * spatial * temporal


def min_block_correlation(spatial: int = 2, temporal: int = 1) -> float:
  """The smallest in-block correlation -1/(m - 1) (-1/3 for 2x2, -1 for a frame pair, -1/7 for
  2x2x2): Sigma' stays positive semidefinite (Pyramidal Flow Eq. 14, TPDiff Eq. 19)."""
  m = block_size(spatial, temporal)
  if m < 2:
    raise ValueError("a jump needs an upsampling block of at least 2 elements")
  return -1.0 / (m - 1)


def block_noise(key, shape, correlation: float, spatial: int = 2, temporal: int = 1,
                dtype=jnp.float32):
  """Corrective noise n' ~ N(0, Sigma') with unit variance and in-block correlation ``correlation`` (the papers' gamma).

  Blocks are ``spatial x spatial`` pixels of ``temporal`` consecutive frames, independent of each
  other. Vectorised: with z ~ N(0, I) and P z = Up(Down(z)) the block mean,
  n' = sqrt(1 - gamma) (z - P z) + sqrt(1 + (m - 1) gamma) P z has covariance
  (1 - gamma) I + gamma 1 1^T inside each block.

  Args:
    key: PRNG key.
    shape: ``[..., T, H, W, C]`` at the upsampled size (images ``[..., H, W, C]`` when
      ``temporal == 1``); T divisible by ``temporal``, H and W by ``spatial``.
    correlation: in ``[-1/(m-1), 0]``, m = spatial^2 * temporal.
    spatial, temporal: the block's side in pixels and its length in frames.
    dtype: output dtype.

  Raises:
    ValueError: if correlation is outside its range.
  """
  m = block_size(spatial, temporal)
  lower = min_block_correlation(spatial, temporal)
  if not lower - 1e-9 <= correlation <= 0.0:
    raise ValueError(f"the in-block correlation must lie in [{lower:.4f}, 0] for {m}-element "
                     f"blocks, got {correlation}")
  z = jax.random.normal(key, shape, dtype)
  block_mean = resample.up_video(resample.down_video(z, spatial, temporal), spatial, temporal)
  return (math.sqrt(1.0 - correlation) * (z - block_mean)
          + math.sqrt(max(1.0 + (m - 1) * correlation, 0.0)) * block_mean)


def renoise_coefficients(start: float, end: float, correlation: float,
                         noise_schedule: diffusions.NoiseSchedule):
  """(rescale, noise weight) mapping Up(x̂_{e_{k+1}}) to x̂_{s_k}.

  Returns ``(gamma_{s_k} / gamma_{e_{k+1}}, sigma_{s_k} / sqrt(1 - gamma))``. Flow matching,
  gamma = -1/3, e = 2s/(1 + s): ((1 + s)/2, sqrt(3)(1 - s)/2), Pyramidal Flow Eq. (15); gamma = -1:
  ((sigma_s + sqrt(2) gamma_s)/sqrt(2), sigma_s/sqrt(2)), TPDiff Eqs. (21)-(22).
  """
  rescale = float(noise_schedule.signal(float(start))) / float(noise_schedule.signal(float(end)))
  return rescale, float(noise_schedule.noise(float(start))) / math.sqrt(1.0 - correlation)


def renoise(key, x_end_coarse, start: float, end: float, correlation: float,
            noise_schedule: diffusions.NoiseSchedule, *, spatial: int = 2, temporal: int = 1,
            corrective: bool = True):
  """x̂_{s_k} = (gamma_{s_k} / gamma_{e_{k+1}}) Up(x̂_{e_{k+1}}) + alpha n' (module docstring).

  Pyramidal Flow Eqs. (13)/(15) for ``spatial=2, temporal=1``; TPDiff Eq. (15)/(22) for
  ``spatial=1, temporal=2, correlation=-1``; both at once for the spatiotemporal pyramid.

  Args:
    key: PRNG key for n'.
    x_end_coarse: x̂_{e_{k+1}}, ``[..., T, H, W, C]`` (or ``[..., H, W, C]`` when ``temporal == 1``)
      at the coarser stage's size.
    start: s_k of the next (finer) stage.
    end: e_{k+1} of the coarser stage; must satisfy the jump relation with ``start``
      (``pfm.pyramid.windows.jump_end``) for the distributions to match.
    correlation: the in-block correlation the windows were derived with.
    noise_schedule: the diffusion's coefficients.
    spatial, temporal: the upsampling factors of this jump.
    corrective: add the corrective noise alpha n'. False gives the rescaled upsampling alone,
      the "without renoising" arm of Pyramidal Flow Fig. 10: its noise is then block-constant
      with std (gamma_s / gamma_e) sigma_e instead of sigma_s i.i.d. per element, a start the
      next stage was not trained on.

  Returns:
    x̂_{s_k}, ``[..., T * temporal, H * spatial, W * spatial, C]``.
  """
  upsampled = resample.up_video(x_end_coarse, spatial, temporal)
  rescale, alpha = renoise_coefficients(start, end, correlation, noise_schedule)
  if not corrective:
    return (rescale * upsampled).astype(upsampled.dtype)
  noise = block_noise(key, upsampled.shape, correlation, spatial, temporal, upsampled.dtype)
  return (rescale * upsampled + alpha * noise).astype(upsampled.dtype)
