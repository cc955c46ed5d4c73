"""The packed token batch as types: the clean batch of the pipeline, and the MM-DiT's inputs.

A packed row holds several samples (Patch n' Pack): each token carries the id of its sample
(``segment_ids``, 0 = padding), its stage and causal block, so one row mixes stages, history and
current units. The pipeline (``pfm.data.pipeline``) yields a clean `PackedBatch`; the objective
(``pfm.objective.corrupt_packed_batch``) draws noise on device and turns it into the model's
`VideoTokens` and `TextTokens`; the sampler builds those per Euler step; the model
(``MMDiT.__call__``, ``encode_context``, ``decode``) reads them. All are pytrees (frozen
``flax.struct`` dataclasses), so they pass through ``jit``, ``scan`` and sharding as they are.

Shapes: ``B`` rows, ``L`` video tokens and ``Lt`` text tokens per row, ``P = patch_size^2 * 3``
features per video token, ``E`` features of a precomputed caption embedding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class VideoTokens:
  """Video tokens of a packed batch.

  Attributes:
    tokens: float [B, L, P] patchified pixels in [-1, 1] plus noise: x̂_t of the current unit,
      the (possibly corrupted) clean history (Pyramidal Flow Eq. 16).
    t: float32 [B, L] each token's noise level in [0, 1] (0 = noise, 1 = data).
    segment_ids: int32 [B, L] packed sample 1..S of each token, 0 = padding.
    causal_block: int32 [B, L] the token's block of the blockwise causal mask (Pyramidal Flow
      Sec. 3.4; 0 = first): a token sees its own and earlier blocks of its sample. In
      autoregressive mode a block is one latent frame; a clip generated at once (full-sequence
      mode) is one block, with bidirectional attention over its frames.
    positions: float32 [B, L, 2] (row, col) on the current unit's token grid, in patch units
      (fractional for a lower-resolution history unit, Pyramidal Flow Sec. 3.4).
    temporal_positions: float32 [B, L] temporal RoPE position in full-rate frames (TPDiff
      Eq. 14, stage-consistent), or None for ``causal_block``.
  """

  tokens: jax.Array
  t: jax.Array
  segment_ids: jax.Array
  causal_block: jax.Array
  positions: jax.Array
  temporal_positions: jax.Array | None = None

  @property
  def rope_positions(self) -> jax.Array:
    """The temporal RoPE positions: ``temporal_positions``, else ``causal_block``."""
    return self.causal_block if self.temporal_positions is None else self.temporal_positions

  def concatenate(self, other: VideoTokens) -> VideoTokens:
    """``[self; other]`` along the token axis (both with or both without temporal positions).

    Raises:
      ValueError: if only one of them has ``temporal_positions``.
    """
    if (self.temporal_positions is None) != (other.temporal_positions is None):
      raise ValueError("concatenate: temporal_positions given for one side only")
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), self, other)


@struct.dataclass
class TextTokens:
  """The captions of a packed batch: byte tokens or precomputed embeddings, one per segment.

  Attributes:
    segment_ids: int32 [B, Lt] the sample of each text token (the same ids as its video tokens),
      0 = padding or a dropped caption.
    t: float32 [B, Lt] the noise level of the segment's current unit (SD3 modulates the text
      stream with it; with ``text_time_conditioning=False`` the model reads a clean t = 1).
    tokens: int32 [B, Lt] caption bytes + 2 (``pfm.data.text``), 1 = BOS, 0 = padding; or None.
    embeddings: float [B, Lt, E] caption embeddings from a frozen encoder, instead of
      ``tokens``; or None.
    pooled: float [B, Lt, Ep] a pooled caption embedding (e.g. CLIP's), the same on every text
      token of a segment, for models with ``pooled_embed_dim``; or None.
  """

  segment_ids: jax.Array
  t: jax.Array
  tokens: jax.Array | None = None
  embeddings: jax.Array | None = None
  pooled: jax.Array | None = None

  def at_time(self, t) -> TextTokens:
    """The same captions with every token's noise level ``t`` (scalar or [B, Lt])."""
    return self.replace(t=jnp.broadcast_to(jnp.asarray(t, jnp.float32), self.segment_ids.shape))


@struct.dataclass
class PackedBatch:
  """A clean packed batch (NumPy on the host, ``jax.Array`` on device); no noise drawn yet.

  Attributes:
    clean_end: float32 [B, L, P] the clean tokens at the token's stage: Down(x^i, 2^k) of the
      current unit, or the clean history (Pyramidal Flow Eq. 16-17), in [-1, 1].
    clean_start: float32 [B, L, P] Up(Down(.)) of ``clean_end`` for current-unit tokens (the
      stage's start mean, Pyramidal Flow Eq. 8, TPDiff Eq. 7); 0 for history tokens.
    segment_ids: int32 [B, L] packed sample 1..S of each token, 0 = padding.
    causal_block: int32 [B, L] the token's causal block within its clip (its latent frame;
      all 0 for a whole clip).
    positions: float32 [B, L, 2] (row, col) on the current unit's token grid.
    stage: int32 [B, L] stage k of the token's sample (0 = full size, K - 1 = coarsest).
    is_target: int32 [B, L] 1 for tokens of the unit being denoised (supervised), 0 for history.
    text_tokens: int32 [B, Lt] caption bytes + 2 (``pfm.data.text``), 0 = padding.
    text_segment_ids: int32 [B, Lt] the sample of each text token, 0 = padding.
    temporal_positions: float32 [B, L] temporal RoPE position in full-rate frames (TPDiff
      Eq. 14), or None for ``causal_block``.
    temporal_block_offset: int32 [B, L] offset to the first token of the token's temporal jump
      block (``pfm.data.layout.layout_clip``), or None for no temporal jump (all 0).
    noise: float32 [B, L, P] the diffusion noise aligned to the data on the host
      (``pyramid.align_noise``, TPDiff Algorithm 1), or None (drawn on device).
    text_embeddings: float32 [B, Lt, E] cached caption features of a frozen encoder (T5), or
      None (``text_tokens`` are bytes); ``text_tokens`` then only marks the caption positions
      (1 at each caption's first token, 2 after it).
    text_pooled: float32 [B, Lt, Ep] the cached pooled caption embedding (CLIP) on every token
      of its caption, or None.
  """

  clean_end: jax.Array
  clean_start: jax.Array
  segment_ids: jax.Array
  causal_block: jax.Array
  positions: jax.Array
  stage: jax.Array
  is_target: jax.Array
  text_tokens: jax.Array
  text_segment_ids: jax.Array
  temporal_positions: jax.Array | None = None
  temporal_block_offset: jax.Array | None = None
  noise: jax.Array | None = None
  text_embeddings: jax.Array | None = None
  text_pooled: jax.Array | None = None

  @classmethod
  def from_fields(cls, fields) -> PackedBatch:
    """From a mapping with the attribute names as keys (``noise`` optional).

    Raises:
      TypeError: naming a missing or unknown field.
    """
    return cls(**fields)

  def as_dict(self) -> dict[str, jax.Array]:
    """``{field name: array}`` of the fields present (the optional ones when not None)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None}
