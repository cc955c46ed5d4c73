"""The blocks of the MM-DiT: one stream with adaLN-Zero, the joint text/video block, the
single-stream block, the output.

Pyramidal Flow (Jin et al., ICLR 2025) Sec. 4.1 and Appendix B, on the MM-DiT of SD3-Medium
(Esser et al., 2024): text and video keep separate weights and meet in one joint attention over
[text; video] in every block; each stream is modulated per token with adaLN-Zero (shift, scale,
gate; modulation initialised to zero so every block starts as the identity). FLUX (Black Forest
Labs, 2024; Pyramid Flow's miniFLUX) follows its joint blocks with single-stream blocks over
[text; video] with one set of weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pfm.models.attention import QKV, attention_output
from pfm.models.axes import ACT_EMBED, ACT_MODULATION
from pfm.models.embeddings import apply_rope
from pfm.models.kernels import dot_product_attention
from pfm.models.layers import Mlp, layer_norm_no_affine, linear, linear_general, zeros
from pfm.models.masks import MaskInfo
from pfm.models.partitioning import with_logical_constraint
from pfm.models.presets import MMDiTConfig


class StreamBlock(nnx.Module):
  """One stream (text or video) of a joint block: adaLN-Zero, QKV, output projection, MLP.

  With `pre_only` (the text stream of the last block, as in SD3) only the modulated QKV is
  kept, since the text output of the last block is never used.
  """

  def __init__(self, config: MMDiTConfig, *, pre_only: bool = False, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width = config.width
    self.pre_only = pre_only
    self.epsilon = config.norm_epsilon
    # (shift, scale) for attention, plus (gate) and (shift, scale, gate) for the MLP.
    n_mod = 2 if pre_only else 6
    self.modulation = linear_general(
      width, (n_mod, width), ("embed", None, "mlp"), kernel_init=zeros, **kw)
    self.qkv = QKV(width, config.num_heads, epsilon=config.qk_norm_epsilon, **kw)
    if not pre_only:
      self.out = attention_output(width, config.num_heads, **kw)
      self.mlp = Mlp(width, int(width * config.mlp_ratio), **kw)

  def modulate(self, c: jax.Array) -> jax.Array:
    """c: [B, L, D] conditioning -> [B, L, n_mod, D] modulation parameters."""
    return with_logical_constraint(self.modulation(jax.nn.silu(c)), ACT_MODULATION)

  def pre_attention(
    self, x: jax.Array, mod: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: [B, L, D] -> q, k, v [B, L, H, Dh] of LN(x) * (1 + scale) + shift."""
    h = layer_norm_no_affine(x, self.epsilon) * (1 + mod[:, :, 1]) + mod[:, :, 0]
    return self.qkv(h)

  def post_attention(self, x: jax.Array, a: jax.Array, mod: jax.Array) -> jax.Array:
    """Gated residual updates: x += g1 * Out(a); x += g2 * MLP(LN(x) * (1 + s2) + b2)."""
    x = x + mod[:, :, 2] * self.out(a)
    h = layer_norm_no_affine(x, self.epsilon) * (1 + mod[:, :, 4]) + mod[:, :, 3]
    x = x + mod[:, :, 5] * self.mlp(h)
    return with_logical_constraint(x, ACT_EMBED)


