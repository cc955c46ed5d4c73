"""The stage-wise diffusion objective on a packed token batch.

Pyramidal Flow Eqs. 6-11 and 16-17; TPDiff Algorithm 2 (flow matching and DDIM). The data
pipeline delivers *clean* packed rows (see ``pfm.data.pipeline``); everything random about
diffusion happens here, on device, inside the jitted train step:

* per packed sample (segment): the rescaled stage time t', the history corruption level and the
  caption-dropout coin;
* per token: the noise n at the token's own stage size (the data side patchified each stage at its
  own size, so i.i.d. noise per token is N(0, I) there), unless the pipeline sends noise aligned
  to the data (TPDiff Algorithm 1, ``pfm.data.alignment``).

Supervised tokens get x_t and the target of their stage (``pfm.pyramid.paths``): flow matching
interpolates the coupled endpoints (Eqs. 6/12) with the velocity target (Eqs. 11/13); DDIM puts x_t
on the stage's DDIM path (TPDiff Eq. 10) with the stage noise eps_k (Eq. 11) as target. History
tokens (autoregressive mode) are corrupted with strength u ~ U[0, history_noise_max] (t = 1 - u,
Sec. 4.1 and Eq. 16) and are not supervised.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pfm import batch as batch_lib
from pfm.pyramid import diffusions, paths, tokens

BOS_TOKEN = 1  # every caption starts with it; a dropped caption keeps only it (the null caption)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static settings of the objective (hashable, so it can be closed over by jit)."""
  windows: tuple[tuple[float, float], ...]  # (s_k, e_k) for k = 0..K-1
  # (c_k, d_k): the model's conditioning time per stage (`stages.Pyramid.timestep_windows`);
  # None: the noise level.
  timestep_windows: tuple[tuple[float, float], ...] | None = None
  time_distribution: str = "uniform"
  history_noise_max: float = 1.0 / 3.0
  caption_dropout: float = 0.1
  # What the network outputs: "clean" (x-prediction) or the stage target itself ("velocity" for
  # flow matching, "epsilon" for DDIM).
  prediction: str = "clean"
  patch_size: int = 2
  min_noise: float = 0.05  # clip of the noise coefficient when converting a clean prediction
  diffusion: str = "flow_matching"  # or "ddim"
  spatial_jump: int = 2  # spatial upsampling factor of every jump (1: no spatial pyramid)
  # One noise n for both endpoints of a stage (Pyramidal Flow Eqs. 9-10, Fig. 13 right), or
  # independent noises for start and end (the "independent" coupling of Fig. 13 left).
  coupled_noise: bool = True

  @property
  def noise_schedule(self) -> diffusions.NoiseSchedule:
    return diffusions.get(self.diffusion).noise_schedule


def _per_segment(values, segment_ids):
  """Gathers per-segment values [B, S] at token segment ids [B, L] -> [B, L]."""
  return jnp.take_along_axis(values, segment_ids, axis=1)


