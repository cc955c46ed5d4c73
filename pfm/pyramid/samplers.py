"""Samplers for any pyramid: Euler or DDIM within a stage, renoising between stages.

Pyramidal Flow Algorithm 1 and TPDiff Sec. 3.6. Samplers are pure functions of a ``model_fn``, so
the same code is driven by the trained model (``pfm.sample``) and by an exact field in tests.

``model_fn(x, t, k)`` receives the current latent x̂_t at stage k's size, the global time ``t`` (a
float32 scalar in [s_k, e_k), t = 0 noise, t = 1 data) and the static stage index ``k``, and
returns the stage target, shape of ``x``: the velocity d x̂_t / d t' for flow matching (Pyramidal
Flow Eq. 11, TPDiff Eq. 13), the stage noise eps_k for DDIM (TPDiff Eq. 11).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pfm.pyramid import diffusions, paths, stages

ModelFn = Callable[[jax.Array, jax.Array, int], jax.Array]


TIME_GRIDS = ("uniform", "released")
# The released Pyramid Flow scheduler's last step in stage time (its sigmas end at 1 / 1000).
RELEASED_LAST_STEP = 1e-3


def stage_time_grid(num_steps: int, grid: str = "uniform") -> np.ndarray:
  """The stage times t'_0 = 0 < ... < t'_N = 1 of ``num_steps`` Euler steps.

  ``"uniform"``: t'_i = i / N. ``"released"``: Pyramid Flow's released scheduler
  (``PyramidFlowMatchEulerDiscreteScheduler.set_timesteps``): its sigmas run linearly from 1 to
  1/1000 in N points and then to 0, i.e. N - 1 even steps to t' = 0.999 and a last step of 0.001
  (one step: from 0 to 1).

  Raises:
    ValueError: for num_steps < 1 or an unknown grid.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if grid not in TIME_GRIDS:
    raise ValueError(f"time grid {grid!r} is not one of {TIME_GRIDS}")
  if grid == "uniform" or num_steps == 1:
    return np.linspace(0.0, 1.0, num_steps + 1)
  return np.append(np.linspace(0.0, 1.0 - RELEASED_LAST_STEP, num_steps), 1.0)


def euler_stage(velocity_fn: ModelFn, x_start, k: int, start: float, end: float,
                num_steps: int, time_grid: str = "uniform"):
  """Flow matching: ``num_steps`` Euler steps in t' from x̂_{s_k} to x̂_{e_k}.

  Args:
    velocity_fn: ``model_fn`` returning the velocity (module docstring).
    x_start: x̂_{s_k}, any shape at stage k's resolution.
    k: stage index (static).
    start, end: the window ``[s_k, e_k]``.
    num_steps: number of Euler steps (>= 1), i.e. velocity evaluations.
    time_grid: the steps' stage times (`stage_time_grid`): uniform, or the released models'.

  Returns:
    x̂_{e_k}, same shape and dtype as ``x_start``.
  """
  grid = stage_time_grid(num_steps, time_grid)
  local = jnp.asarray(grid, jnp.float32)
  times = jnp.asarray(start + (end - start) * grid, jnp.float32)

  def step(i, x):
    v = velocity_fn(x, times[i], k)
    return (x + (local[i + 1] - local[i]) * v).astype(x.dtype)

  return jax.lax.fori_loop(0, num_steps, step, x_start)


