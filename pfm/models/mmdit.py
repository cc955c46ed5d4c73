"""The MM-DiT over a packed token batch (Pyramidal Flow, Sec. 4.1 and Appendix B; SD3-Medium).

Two streams, text and video, with separate weights and one joint attention over the
concatenation [text; video] in every block (Esser et al., 2024). Conditioning is per token:
every token, text or video, carries its own noise level t (history tokens and the current unit
of each packed sample differ), and its own segment's pooled caption embedding:

    c = MLP(sinusoidal(t * 1000)) + MLP(pooled text of the token's segment).

Each block modulates both streams with adaLN-Zero (shift, scale, gate per token, modulation
initialised to zero so every block starts as the identity). Spatial positions enter as a 2-D
sinusoidal embedding added at the input; the temporal index enters as a 1-D RoPE in attention
(text at position 0). The mask is blockwise causal over frame units within each packed sample
(Sec. 3.4); see `pfm.models.masks`.

Depth and memory: with `MMDiTConfig.scan_layers` the first depth - 1 (identical) blocks are
stored stacked and run in one `jax.lax.scan`, so the traced program and compile time do not grow
with depth; `MMDiTConfig.remat_policy` recomputes each block's activations in the backward pass
(`jax.checkpoint`); see `pfm.models.stacking`. With `dtype="bfloat16"` matmuls and activations
are bfloat16 while parameters, normalisation statistics, attention logits/softmax, RoPE angles
and the final layer stay float32.

Output: the final layer's per-token features are each token's patch, or with
`MMDiTConfig.output_head="overlap"` a 2p x 2p window blended with its neighbours'
(`pfm.models.overlap`), which removes the seams of the patch grid.

Parts: `presets` (config and sizes), `blocks` (joint blocks), `overlap` (the overlapping head),
`stacking` (scan, remat, layouts), `masks` / `kernels` / `attention` (mask, attention kernels,
projections), `text`, `embeddings`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pfm.batch import TextTokens, VideoTokens
from pfm.models.axes import ACT_EMBED
from pfm.models.blocks import FinalLayer, JointBlock, SingleBlock
from pfm.models.embeddings import (
  MLPEmbedder, TimestepEmbedder, rope_angles, rope_angles_axes, spatial_position_embedding,
  table_position_embedding)
from pfm.models import overlap
from pfm.models.layers import linear
from pfm.models.masks import MaskInfo
from pfm.models.partitioning import with_logical_constraint
from pfm.models.presets import OUTPUT_HEADS, MMDiTConfig, model_config
from pfm.models.stacking import (
  call_block, call_single_block, remat_policy, scan_blocks, scan_decode, scan_single_blocks,
  stacked_blocks, stacked_single_blocks)
from pfm.models.text import ByteTextEncoder, segment_mean


@struct.dataclass
class ContextCache:
  """Per-block keys/values of context tokens (captions + clean history) and their metadata.

  Attributes:
    kv: per unstacked block, in order, (keys [B, Lc, H, Dh] with RoPE applied, values
      [B, Lc, H, Dh]): every block, or with `scan_layers` only the last one.
    segment_ids, causal_blocks: int32 [B, Lc] mask metadata of the context ([text; history]).
    pooled_text: [B, Lt, D] pooled caption embedding at each text token.
    text_segment_ids: int32 [B, Lt].
    stacked_kv: with `scan_layers` and depth > 1, (keys, values) of the stacked blocks
      0..depth-2, each [depth - 1, B, Lc, H, Dh]; otherwise None. They precede `kv`.
  """

  kv: tuple[tuple[jax.Array, jax.Array], ...]
  segment_ids: jax.Array
  causal_blocks: jax.Array
  pooled_text: jax.Array
  text_segment_ids: jax.Array
  stacked_kv: tuple[jax.Array, jax.Array] | None = None


class MMDiT(nnx.Module):
  """The pyramidal-flow MM-DiT: packed video tokens + captions -> velocity per video token.

  Source: Pyramidal Flow (Jin et al., ICLR 2025) Sec. 4.1 and Appendix B, on the MM-DiT of
  SD3-Medium (Esser et al., 2024); blockwise causal attention of Sec. 3.4.

  Joint blocks: `blocks`, an `nnx.List` of `depth` `JointBlock`s (the last one's text stream
  pre-only); with `config.scan_layers`, `blocks` is one `JointBlock` holding blocks 0..depth-2
  stacked on a leading "layers" axis (None for depth 1) and `last_block` the last block.
  Single-stream blocks (`config.single_blocks`, FLUX): `single_blocks`, an `nnx.List`, or with
  `scan_layers` one `SingleBlock` of all of them stacked.

  Raises:
    ValueError: on inconsistent sizes, no text input, depth < 1, an unknown remat_policy or
      output_head, or the overlapping head with an odd patch size.
  """

  def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
    if config.width % config.num_heads or config.head_dim % 2:
      raise ValueError("width / num_heads must be an even integer.")
    if config.width % 4:
      raise ValueError("width must be a multiple of 4 (2-D sinusoidal embedding).")
    if config.text_depth == 0 and config.text_embed_dim is None:
      raise ValueError("Set text_depth > 0 or text_embed_dim: the model needs a text input.")
    if config.depth < 1:
      raise ValueError(f"depth must be at least 1, got {config.depth}.")
    if config.output_head not in OUTPUT_HEADS:
      raise ValueError(f"output_head={config.output_head!r} is not one of {OUTPUT_HEADS}.")
    if config.output_head == "overlap" and config.patch_size % 2:
      raise ValueError(f"output_head='overlap' needs an even patch size, got {config.patch_size}.")
    config.validate_options()
    remat_policy(config.remat_policy)  # Validates the name.
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width = config.width

    self.patch_embed = linear(config.patch_dim, width, (None, "embed"), **kw)
    self.time_embed = TimestepEmbedder(
      width, frequency_dim=config.time_frequency_dim, time_scale=config.time_scale,
      noise_input=config.time_input == "noise", **kw)
    if config.text_depth > 0:
      self.text_encoder = ByteTextEncoder(
        config.text_width, config.text_depth, config.text_heads,
        mlp_ratio=config.text_mlp_ratio, vocab_size=config.text_vocab_size,
        rope_theta=config.rope_theta, attention_backend=config.attention_backend, **kw)
    else:
      self.text_encoder = None
    if config.text_embed_dim is not None:
      self.text_projection = linear(
        config.text_embed_dim, config.text_width, (None, "embed"), **kw)
    else:
      self.text_projection = None
    if config.text_projection_only:
      self.context_embed = None
    else:
      self.context_embed = linear(config.text_width, width, (None, "embed"), **kw)
    self.pooled_text_embed = MLPEmbedder(config.pooled_embed_dim or config.text_width, width,
                                         **kw)
    # The last joint block's text output is used only when single-stream blocks follow.
    last_pre_only = config.single_blocks == 0
    if config.scan_layers:
      self.blocks = stacked_blocks(config, config.depth - 1, rngs) if config.depth > 1 else None
      self.last_block = JointBlock(config, text_pre_only=last_pre_only, rngs=rngs)
    else:
      self.blocks = nnx.List([
        JointBlock(config, text_pre_only=last_pre_only and i == config.depth - 1, rngs=rngs)
        for i in range(config.depth)
      ])
    if config.scan_layers and config.single_blocks:
      self.single_blocks = stacked_single_blocks(config, config.single_blocks, rngs)
    else:
      self.single_blocks = nnx.List([
        SingleBlock(config, rngs=rngs) for _ in range(config.single_blocks)])
    self.final_layer = FinalLayer(config, rngs=rngs)

  def encode_text(
    self,
    text_tokens: jax.Array | None,
    text_segment_ids: jax.Array,
    text_embeddings: jax.Array | None = None,
  ) -> jax.Array:
    """Per-token caption features [B, Lt, text_width] from byte ids or precomputed embeddings.

    Raises:
      ValueError: unless exactly one of text_tokens / text_embeddings is given and the model
        has the matching input (byte encoder / `text_embed_dim`).
    """
    if (text_tokens is None) == (text_embeddings is None):
      raise ValueError("Pass exactly one of text_tokens and text_embeddings.")
    if text_embeddings is not None:
      if self.text_projection is None:
        raise ValueError("text_embeddings given but config.text_embed_dim is None.")
      return self.text_projection(text_embeddings)
    if self.text_encoder is None:
      raise ValueError("text_tokens given but the model has no byte encoder (text_depth=0).")
    return self.text_encoder(text_tokens, text_segment_ids)

  def __call__(self, video: VideoTokens, text: TextTokens) -> jax.Array:
    """Predicts the output of every video token of a packed batch.

    Args:
      video: the video tokens (``pfm.batch.VideoTokens``: tokens [B, L, P] with
        P = config.patch_dim, noise levels, segment ids, frame units, positions).
      text: the captions (``pfm.batch.TextTokens``: byte tokens, or embeddings [B, Lt,
        config.text_embed_dim], with segment ids and noise levels).

    Returns:
      float32 [B, L, P]: the clean tokens or the stage target (``config.model.prediction``);
      exactly zero at padding tokens.

    Raises:
      ValueError: unless exactly one of ``text.tokens`` / ``text.embeddings`` is given and the
        model has the matching input.
    """
    _, x_video, c_video = self._forward(video, text, collect_kv=False)
    return self._output(x_video, c_video, video)

  def encode_context(self, video: VideoTokens, text: TextTokens) -> ContextCache:
    """Keys/values of tokens that later frame units only read: captions and clean history.

    Blockwise causality makes this exact: neither captions (frame -1) nor earlier frame units
    attend to a later unit, so their activations in every block are the same with or without the
    unit being generated. With ``text_time_conditioning=False`` they also do not depend on the
    sampling time, so one context serves every Euler step of a stage. Arguments as `__call__`,
    for the context tokens only (``video`` = the history, possibly empty or padded).

    Returns:
      a `ContextCache` for `decode`.
    """
    if self.config.single_blocks or self.config.conditioning == "sample":
      raise ValueError("encode_context needs joint blocks only and conditioning='token': with "
                       "single-stream blocks or one conditioning per sample the context depends "
                       "on the tokens being generated.")
    context, _, _ = self._forward(video, text, collect_kv=True)
    return context

  def decode(self, video: VideoTokens, context: ContextCache) -> jax.Array:
    """`__call__` for new video tokens that attend to a cached context and to themselves.

    Equals the output of `__call__` on [context; new tokens] at the new tokens, when the new
    tokens belong to frame units at or after every context frame. Shapes as `__call__`, for the
    new tokens only.
    """
    config = self.config
    x_video, c_video = self._embed_video(video, context.pooled_text, context.text_segment_ids,
                                         None)
    mask = MaskInfo(
      video.segment_ids, video.causal_block,
      jnp.concatenate([context.segment_ids, video.segment_ids], 1),
      jnp.concatenate([context.causal_blocks, video.causal_block], 1))
    angles = self._angles(video.rope_positions, video.positions)
    if config.scan_layers:
      if self.blocks is not None:
        x_video = scan_decode(self.blocks, x_video, c_video, angles, mask, context.stacked_kv)
      x_video = self.last_block.decode(x_video, c_video, angles, mask, context.kv[0])
    else:
      for block, kv in zip(self.blocks, context.kv):
        x_video = block.decode(x_video, c_video, angles, mask, kv)
    return self._output(x_video, c_video, video)

  # -- shared pieces ---------------------------------------------------------------------------

  def _embed_video(self, video: VideoTokens, pooled_text, text_segment_ids, c_text):
    """Patch embedding + spatial position; conditioning: the token's time + its segment's
    caption, or (``conditioning="sample"``) its segment's caption conditioning ``c_text``."""
    config = self.config
    x_video = self.patch_embed(video.tokens.astype(self.dtype))
    if config.position_embedding == "sincos":
      x_video = x_video + spatial_position_embedding(
        video.positions, config.width, config.position_max_period).astype(self.dtype)
    elif config.position_embedding == "table":
      x_video = x_video + table_position_embedding(
        video.positions, current_grid(video.positions, video.segment_ids), config.width,
        config.position_table_size, config.position_table_base).astype(self.dtype)
    if config.conditioning == "sample":
      c_video = segment_mean(c_text, video.segment_ids, text_segment_ids)
    else:
      c_video = self.time_embed(video.t) + segment_mean(
        pooled_text, video.segment_ids, text_segment_ids)             # [B, L, D]
    return with_logical_constraint(x_video, ACT_EMBED), with_logical_constraint(c_video, ACT_EMBED)

  def _angles(self, temporal_positions, positions):
    """RoPE angles [B, L, Dh / 2]: temporal only, or (frame, row, col) with `rope_axes`."""
    config = self.config
    if not config.rope_axes:
      return rope_angles(temporal_positions, config.head_dim, config.rope_theta)
    axes = jnp.concatenate([temporal_positions.astype(jnp.float32)[..., None],
                            positions.astype(jnp.float32)], axis=-1)
    return rope_angles_axes(axes, tuple(config.rope_axes), config.rope_theta)

  def _forward(self, video: VideoTokens, text: TextTokens, *, collect_kv: bool):
    """All blocks over [text; video] -> (ContextCache of every token, x_video, c_video).

    Without `collect_kv` the per-block keys/values are not kept (the cache holds none).
    """
    config = self.config
    text_segment_ids = text.segment_ids
    features = self.encode_text(text.tokens, text_segment_ids, text.embeddings)
    # A clean-conditioned caption is at its own noise level, t = 1.
    text_t = text.t if config.text_time_conditioning else jnp.ones_like(text.t)

    # Per-token conditioning c = MLP(sin(t * 1000)) + MLP(pooled text of the token's segment).
    # The pooled MLP runs on text tokens; a video token then takes its segment's value.
    if config.pooled_embed_dim is not None:  # a frozen encoder's pooled embedding (SD3: CLIP)
      if text.pooled is None:
        raise ValueError("config.pooled_embed_dim is set: pass TextTokens.pooled.")
      pooled_input = text.pooled.astype(self.dtype)
    else:
      pooled_input = features
    pooled = self.pooled_text_embed(
      segment_mean(pooled_input, text_segment_ids, text_segment_ids))  # [B, Lt, D]
    c_text = with_logical_constraint(self.time_embed(text_t) + pooled, ACT_EMBED)
    x_video, c_video = self._embed_video(video, pooled, text_segment_ids, c_text)
    if self.context_embed is not None:
      features = self.context_embed(features)
    x_text = with_logical_constraint(features, ACT_EMBED)

    # Joint sequence [text; video]: mask metadata (text at frame `text_causal_block`) and RoPE
    # angles (text at position 0 on every axis).
    segment_ids = jnp.concatenate([text_segment_ids, video.segment_ids], axis=1)
    causal_blocks = jnp.concatenate(
      [jnp.full_like(text_segment_ids, config.text_causal_block), video.causal_block], axis=1)
    mask = MaskInfo.self_attention(segment_ids, causal_blocks)
    lt = text_segment_ids.shape[1]
    angles = self._angles(
      jnp.concatenate([jnp.zeros(text_segment_ids.shape, jnp.float32),
                       video.rope_positions.astype(jnp.float32)], axis=1),
      jnp.concatenate([jnp.zeros((*text_segment_ids.shape, 2), jnp.float32),
                       video.positions.astype(jnp.float32)], axis=1))

    kv, stacked_kv = [], None
    if config.scan_layers:
      unstacked = [self.last_block]
      if self.blocks is not None:
        x_text, x_video, stacked_kv = scan_blocks(
          self.blocks, x_text, c_text, x_video, c_video, angles, mask,
          remat=config.remat_policy, collect_kv=collect_kv)
    else:
      unstacked = list(self.blocks)
    for block in unstacked:
      x_text, x_video, block_kv = call_block(
        block, x_text, c_text, x_video, c_video, angles, mask, remat=config.remat_policy)
      if collect_kv:
        kv.append(block_kv)
    if config.single_blocks:
      x, c = jnp.concatenate([x_text, x_video], 1), jnp.concatenate([c_text, c_video], 1)
      if config.scan_layers:
        x = scan_single_blocks(self.single_blocks, x, c, angles, mask,
                               remat=config.remat_policy)
      else:
        for block in self.single_blocks:
          x = call_single_block(block, x, c, angles, mask, remat=config.remat_policy)
      x_video = x[:, lt:]
    context = ContextCache(kv=tuple(kv), segment_ids=segment_ids, causal_blocks=causal_blocks,
                           pooled_text=pooled, text_segment_ids=text_segment_ids,
                           stacked_kv=stacked_kv)
    return context, x_video, c_video

  def _output(self, x_video, c_video, video: VideoTokens):
    out = self.final_layer(x_video, c_video).astype(jnp.float32)
    if self.config.output_head == "overlap":
      neighbours = overlap.neighbour_indices(
        video.segment_ids, video.rope_positions, video.positions)
      out = overlap.overlap_add(out, neighbours, self.config.patch_size)
    return jnp.where(video.segment_ids[..., None] != 0, out, 0.0)