class JointBlock(nnx.Module):
  """MM-DiT block: separate text/video weights, one joint attention over [text; video]."""

  def __init__(self, config: MMDiTConfig, *, text_pre_only: bool = False, rngs: nnx.Rngs):
    self.attention_backend = config.attention_backend
    self.text = StreamBlock(config, pre_only=text_pre_only, rngs=rngs)
    self.video = StreamBlock(config, rngs=rngs)

  def __call__(
    self,
    x_text: jax.Array,
    c_text: jax.Array,
    x_video: jax.Array,
    c_video: jax.Array,
    angles: jax.Array,
    mask: MaskInfo,
  ) -> tuple[jax.Array, jax.Array]:
    """One joint block.

    Args:
      x_text: [B, Lt, D] text stream; c_text: [B, Lt, D] its per-token conditioning.
      x_video: [B, L, D] video stream; c_video: [B, L, D] its per-token conditioning.
      angles: float32 [B, Lt + L, Dh / 2] RoPE angles of [text; video].
      mask: metadata of [text; video] (queries and keys).

    Returns:
      (x_text, x_video, (k, v)): the updated streams (x_text unchanged by a pre-only text stream)
      and the RoPE'd keys and values of [text; video], which `decode` can reuse.
    """
    lt = x_text.shape[1]
    mod_t = self.text.modulate(c_text)
    mod_v = self.video.modulate(c_video)
    qt, kt, vt = self.text.pre_attention(x_text, mod_t)
    qv, kv, vv = self.video.pre_attention(x_video, mod_v)
    q = apply_rope(jnp.concatenate([qt, qv], axis=1), angles)
    k = apply_rope(jnp.concatenate([kt, kv], axis=1), angles)
    v = jnp.concatenate([vt, vv], axis=1)
    a = dot_product_attention(q, k, v, mask, backend=self.attention_backend)
    x_video = self.video.post_attention(x_video, a[:, lt:], mod_v)
    if not self.text.pre_only:
      x_text = self.text.post_attention(x_text, a[:, :lt], mod_t)
    return x_text, x_video, (k, v)

  def decode(
    self,
    x_video: jax.Array,
    c_video: jax.Array,
    angles: jax.Array,
    mask: MaskInfo,
    context_kv: tuple[jax.Array, jax.Array],
  ) -> jax.Array:
    """The video stream of new tokens attending to cached context keys/values and themselves.

    Args:
      x_video, c_video: [B, L, D] new video tokens and their conditioning.
      angles: [B, L, Dh / 2] RoPE angles of the new tokens.
      mask: queries = new tokens; keys = [context; new tokens].
      context_kv: ([B, Lc, H, Dh], [B, Lc, H, Dh]) keys (RoPE applied) and values of the context.
    """
    mod_v = self.video.modulate(c_video)
    qv, kv, vv = self.video.pre_attention(x_video, mod_v)
    k = jnp.concatenate([context_kv[0], apply_rope(kv, angles)], axis=1)
    v = jnp.concatenate([context_kv[1], vv], axis=1)
    a = dot_product_attention(
      apply_rope(qv, angles), k, v, mask, backend=self.attention_backend)
    return self.video.post_attention(x_video, a, mod_v)


class SingleBlock(nnx.Module):
  """FLUX's single-stream block over [text; video]: one modulated LayerNorm feeds attention and
  the MLP in parallel, and one projection of both outputs is the gated residual update:

      h = LN(x) (1 + scale) + shift,   x += gate * (Out(Attention(QKV(h))) + W2 GELU(W1 h)).

  FLUX keeps one Linear over the concatenation [attention; MLP hidden]; it is stored here as its
  two column blocks, `attention_out` (heads, kv -> embed) and `mlp.fc2` (mlp -> embed, with the
  bias), so tensor parallelism shards each like the joint blocks' projections.
  """

  def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width = config.width
    self.attention_backend = config.attention_backend
    self.epsilon = config.norm_epsilon
    self.modulation = linear_general(
      width, (3, width), ("embed", None, "mlp"), kernel_init=zeros, **kw)  # shift, scale, gate
    self.qkv = QKV(width, config.num_heads, epsilon=config.qk_norm_epsilon, **kw)
    self.attention_out = attention_output(width, config.num_heads, use_bias=False, **kw)
    self.mlp = Mlp(width, int(width * config.mlp_ratio), **kw)

  def __call__(self, x: jax.Array, c: jax.Array, angles: jax.Array, mask: MaskInfo) -> jax.Array:
    """x, c: [B, L, D] the joint stream [text; video] and its conditioning; angles: float32
    [B, L, Dh / 2]; mask: metadata of the joint stream. Returns the updated x [B, L, D]."""
    mod = with_logical_constraint(self.modulation(jax.nn.silu(c)), ACT_MODULATION)
    h = layer_norm_no_affine(x, self.epsilon) * (1 + mod[:, :, 1]) + mod[:, :, 0]
    q, k, v = self.qkv(h)
    a = dot_product_attention(apply_rope(q, angles), apply_rope(k, angles), v, mask,
                              backend=self.attention_backend)
    x = x + mod[:, :, 2] * (self.attention_out(a) + self.mlp(h))
    return with_logical_constraint(x, ACT_EMBED)


class FinalLayer(nnx.Module):
  """adaLN-modulated LayerNorm and a zero-initialised Linear to the output features.

  ``config.output_dim`` features per token: the patch, or the overlapping window of
  ``output_head="overlap"`` (blended into patches by `pfm.models.overlap.overlap_add`).

  Computed in float32 whatever the model's compute dtype: it is one small matmul per token, and
  the velocity it produces is regressed directly.
  """

  def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.float32, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    self.epsilon = config.norm_epsilon
    self.modulation = linear_general(
      config.width, (2, config.width), ("embed", None, "mlp"), kernel_init=zeros, **kw)
    self.linear = linear(
      config.width, config.output_dim, ("embed", None), kernel_init=zeros, **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """x, c: [B, L, D] any float dtype -> float32 [B, L, output_dim]."""
    x, c = x.astype(jnp.float32), c.astype(jnp.float32)
    mod = self.modulation(jax.nn.silu(c))
    h = layer_norm_no_affine(x, self.epsilon) * (1 + mod[:, :, 1]) + mod[:, :, 0]
    return self.linear(h)
