"""The pyramidal flow matching objective on a packed token batch (paper Eqs. 6-11, 16-17).

The data pipeline delivers *clean* packed rows (see ``pfm.data.pipeline``); everything random about
diffusion happens here, on device, inside the jitted train step:

* per packed sample (segment): the rescaled stage time t', the history corruption level and the
  caption-dropout coin;
* per token: the noise n at the token's own stage resolution (the data side patchified each stage
  at its own resolution, so i.i.d. noise per token is N(0, I) at that resolution).

The current frame unit's tokens get x̂_t of Eq. (6) from the coupled endpoints of Eqs. (9)-(10) and
the target of Eq. (11); history tokens are corrupted with strength u ~ U[0, history_noise_max]
(i.e. t = 1 - u, Sec. 4.1 and Eq. 16) and are not supervised.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pfm.data import layout
from pfm.pyramid import paths

BOS_TOKEN = 1  # every caption starts with it; a dropped caption keeps only it (the null caption)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static settings of the objective (hashable, so it can be closed over by jit)."""
  windows: tuple[tuple[float, float], ...]  # (s_k, e_k) for k = 0..K-1
  time_distribution: str = "uniform"
  history_noise_max: float = 1.0 / 3.0
  caption_dropout: float = 0.1
  prediction: str = "clean"  # what the network outputs: "clean" (x-prediction) or "velocity"
  patch_size: int = 2
  min_noise: float = 0.05  # clip of 1 - t when converting a clean prediction to a velocity


def _per_segment(values, segment_ids):
  """Gathers per-segment values [B, S] at token segment ids [B, L] -> [B, L]."""
  return jnp.take_along_axis(values, segment_ids, axis=1)


def corrupt_packed_batch(key, batch, config: ObjectiveConfig):
  """Noises a clean packed batch into model inputs and flow matching targets.

  Args:
    key: PRNG key (e.g. ``fold_in(rng, step)``).
    batch: dict of packed arrays: ``clean_end``, ``clean_start`` float [B, L, P] (pixels in
      [-1, 1]); ``segment_ids``, ``frame_index``, ``stage``, ``is_target`` int [B, L];
      ``positions`` float [B, L, 2]; ``text_tokens``, ``text_segment_ids`` int [B, Lt].
    config: windows and noise settings.

  Returns:
    ``(inputs, target, weight, path)``: ``inputs`` is a dict of the MM-DiT's keyword arguments
    (``video_tokens``, ``video_t``, ``video_segment_ids``, ``frame_index``, ``positions``,
    ``text_tokens``, ``text_segment_ids``, ``text_t``); ``target`` [B, L, P] is u of Eq. (11) on
    current-unit tokens; ``weight`` float32 [B, L] sums to 1 over each row's supervised tokens
    divided by the number of rows, so every packed sample counts equally whatever its token count;
    ``path`` holds ``t_local``, ``s``, ``e`` per token ([B, L, 1]) for ``to_velocity``.
  """
  clean_end = batch["clean_end"].astype(jnp.float32)
  clean_start = batch["clean_start"].astype(jnp.float32)
  seg = batch["segment_ids"].astype(jnp.int32)
  text_seg = batch["text_segment_ids"].astype(jnp.int32)
  is_target = batch["is_target"].astype(bool) & (seg > 0)
  num_rows, length, _ = clean_end.shape
  num_slots = length + 1  # segment ids are < L + 1 since every segment has a token

  k_noise, k_time, k_hist, k_drop = jax.random.split(key, 4)
  noise = jax.random.normal(k_noise, clean_end.shape, jnp.float32)
  t_local = _per_segment(
      paths.sample_local_time(k_time, (num_rows, num_slots), config.time_distribution), seg)
  hist_t = 1.0 - config.history_noise_max * _per_segment(
      jax.random.uniform(k_hist, (num_rows, num_slots)), seg)

  windows = jnp.asarray(config.windows, jnp.float32)
  window = windows[jnp.clip(batch["stage"], 0, windows.shape[0] - 1)]  # [B, L, 2]
  s, e = window[..., 0:1], window[..., 1:2]
  x_start, x_end = paths.stage_endpoints(clean_end, clean_start, noise, s, e)   # Eqs. (9)-(10)
  x_t = paths.interpolate(x_start, x_end, t_local[..., None])                  # Eq. (6)
  target = paths.velocity_target(x_start, x_end)                               # Eq. (11)
  t = paths.global_time(t_local, s[..., 0], e[..., 0])
  x_hist = hist_t[..., None] * clean_end + (1.0 - hist_t[..., None]) * noise   # Eq. (16)

  valid = (seg > 0)[..., None]
  video_tokens = jnp.where(is_target[..., None], x_t, x_hist) * valid
  video_t = jnp.where(is_target, t, hist_t) * (seg > 0)

  # The text stream is modulated by the time of its segment's current unit.
  seg_time = jax.vmap(lambda ids, vals: jnp.zeros(num_slots).at[ids].max(vals))(
      seg, jnp.where(is_target, t, 0.0))
  text_t = _per_segment(seg_time, text_seg)

  # Caption dropout: a dropped segment keeps only BOS, the null caption used for guidance.
  dropped = jax.random.bernoulli(k_drop, config.caption_dropout, (num_rows, num_slots))
  keep = ~_per_segment(dropped, text_seg) | (batch["text_tokens"] == BOS_TOKEN)
  text_seg_in = jnp.where(keep, text_seg, 0)

  # Each packed sample weighs the same: 1 / (its supervised tokens * samples in the batch).
  counts = jax.vmap(lambda ids, m: jnp.zeros(num_slots).at[ids].add(m))(seg, is_target)
  num_samples = jnp.maximum(jnp.sum(counts[:, 1:] > 0), 1)
  weight = is_target / jnp.maximum(_per_segment(counts, seg), 1.0) / num_samples

  inputs = dict(
      video_tokens=video_tokens, video_t=video_t, video_segment_ids=seg,
      frame_index=batch["frame_index"].astype(jnp.int32),
      positions=batch["positions"].astype(jnp.float32),
      text_tokens=batch["text_tokens"].astype(jnp.int32), text_segment_ids=text_seg_in,
      text_t=text_t)
  path = dict(t_local=t_local[..., None], s=s, e=e)
  return inputs, target, weight, path


def to_velocity(output, inputs, path, config: ObjectiveConfig):
  """The network's output as an Eq. (11) velocity on the current unit's tokens.

  For ``prediction="clean"`` the output is D̂, the clean tokens at the stage resolution, and the
  velocity follows from ``pfm.pyramid.paths.velocity_from_clean``; for ``"velocity"`` it is used
  as is.
  """
  if config.prediction == "velocity":
    return output
  output = output.astype(jnp.float32)
  return paths.velocity_from_clean(
      inputs["video_tokens"], output, layout.patch_start_mean(output, config.patch_size),
      path["t_local"], path["s"], path["e"], config.min_noise)


def weighted_mse(prediction, target, weight):
  """Eq. (11) loss: squared error averaged over the patch dim, weighted per token (sum)."""
  err = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(err * weight), err