def current_grid(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """The current unit's token grid (rows, cols) at every token of a packed sample.

  The current unit sits on the integer grid 0..h-1 x 0..w-1 and every history unit inside it
  (`pfm.pyramid.tokens.grid_positions`), so the grid is one more than the largest position of
  the sample.

  Args:
    positions: float [B, L, 2] (row, col); segment_ids: int [B, L] (0 = padding).

  Returns:
    float32 [B, L, 2]; meaningless at padding tokens.
  """
  num = segment_ids.shape[1] + 1

  def row(pos, seg):
    return jax.ops.segment_max(pos, seg, num_segments=num)[seg]

  return jnp.floor(jax.vmap(row)(positions.astype(jnp.float32), segment_ids)) + 1.0


def build_model(config: MMDiTConfig | str | Mapping[str, Any], rngs: nnx.Rngs) -> MMDiT:
  """Builds an `MMDiT`.

  Args:
    config: an `MMDiTConfig`, a variant name (see `VARIANTS`), or a mapping of config fields
      with an optional "variant" key naming the preset they override (e.g. an ml_collections
      ConfigDict).
    rngs: parameter RNGs, e.g. `nnx.Rngs(0)`.
  """
  if isinstance(config, str):
    config = model_config(config)
  elif not isinstance(config, MMDiTConfig):
    fields = dict(config)
    config = model_config(fields.pop("variant", "smoke"), **fields)
  return MMDiT(config, rngs=rngs)


def count_params(model_or_state: Any) -> int:
  """Number of parameter scalars of a model (`nnx.Param` only), its state, or any pytree.

  Works on abstract models/states (`nnx.eval_shape`), since only shapes are read.
  """
  tree = model_or_state
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  elif isinstance(tree, nnx.State):
    tree = tree.filter(nnx.Param)
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))
