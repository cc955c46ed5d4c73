"""Samplers for the spatial pyramid: Euler within a stage, renoising between stages.

Pyramidal Flow Matching, Algorithm 1. Samplers are pure functions of a ``velocity_fn``, so the same
code is driven by the trained model (``pfm.sample``) and by an exact velocity field in tests.

``velocity_fn(x, t, k)`` receives the current latent x̂_t at stage k's resolution, the global time
``t`` (a float32 scalar in [s_k, e_k), t = 0 noise, t = 1 data) and the static stage index ``k``,
and returns the stage velocity d x̂_t / d t' (the Eq. 11 target), shape of ``x``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pfm.pyramid import renoise as renoise_lib
from pfm.pyramid.windows import MIN_SPATIAL_GAMMA

VelocityFn = Callable[[jax.Array, jax.Array, int], jax.Array]


def euler_stage(velocity_fn: VelocityFn, x_start, k: int, start: float, end: float,
                num_steps: int):
  """Integrates one stage from x̂_{s_k} to x̂_{e_k} with ``num_steps`` uniform Euler steps in t'.

  Args:
    velocity_fn: see the module docstring.
    x_start: x̂_{s_k}, any shape at stage k's resolution.
    k: stage index (static).
    start, end: the window ``[s_k, e_k]``.
    num_steps: number of Euler steps (>= 1), i.e. velocity evaluations.

  Returns:
    x̂_{e_k}, same shape and dtype as ``x_start``.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  dt_local = 1.0 / num_steps

  def step(i, x):
    t = start + (end - start) * i * dt_local
    v = velocity_fn(x, jnp.asarray(t, jnp.float32), k)
    return (x + dt_local * v).astype(x.dtype)

  return jax.lax.fori_loop(0, num_steps, step, x_start)


def sample_pyramid(velocity_fn: VelocityFn, key, shape: Sequence[int], windows: np.ndarray,
                   steps_per_stage: Sequence[int], gamma: float = MIN_SPATIAL_GAMMA,
                   dtype=jnp.float32):
  """Algorithm 1: generate one frame unit through all K stages, coarsest first.

  Args:
    velocity_fn: see the module docstring.
    key: PRNG key for the initial noise and the corrective noise at each jump point.
    shape: full-resolution shape ``[..., H, W, C]``.
    windows: ``[K, 2]`` stage windows from :func:`pfm.pyramid.windows.stage_windows`.
    steps_per_stage: Euler steps per stage in sampling order (coarsest stage first), e.g.
      ``[20, 20, 20]``.
    gamma: the block correlation the windows were derived with.
    dtype: latent dtype.

  Returns:
    x̂_1, ``shape``; pixels in about [-1, 1] for a trained model.
  """
  windows = np.asarray(windows, np.float64)
  num_stages = windows.shape[0]
  if len(steps_per_stage) != num_stages:
    raise ValueError(
        f"steps_per_stage has {len(steps_per_stage)} entries for {num_stages} stages")
  *lead, height, width, channels = shape
  factor = 2 ** (num_stages - 1)
  if height % factor or width % factor:
    raise ValueError(f"{height}x{width} is not divisible by 2^(K-1) = {factor}")
  keys = jax.random.split(key, num_stages)
  coarse_shape = (*lead, height // factor, width // factor, channels)
  x = jax.random.normal(keys[0], coarse_shape, dtype)  # x̂_{s_{K-1}} = x̂_0 ~ N(0, I)
  for order, k in enumerate(range(num_stages - 1, -1, -1)):
    start, end = windows[k]
    if order > 0:  # jump point from stage k + 1 to stage k, Eq. (15)
      x = renoise_lib.renoise(keys[order], x, float(start), float(windows[k + 1, 1]), gamma)
    x = euler_stage(velocity_fn, x, k, float(start), float(end), int(steps_per_stage[order]))
  return x