def corrupt_packed_batch(key, batch: batch_lib.PackedBatch, config: ObjectiveConfig):
  """Noises a clean packed batch into model inputs and stage targets.

  Args:
    key: PRNG key (e.g. ``fold_in(rng, step)``).
    batch: the clean packed batch (``pfm.batch.PackedBatch``); its ``noise``, when given, is
      the host-aligned diffusion noise (TPDiff Algorithm 1).
    config: windows and noise settings.

  Returns:
    ``(inputs, target, weight, path)``: ``inputs`` is the MM-DiT's ``(video, text)``
    (``pfm.batch.VideoTokens``, ``pfm.batch.TextTokens``); ``target``
    [B, L, P] is the stage target (velocity or eps_k) on supervised tokens; ``weight`` float32
    [B, L] sums to 1 over each row's supervised tokens divided by the number of rows, so every
    packed sample counts equally whatever its token count; ``path`` holds ``t_local``, ``s``,
    ``e`` per token ([B, L, 1]) and the metadata ``to_target`` needs.
  """
  clean_end = batch.clean_end.astype(jnp.float32)
  clean_start = batch.clean_start.astype(jnp.float32)
  seg = batch.segment_ids.astype(jnp.int32)
  text_seg = batch.text_segment_ids.astype(jnp.int32)
  is_target = batch.is_target.astype(bool) & (seg > 0)
  num_rows, length, _ = clean_end.shape
  num_slots = length + 1  # segment ids are < L + 1 since every segment has a token

  k_noise, k_time, k_hist, k_drop = jax.random.split(key, 4)
  if batch.noise is not None:  # aligned to the data on the host (TPDiff Algorithm 1)
    noise = batch.noise.astype(jnp.float32)
  else:
    noise = jax.random.normal(k_noise, clean_end.shape, jnp.float32)
  noise_schedule = config.noise_schedule
  t_local = _per_segment(
      paths.sample_local_time(k_time, (num_rows, num_slots), config.time_distribution), seg)
  hist_t = 1.0 - config.history_noise_max * _per_segment(
      jax.random.uniform(k_hist, (num_rows, num_slots)), seg)

  windows = jnp.asarray(config.windows, jnp.float32)
  window = windows[jnp.clip(batch.stage, 0, windows.shape[0] - 1)]  # [B, L, 2]
  s, e = window[..., 0:1], window[..., 1:2]
  # Endpoints: Pyramidal Flow Eqs. (9)-(10), TPDiff Eqs. (7)-(8).
  x_start, x_end = paths.stage_endpoints(clean_end, clean_start, noise, s, e, noise_schedule)
  if not config.coupled_noise:  # the start point with its own noise (Fig. 13's independent)
    x_start, _ = paths.stage_endpoints(
        clean_end, clean_start, jax.random.normal(jax.random.fold_in(key, 4), clean_end.shape, jnp.float32), s, e,
        noise_schedule)
  # x_t and target: Eqs. (6)/(11) (flow matching) or TPDiff Eqs. (10)/(11) (DDIM).
  x_t = paths.stage_point(x_start, x_end, t_local[..., None], s, e, noise_schedule)
  target = paths.stage_target(x_start, x_end, s, e, noise_schedule)
  if config.timestep_windows is None:
    t = paths.global_time(t_local, s[..., 0], e[..., 0])
  else:  # the model's own time per stage (Pyramid Flow's released models)
    model_window = jnp.asarray(config.timestep_windows, jnp.float32)[
        jnp.clip(batch.stage, 0, windows.shape[0] - 1)]
    t = paths.global_time(t_local, model_window[..., 0], model_window[..., 1])
  x_hist = (noise_schedule.signal(hist_t)[..., None] * clean_end
            + noise_schedule.noise(hist_t)[..., None] * noise)                        # Eq. (16)

  valid = (seg > 0)[..., None]
  video_tokens = jnp.where(is_target[..., None], x_t, x_hist) * valid
  video_t = jnp.where(is_target, t, hist_t) * (seg > 0)

  # The text stream is modulated by the time of its segment's current unit.
  seg_time = jax.vmap(lambda ids, vals: jnp.zeros(num_slots).at[ids].max(vals))(
      seg, jnp.where(is_target, t, 0.0))
  text_t = _per_segment(seg_time, text_seg)

  # Caption dropout: a dropped segment keeps only BOS, the null caption used for guidance.
  # Cached caption features have no BOS: a dropped caption is one token of zero features (and a
  # zero pooled embedding), as `null_caption_features` gives the sampler.
  dropped = jax.random.bernoulli(k_drop, config.caption_dropout, (num_rows, num_slots))
  dropped_token = _per_segment(dropped, text_seg)
  keep = ~dropped_token | (batch.text_tokens == BOS_TOKEN)
  text_seg_in = jnp.where(keep, text_seg, 0)
  null = dropped_token[..., None]
  embeddings = pooled = None
  if batch.text_embeddings is not None:
    embeddings = jnp.where(null, 0.0, batch.text_embeddings.astype(jnp.float32))
  if batch.text_pooled is not None:
    pooled = jnp.where(null, 0.0, batch.text_pooled.astype(jnp.float32))

  # Each packed sample weighs the same: 1 / (its supervised tokens * samples in the batch).
  counts = jax.vmap(lambda ids, m: jnp.zeros(num_slots).at[ids].add(m))(seg, is_target)
  num_samples = jnp.maximum(jnp.sum(counts[:, 1:] > 0), 1)
  weight = is_target / jnp.maximum(_per_segment(counts, seg), 1.0) / num_samples

  causal_block = batch.causal_block.astype(jnp.int32)
  temporal_positions = (causal_block if batch.temporal_positions is None
                        else batch.temporal_positions).astype(jnp.float32)
  inputs = (
      batch_lib.VideoTokens(
          tokens=video_tokens, t=video_t, segment_ids=seg, causal_block=causal_block,
          positions=batch.positions.astype(jnp.float32),
          temporal_positions=temporal_positions),
      batch_lib.TextTokens(segment_ids=text_seg_in, t=text_t,
                           tokens=None if embeddings is not None
                           else batch.text_tokens.astype(jnp.int32),
                           embeddings=embeddings, pooled=pooled))
  block_offset = batch.temporal_block_offset
  if block_offset is None:
    block_offset = jnp.zeros_like(seg)
  path = dict(t_local=t_local[..., None], s=s, e=e,
              coarsest=(batch.stage == windows.shape[0] - 1)[..., None],
              temporal_block_offset=block_offset.astype(jnp.int32))
  return inputs, target, weight, path


