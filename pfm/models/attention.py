"""Attention masks from token metadata, attention backends, and the QKV projection.

The mask is built in one place from per-token metadata (Pyramidal Flow Sec. 3.4, blockwise
causal attention over packed samples): a query attends to a key iff

    segment(q) == segment(k) != 0   and   frame(k) <= frame(q).

Text tokens are given frame -1, so text sees only its own segment's text, and a video token sees
its segment's text plus its own and earlier frame units, never later ones. Padding (segment 0)
attends to nothing and is attended by nothing.

Every backend consumes the same description, `MaskInfo` (the four metadata arrays), not a dense
mask: the `"xla"` backend materialises it with `make_attention_mask`; a block-sparse kernel
(cuDNN, Pallas splash) can derive its block structure from the same arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from pfm.models.layers import linear_general, rms_norm
from pfm.models.partitioning import with_logical_constraint

TEXT_FRAME = -1  # Frame index given to text tokens in joint attention.
_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def make_attention_mask(
  q_segment_ids: jax.Array,
  q_frames: jax.Array,
  kv_segment_ids: jax.Array,
  kv_frames: jax.Array,
) -> jax.Array:
  """Blockwise-causal, segment-restricted attention mask.

  Args:
    q_segment_ids: int [B, Lq] packed-sample id of each query, 0 = padding.
    q_frames: int [B, Lq] frame unit of each query (-1 for text tokens).
    kv_segment_ids: int [B, Lk] packed-sample id of each key, 0 = padding.
    kv_frames: int [B, Lk] frame unit of each key (-1 for text tokens).

  Returns:
    bool [B, 1, Lq, Lk]: True where the query may attend to the key, i.e. both are in the same
    non-zero segment and frame(key) <= frame(query).
  """
  same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  valid = (q_segment_ids[:, :, None] != 0) & (kv_segment_ids[:, None, :] != 0)
  causal = kv_frames[:, None, :] <= q_frames[:, :, None]
  return (same_segment & valid & causal)[:, None]


@struct.dataclass
class MaskInfo:
  """Token metadata that defines the attention mask; the one mask description of all backends.

  Attributes:
    q_segment_ids: int32 [B, Lq], 0 = padding.
    q_frames: int32 [B, Lq], -1 for text tokens.
    kv_segment_ids: int32 [B, Lk], 0 = padding.
    kv_frames: int32 [B, Lk], -1 for text tokens.
  """

  q_segment_ids: jax.Array
  q_frames: jax.Array
  kv_segment_ids: jax.Array
  kv_frames: jax.Array

  @classmethod
  def self_attention(cls, segment_ids: jax.Array, frames: jax.Array) -> MaskInfo:
    """Queries and keys are the same tokens: [B, L] segment ids and frames."""
    return cls(segment_ids, frames, segment_ids, frames)

  def dense(self) -> jax.Array:
    """bool [B, 1, Lq, Lk], see `make_attention_mask`."""
    return make_attention_mask(
      self.q_segment_ids, self.q_frames, self.kv_segment_ids, self.kv_frames)


def xla_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskInfo, *, scale: float
) -> jax.Array:
  """Plain einsum attention with a dense mask; logits and softmax in float32.

  Fully masked query rows (padding) give exactly zero output, never NaN, in value and gradient.

  Args:
    q: [B, Lq, H, D] queries, compute dtype.
    k: [B, Lk, H, D] keys.
    v: [B, Lk, H, D] values.
    mask: the token metadata of queries and keys.
    scale: logit scale, usually D ** -0.5.

  Returns:
    [B, Lq, H, D] in v's dtype.
  """
  logits = jnp.einsum(
    "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  allowed = mask.dense()
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(allowed, probs, 0.0)  # Zeroes fully masked rows.
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


AttentionFn = Callable[..., jax.Array]
# Backend name -> fn(q, k, v, mask: MaskInfo, *, scale) -> [B, Lq, H, D].
ATTENTION_BACKENDS: dict[str, AttentionFn] = {"xla": xla_attention}


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: MaskInfo,
  *,
  backend: str = "xla",
  scale: float | None = None,
) -> jax.Array:
  """Masked multi-head attention through the backend named `backend`.

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, H, D], compute dtype.
    mask: token metadata defining the mask (see `make_attention_mask`).
    backend: a key of `ATTENTION_BACKENDS`.
    scale: logit scale, default D ** -0.5.

  Returns:
    [B, Lq, H, D]; rows of fully masked queries are zero.

  Raises:
    ValueError: for an unknown backend.
  """
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(
      f"Unknown attention backend {backend!r}; known: {sorted(ATTENTION_BACKENDS)}.")
  if scale is None:
    scale = q.shape[-1] ** -0.5
  return ATTENTION_BACKENDS[backend](q, k, v, mask, scale=scale)


class QKV(nnx.Module):
  """Query/key/value projections [B, L, D] -> 3 x [B, L, H, Dh] with RMS QK-normalisation.

  QK normalisation (RMSNorm over each head's features, learned scale) as in SD3 (Esser et al.,
  2024) keeps attention logits bounded at scale.
  """

  def __init__(
    self,
    width: int,
    num_heads: int,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
    head_dim = width // num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    names = ("embed", "heads", "kv")
    self.q = linear_general(width, (num_heads, head_dim), names, **kw)
    self.k = linear_general(width, (num_heads, head_dim), names, **kw)
    self.v = linear_general(width, (num_heads, head_dim), names, **kw)
    self.q_norm = rms_norm(head_dim, **kw)
    self.k_norm = rms_norm(head_dim, **kw)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, L, D] -> (q, k, v), each [B, L, H, Dh] in the compute dtype."""
    q = with_logical_constraint(self.q_norm(self.q(x)), _HEADS)
    k = with_logical_constraint(self.k_norm(self.k(x)), _HEADS)
    v = with_logical_constraint(self.v(x), _HEADS)
    return q, k, v


def attention_output(
  width: int,
  num_heads: int,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  kernel_init: Callable[..., Any] | None = None,
  rngs: nnx.Rngs,
) -> nnx.LinearGeneral:
  """Output projection [B, L, H, Dh] -> [B, L, D] (kernel named heads, kv, embed)."""
  kw = {} if kernel_init is None else dict(kernel_init=kernel_init)
  return linear_general(
    (num_heads, width // num_heads), width, ("heads", "kv", "embed"), axis=(-2, -1),
    dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)
