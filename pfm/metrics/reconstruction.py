"""Reconstruction quality of an autoencoder: PSNR and SSIM per frame.

Pixels are in [-1, 1] (data range 2). Both are computed per frame and channel-averaged as usual
for video VAEs, then averaged over frames and clips by the caller.

- PSNR = 10 log10(range^2 / MSE), dB.
- SSIM (Wang et al., 2004, "Image quality assessment: from error visibility to structural
  similarity", Eq. 13): local means, variances and covariance under an 11 x 11 Gaussian window
  of standard deviation 1.5, constants C1 = (0.01 L)^2 and C2 = (0.03 L)^2 with L the data range;
  the mean of the SSIM map over the valid (unpadded) positions, per channel, then over channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DATA_RANGE = 2.0  # pixels in [-1, 1]


def psnr(x: jax.Array, y: jax.Array, data_range: float = DATA_RANGE) -> jax.Array:
  """Per-frame PSNR in dB of x against y, [..., H, W, C] -> [...]; inf where they are equal."""
  mse = jnp.mean((jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)) ** 2,
                 axis=(-3, -2, -1))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def ssim(x: jax.Array, y: jax.Array, data_range: float = DATA_RANGE, window: int = 11,
         sigma: float = 1.5) -> jax.Array:
  """Per-frame SSIM of x against y, [..., H, W, C] -> [...] in [-1, 1] (1 when equal).

  Frames need at least `window` pixels on each side (ValueError otherwise).
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  if x.shape != y.shape:
    raise ValueError(f"ssim: shapes differ, {x.shape} and {y.shape}")
  h, w, c = x.shape[-3:]
  if min(h, w) < window:
    raise ValueError(f"ssim: frames of {h}x{w} are smaller than the {window}-pixel window")
  lead = x.shape[:-3]
  g = jnp.asarray(_gaussian_window(window, sigma))

  def blur(z):  # separable Gaussian filter, valid positions only: [N, H, W, C]
    z = jnp.moveaxis(z.reshape((-1, h, w, c)), -1, 1).reshape(-1, h, w)  # [N * C, H, W]
    z = jax.vmap(lambda im: jax.scipy.signal.convolve2d(im, g[:, None], mode="valid"))(z)
    z = jax.vmap(lambda im: jax.scipy.signal.convolve2d(im, g[None, :], mode="valid"))(z)
    return z

  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mx, my = blur(x), blur(y)
  sxx = blur(x * x) - mx ** 2
  syy = blur(y * y) - my ** 2
  sxy = blur(x * y) - mx * my
  ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
  per_channel = ssim_map.mean(axis=(-2, -1)).reshape(lead + (c,))
  return per_channel.mean(-1)
