"""Byte-level text encoder trained with the model, and per-segment text pooling.

The caption vocabulary is UTF-8 bytes shifted by 2: id 0 is padding, id 1 is BOS (every caption
starts with it, an empty caption is just [1]), ids 2..257 are bytes 0..255. The encoder is a
small pre-norm transformer with bidirectional attention restricted to each packed caption and a
1-D RoPE on the position inside the caption. It stands in for the frozen T5/CLIP encoders of
Pyramidal Flow (Appendix B); `MMDiT` also accepts precomputed embeddings instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pfm.models.attention import QKV, attention_output
from pfm.models.axes import ACT_EMBED
from pfm.models.embeddings import apply_rope, rope_angles
from pfm.models.kernels import dot_product_attention
from pfm.models.layers import Mlp, rms_norm
from pfm.models.masks import MaskInfo
from pfm.models.partitioning import param_init, with_logical_constraint

TEXT_VOCAB_SIZE = 258
PAD_ID = 0
BOS_ID = 1
BYTE_OFFSET = 2


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Position of each token inside its run of equal segment ids.

  Args:
    segment_ids: int [B, L]; each segment's tokens are assumed contiguous.

  Returns:
    int32 [B, L], 0 at the first token of each run, counting up.
  """
  idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
  is_start = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
    axis=1)
  start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
  return idx - start


def segment_mean(
  values: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array
) -> jax.Array:
  """Mean of `values` over the tokens of each query's segment (masked mean, one matmul).

  Args:
    values: float [B, Lk, D] per-token features (e.g. text features).
    q_segment_ids: int [B, Lq] segment of each query token, 0 = padding.
    kv_segment_ids: int [B, Lk] segment of each value token, 0 = padding.

  Returns:
    [B, Lq, D] in values' dtype (accumulated in float32): for each query, the mean of the
    values whose segment equals the query's non-zero segment; zeros where there is none
    (padding queries, or a segment without value tokens).
  """
  same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
    kv_segment_ids[:, None, :] != 0)
  weights = same.astype(jnp.float32)
  weights = weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1.0)
  out = jnp.einsum(
    "bqk,bkd->bqd", weights.astype(values.dtype), values,
    preferred_element_type=jnp.float32)
  return out.astype(values.dtype)


class TextBlock(nnx.Module):
  """Pre-norm transformer block: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

  def __init__(
    self,
    width: int,
    num_heads: int,
    mlp_ratio: float,
    *,
    rope_theta: float = 10_000.0,
    attention_backend: str = "xla",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.rope_theta = rope_theta
    self.attention_backend = attention_backend
    self.norm1 = rms_norm(width, **kw)
    self.qkv = QKV(width, num_heads, **kw)
    self.out = attention_output(width, num_heads, **kw)
    self.norm2 = rms_norm(width, **kw)
    self.mlp = Mlp(width, int(width * mlp_ratio), **kw)

  def __call__(
    self, x: jax.Array, angles: jax.Array, mask: MaskInfo
  ) -> jax.Array:
    """x: [B, Lt, D]; angles: float32 [B, Lt, Dh/2] RoPE angles; returns [B, Lt, D]."""
    q, k, v = self.qkv(self.norm1(x))
    q, k = apply_rope(q, angles), apply_rope(k, angles)
    a = dot_product_attention(q, k, v, mask, backend=self.attention_backend)
    x = x + self.out(a)
    x = x + self.mlp(self.norm2(x))
    return with_logical_constraint(x, ACT_EMBED)


class ByteTextEncoder(nnx.Module):
  """Byte-level caption encoder: token ids [B, Lt] -> features [B, Lt, width]."""

  def __init__(
    self,
    width: int,
    depth: int,
    num_heads: int,
    *,
    mlp_ratio: float = 4.0,
    vocab_size: int = TEXT_VOCAB_SIZE,
    rope_theta: float = 10_000.0,
    attention_backend: str = "xla",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.width = width
    self.num_heads = num_heads
    self.rope_theta = rope_theta
    self.embed = nnx.Embed(
      vocab_size, width, dtype=dtype, param_dtype=param_dtype,
      embedding_init=param_init(nnx.initializers.normal(0.02), ("vocab", "embed")),
      rngs=rngs)
    self.blocks = nnx.List([
      TextBlock(
        width, num_heads, mlp_ratio, rope_theta=rope_theta,
        attention_backend=attention_backend, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs)
      for _ in range(depth)
    ])
    self.norm = rms_norm(width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Encodes packed captions.

    Args:
      tokens: int32 [B, Lt] ids in [0, vocab_size): 0 = padding, 1 = BOS, bytes + 2.
      segment_ids: int32 [B, Lt] caption (packed sample) of each token, 0 = padding; each
        caption's tokens are contiguous.

    Returns:
      [B, Lt, width] per-token features in the compute dtype (values at padding are
      meaningless; they are masked out downstream).
    """
    x = with_logical_constraint(self.embed(tokens), ACT_EMBED)
    angles = rope_angles(
      segment_positions(segment_ids), self.width // self.num_heads, self.rope_theta)
    # Bidirectional within a caption: every token has frame 0.
    mask = MaskInfo.self_attention(segment_ids, jnp.zeros_like(segment_ids))
    for block in self.blocks:
      x = block(x, angles, mask)
    return self.norm(x)