def clean_start_tokens(clean_tokens, path, config: ObjectiveConfig):
  """Up(Down(D̂)) across each token's jump, on packed tokens: the start mean a clean prediction
  implies (Pyramidal Flow Eq. 8, TPDiff Eq. 7; ``Pyramid.clean_start`` on unpacked videos).

  Temporally, a token's block is the tokens at its place in the frames that one coarse frame
  duplicates into (``temporal_block_offset`` points at the first); their mean is a segment mean
  keyed by the first token's index. Spatially the 2x2 blocks lie inside each token
  (``tokens.patch_clean_start``). The coarsest stage's start mean is zero.

  Args:
    clean_tokens: float32 [B, L, P]. path: from ``corrupt_packed_batch``. config: settings.

  Returns:
    float32 [B, L, P].
  """
  length = clean_tokens.shape[1]
  block = jnp.arange(length) + path["temporal_block_offset"]                # [B, L]

  def block_mean(tokens, ids):
    total = jax.ops.segment_sum(tokens, ids, num_segments=length)
    count = jax.ops.segment_sum(jnp.ones(ids.shape, tokens.dtype), ids, num_segments=length)
    return (total / jnp.maximum(count, 1.0)[:, None])[ids]

  mean = jax.vmap(block_mean)(clean_tokens, block)
  if config.spatial_jump == 2:
    mean = tokens.patch_clean_start(mean, config.patch_size)
  return jnp.where(path["coarsest"], 0.0, mean)


def to_target(output, video: batch_lib.VideoTokens, path, config: ObjectiveConfig):
  """The network's output as the stage target (velocity or eps_k) on supervised tokens.

  ``video`` is the model's video input (its tokens are x_t).

  For ``prediction="clean"`` the output is D̂, the clean tokens at the stage's size, and the
  target follows from ``pfm.pyramid.paths.target_from_clean``; otherwise it is the target itself.
  """
  if config.prediction != "clean":
    return output
  output = output.astype(jnp.float32)
  return paths.target_from_clean(
      video.tokens, output, clean_start_tokens(output, path, config),
      path["t_local"], path["s"], path["e"], config.noise_schedule, config.min_noise)



def weighted_mse(prediction, target, weight):
  """Eq. (11) / Algorithm 2 loss: squared error averaged over the patch dim, weighted per token."""
  err = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(err * weight), err