def ddim_stage(eps_fn: ModelFn, x_start, k: int, start: float, end: float, num_steps: int,
               noise_schedule: diffusions.NoiseSchedule):
  """DDIM inside one stage (TPDiff Sec. 3.4, its Eq. 3 with the stage noise of Eqs. 10-11).

  ``num_steps`` uniform steps in t from ``start`` to ``end``; each moves along the stage's DDIM
  path: x_{t2} = gamma_{t2} (x_{t1} / gamma_{t1} + eps (rho_{t2} - rho_{t1})), which is exact when
  eps is the stage's constant eps_k.

  Args:
    eps_fn: ``(x, t, k) -> eps_k`` prediction, shape of ``x``.
    x_start: x̂_{s_k}. k: stage index (static). start, end: the window.
    num_steps: >= 1. noise_schedule: the variance-preserving schedule.

  Returns:
    x̂_{e_k}, same shape and dtype as ``x_start``.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  times = np.linspace(start, end, num_steps + 1)
  signals = jnp.asarray(noise_schedule.signal(times), jnp.float32)
  rhos = jnp.asarray(noise_schedule.noise_to_signal(times), jnp.float32)
  ts = jnp.asarray(times, jnp.float32)

  def step(i, x):
    eps = eps_fn(x, ts[i], k).astype(jnp.float32)
    x_next = signals[i + 1] * (x.astype(jnp.float32) / signals[i] + eps * (rhos[i + 1] - rhos[i]))
    return x_next.astype(x.dtype)

  return jax.lax.fori_loop(0, num_steps, step, x_start)


def integrate_stage(model_fn: ModelFn, x_start, k: int, start: float, end: float, num_steps: int,
                    noise_schedule: diffusions.NoiseSchedule, time_grid: str = "uniform"):
  """Euler (flow matching, on ``time_grid``) or DDIM (variance-preserving, uniform) from
  x̂_{s_k} to x̂_{e_k}."""
  if paths.is_ddim(noise_schedule):
    return ddim_stage(model_fn, x_start, k, start, end, num_steps, noise_schedule)
  return euler_stage(model_fn, x_start, k, start, end, num_steps, time_grid)


def sample_pyramid(model_fn: ModelFn, key, shape: Sequence[int], pyramid: stages.Pyramid,
                   steps_per_stage: Sequence[int], dtype=jnp.float32, *, renoise: bool = True):
  """Generates one sample through all K stages, coarsest first.

  Pyramidal Flow Algorithm 1 for the spatial pyramid, TPDiff Sec. 3.6 for the temporal one, and
  both at once for the spatiotemporal pyramid: integrate each stage (``integrate_stage``), then
  renoise its end into the next stage's start (``pfm.pyramid.renoise``).

  Args:
    model_fn: see the module docstring.
    key: PRNG key for the initial noise and the corrective noise at each jump point.
    shape: full-size shape ``[..., T, H, W, C]``, or ``[..., H, W, C]`` for a pyramid without
      temporal stages (one frame unit of the autoregressive mode).
    pyramid: the stages (``pfm.pyramid.stages.Pyramid``).
    steps_per_stage: steps per stage in sampling order (coarsest stage first), e.g. [10, 10, 10].
    dtype: latent dtype.
    renoise: add the corrective noise at each jump point (Eq. 15); False only rescales the
      upsampled end point (the ablation of Pyramidal Flow Fig. 10).

  Returns:
    the full-size sample, ``shape``; pixels in about [-1, 1] for a trained model.

  Raises:
    ValueError: for a wrong number of per-stage steps or a shape that the stages do not divide.
  """
  batched_fn = lambda x, t, k: model_fn(x[0], t, k)[None]
  return sample_pyramid_batch(batched_fn, key[None], shape, pyramid,
                              steps_per_stage, dtype, renoise=renoise)[0]


def sample_pyramid_batch(model_fn: ModelFn, keys, shape: Sequence[int], pyramid: stages.Pyramid,
                         steps_per_stage: Sequence[int], dtype=jnp.float32, *,
                         renoise: bool = True, time_grid: str = "uniform"):
  """`sample_pyramid` for a batch of B samples whose model calls run together.

  Sample b draws its initial and corrective noise from ``keys[b]`` exactly as `sample_pyramid`
  draws them from one key, so it is the sample `sample_pyramid` gives with ``keys[b]`` (to the
  float rounding of a batched ``model_fn``); every Euler or DDIM step is one ``model_fn`` call on
  the whole batch.

  Args:
    model_fn: ``(x [B, *stage shape], t, k) -> target [B, *stage shape]`` (module docstring, with
      a leading batch axis).
    keys: ``[B]`` PRNG keys (``jax.random.split``, or a stack of ``jax.random.key``).
    shape: one sample's full-size shape, as in `sample_pyramid` (without B).
    pyramid, steps_per_stage, dtype, renoise: as in `sample_pyramid`.
    time_grid: the Euler steps' stage times (`stage_time_grid`; flow matching).

  Returns:
    ``[B, *shape]``.

  Raises:
    ValueError: for a wrong number of per-stage steps or a shape that the stages do not divide.
  """
  num_stages = pyramid.num_stages
  if len(steps_per_stage) != num_stages:
    raise ValueError(
        f"steps_per_stage has {len(steps_per_stage)} entries for {num_stages} stages")
  *lead, height, width, _ = shape
  fs, ft = pyramid.spatial_factors[-1], pyramid.temporal_factors[-1]
  if height % fs or width % fs or (ft > 1 and (not lead or lead[-1] % ft)):
    raise ValueError(f"shape {tuple(shape)} is not divisible by the coarsest stage's factors "
                     f"(space {fs}, time {ft})")
  noise_schedule = pyramid.noise_schedule
  stage_keys = jax.vmap(lambda key: jax.random.split(key, num_stages))(keys)  # [B, K]
  start = pyramid.windows[-1][0]
  coarsest = pyramid.stage_shape(shape, num_stages - 1)
  # x̂_{s_{K-1}}: the coarsest stage starts from noise (its start mean is zero, see stages.py).
  x = float(noise_schedule.noise(start)) * jax.vmap(
      lambda key: jax.random.normal(key, coarsest, dtype))(stage_keys[:, 0])
  for order, k in enumerate(range(num_stages - 1, -1, -1)):
    start, end = pyramid.windows[k]
    if order > 0:  # jump point from stage k + 1 into stage k
      x = jax.vmap(lambda key, x_end, k=k: pyramid.renoise(key, x_end, k, corrective=renoise))(
          stage_keys[:, order], x)
    x = integrate_stage(model_fn, x, k, start, end, int(steps_per_stage[order]), noise_schedule,
                        time_grid)
  return x
