"""Attention masks from token metadata: the one mask description every attention kernel reads.

The mask is built in one place from per-token metadata (Pyramidal Flow Sec. 3.4, blockwise
causal attention over packed samples): a query attends to a key iff

    segment(q) == segment(k) != 0   and   causal_block(k) <= causal_block(q).

A causal block is one latent frame in autoregressive mode and a whole clip in full-sequence
mode. Text tokens are in causal block -1, so text sees only its own segment's text, and a video
token sees its segment's text plus its own and earlier causal blocks, never later ones. Padding
(segment 0) attends to nothing and is attended by nothing. A query that sees no key has no
proper softmax; `open_empty_rows` / `zero_empty_rows` make fused kernels return exactly zero for
it, in value and in gradient (the kernels themselves are in `pfm.models.kernels`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

TEXT_CAUSAL_BLOCK = -1  # The causal block of text tokens in joint attention.


def make_attention_mask(
  q_segment_ids: jax.Array,
  q_causal_blocks: jax.Array,
  kv_segment_ids: jax.Array,
  kv_causal_blocks: jax.Array,
) -> jax.Array:
  """Blockwise-causal, segment-restricted attention mask.

  Args:
    q_segment_ids: int [B, Lq] packed-sample id of each query, 0 = padding.
    q_causal_blocks: int [B, Lq] causal block of each query (-1 for text tokens).
    kv_segment_ids: int [B, Lk] packed-sample id of each key, 0 = padding.
    kv_causal_blocks: int [B, Lk] causal block of each key (-1 for text tokens).

  Returns:
    bool [B, 1, Lq, Lk]: True where the query may attend to the key, i.e. both are in the same
    non-zero segment and causal_block(key) <= causal_block(query).
  """
  same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  valid = (q_segment_ids[:, :, None] != 0) & (kv_segment_ids[:, None, :] != 0)
  causal = kv_causal_blocks[:, None, :] <= q_causal_blocks[:, :, None]
  return (same_segment & valid & causal)[:, None]


@struct.dataclass
class MaskInfo:
  """Token metadata that defines the attention mask; the one mask description of all backends.

  Attributes:
    q_segment_ids: int32 [B, Lq], 0 = padding.
    q_causal_blocks: int32 [B, Lq], -1 for text tokens.
    kv_segment_ids: int32 [B, Lk], 0 = padding.
    kv_causal_blocks: int32 [B, Lk], -1 for text tokens.
  """

  q_segment_ids: jax.Array
  q_causal_blocks: jax.Array
  kv_segment_ids: jax.Array
  kv_causal_blocks: jax.Array

  @classmethod
  def self_attention(cls, segment_ids: jax.Array, causal_blocks: jax.Array) -> MaskInfo:
    """Queries and keys are the same tokens: [B, L] segment ids and causal blocks."""
    return cls(segment_ids, causal_blocks, segment_ids, causal_blocks)

  def dense(self) -> jax.Array:
    """bool [B, 1, Lq, Lk], see `make_attention_mask`."""
    return make_attention_mask(
      self.q_segment_ids, self.q_causal_blocks, self.kv_segment_ids, self.kv_causal_blocks)


def open_empty_rows(mask: MaskInfo) -> tuple[jax.Array, jax.Array]:
  """The dense mask made safe for fused kernels, and which queries see any key.

  A row that sees no key (padding, or a query whose segment is absent from the keys) has no
  proper softmax: a kernel that skips fully masked blocks (splash) divides by a zero denominator
  (NaN), one that masks by a large negative bias (jax.nn, cuDNN) averages the masked values. Such
  rows are given key 0 instead, so every row is a proper softmax, finite in value and gradient;
  their outputs are zeroed afterwards (`zero_empty_rows`), which also zeroes their cotangent, so
  key 0 receives no gradient from them and their own query gradient is exactly zero.

  Args:
    mask: token metadata of queries [B, Lq] and keys [B, Lk].

  Returns:
    (kernel_mask, has_key): bool [B, 1, Lq, Lk], the mask of `make_attention_mask` with key 0
    added to rows that see no key; bool [B, Lq], True where the query sees at least one key.
  """
  allowed = mask.dense()
  has_key = jnp.any(allowed, axis=-1)  # [B, 1, Lq]
  first_key = jnp.arange(allowed.shape[-1]) == 0
  kernel_mask = allowed | (~has_key[..., None] & first_key)
  return kernel_mask, has_key[:, 0]


def zero_empty_rows(out: jax.Array, has_key: jax.Array) -> jax.Array:
  """Zeroes the rows of out [B, Lq, H, D] whose query sees no key (has_key bool [B, Lq])."""
  return jnp.where(has_key[:, :, None, None], out, jnp.zeros((), out.dtype))
