"""MM-DiT over a packed token batch (Pyramidal Flow, Sec. 4.1 and Appendix B; SD3-Medium).

Two streams, text and video, with separate weights and one joint attention over the
concatenation [text; video] in every block (Esser et al., 2024). Conditioning is per token:
every token, text or video, carries its own noise level t (history tokens and the current unit
of each packed sample differ), and its own segment's pooled caption embedding:

    c = MLP(sinusoidal(t * 1000)) + MLP(pooled text of the token's segment).

Each block modulates both streams with adaLN-Zero (shift, scale, gate per token, modulation
initialised to zero so every block starts as the identity). Spatial positions enter as a 2-D
sinusoidal embedding added at the input; the temporal index enters as a 1-D RoPE in attention
(text at position 0). The mask is blockwise causal over frame units within each packed sample
(Sec. 3.4); see `pfm.models.attention`.

Depth and memory: with `MMDiTConfig.scan_layers` the first depth - 1 (identical) blocks are
stored stacked and run in one `jax.lax.scan`, so the traced program and compile time do not grow
with depth; `MMDiTConfig.remat_policy` recomputes each block's activations in the backward pass
(`jax.checkpoint`). With `dtype="bfloat16"` matmuls and activations are bfloat16 while
parameters, normalisation statistics, attention logits/softmax, RoPE angles and the final layer
stay float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pfm.models import attention
from pfm.models.embeddings import (
  MLPEmbedder, TimestepEmbedder, apply_rope, rope_angles, spatial_position_embedding)
from pfm.models.layers import Mlp, layer_norm_no_affine, linear, linear_general, zeros
from pfm.models.partitioning import with_logical_constraint
from pfm.models.text import TEXT_VOCAB_SIZE, ByteTextEncoder, segment_mean

_ACT = ("activation_batch", "activation_length", "activation_embed")
_MOD = ("activation_batch", "activation_length", None, "activation_embed")

# Logical name of the leading axis of stacked (scanned) block parameters.
LAYER_AXIS = "layers"

# Checkpoint policies of `MMDiTConfig.remat_policy` (see its docstring); "none" is no remat.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "dots_all": jax.checkpoint_policies.dots_saveable,
}
REMAT_POLICY_NAMES = ("none", *REMAT_POLICIES)


def remat_policy(name: str) -> Callable[..., bool] | None:
  """The `jax.checkpoint` policy named `name` (a key of `REMAT_POLICIES`), None for "none".

  Raises:
    ValueError: for a name outside `REMAT_POLICY_NAMES`.
  """
  if name == "none":
    return None
  if name not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {name!r}; known: {list(REMAT_POLICY_NAMES)}.")
  return REMAT_POLICIES[name]


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Hyper-parameters of `MMDiT`; presets by name in `VARIANTS` / `model_config`.

  Attributes:
    patch_size: spatial patch side p of the (already patchified) video tokens.
    channels: channels per pixel; a video token has patch_dim = p * p * channels features.
    width: model width D of both streams.
    depth: number of joint blocks.
    num_heads: attention heads (head size width / num_heads, even).
    mlp_ratio: MLP hidden size / width.
    text_width: width of the byte-level text encoder (and of projected precomputed embeddings).
    text_depth: layers of the byte-level text encoder; 0 builds none (then `text_embed_dim` must
      be set and captions come as precomputed embeddings).
    text_heads: heads of the text encoder.
    text_mlp_ratio: MLP ratio of the text encoder.
    text_vocab_size: caption vocabulary (bytes + 2 specials = 258).
    text_embed_dim: feature size of precomputed caption embeddings from a frozen encoder, or
      None to disable that input.
    time_frequency_dim: sinusoidal features of the noise level.
    time_scale: t in [0, 1] is embedded as sinusoidal(t * time_scale).
    position_max_period: longest wavelength of the spatial sinusoidal embedding, patch units.
    rope_theta: base of the temporal RoPE.
    norm_epsilon: epsilon of the adaLN LayerNorms.
    dtype: compute dtype name, e.g. "float32" or "bfloat16": the dtype of matmuls and of the
      activations between them. Normalisation statistics, attention logits and softmax, RoPE and
      sinusoidal angles, and the final layer (hence the output) are float32 whatever it is.
    param_dtype: parameter dtype name (keep "float32" for bfloat16 mixed precision: parameters,
      their gradients and optimizer state stay float32).
    attention_backend: key of `pfm.models.attention.ATTENTION_BACKENDS`.
    text_time_conditioning: modulate the text stream with the segment's current noise level
      (SD3). With False a caption is conditioned on its own level, clean (t = 1), so caption and
      history tokens do not depend on the sampling time and their keys/values can be computed
      once per stage (`MMDiT.encode_context` / `MMDiT.decode`).
    scan_layers: store the first depth - 1 joint blocks stacked, every parameter with a leading
      axis of size depth - 1 named `LAYER_AXIS` ("layers"), and run them with one
      `jax.lax.scan`, so trace and compile time do not grow with depth. The last block (its text
      stream is pre-only) stays separate. Parameter paths change: `blocks/<i>/...` becomes
      `blocks/...` (stacked, blocks 0..depth-2) and `last_block/...`; `stack_layers` /
      `unstack_layers` convert between the layouts. Outputs are those of the unstacked model
      with the same parameters (the initial values drawn from one seed differ between layouts).
    remat_policy: gradient checkpointing of every joint block (`jax.checkpoint`), by name:
      "none": no checkpointing, the backward pass reads every saved activation;
      "full": save only each block's inputs and recompute the whole block in the backward pass
      (least memory, about one extra forward of the blocks);
      "dots": save the outputs of matmuls without batch dimensions (the QKV, output, MLP and
      modulation projections) and recompute the rest (norms, activations, attention);
      "dots_all": save every matmul output, the float32 attention logits [B, H, Lq, Lk] and the
      attention-weighted values included (more memory than "dots", less recomputation).
      Values and gradients do not depend on the policy. Unknown names raise ValueError when the
      model is built.
  """

  patch_size: int = 2
  channels: int = 3
  width: int = 64
  depth: int = 2
  num_heads: int = 2
  mlp_ratio: float = 4.0
  text_width: int = 32
  text_depth: int = 1
  text_heads: int = 2
  text_mlp_ratio: float = 4.0
  text_vocab_size: int = TEXT_VOCAB_SIZE
  text_embed_dim: int | None = None
  time_frequency_dim: int = 256
  time_scale: float = 1000.0
  position_max_period: float = 10_000.0
  rope_theta: float = 10_000.0
  norm_epsilon: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_backend: str = "xla"
  text_time_conditioning: bool = True
  scan_layers: bool = False
  remat_policy: str = "none"

  @property
  def patch_dim(self) -> int:
    """P = patch_size^2 * channels, the feature size of a video token."""
    return self.patch_size * self.patch_size * self.channels

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


# Size presets. "2B" is the paper's model: SD3-Medium's MM-DiT, 24 layers, width 1536, 24 heads.
VARIANTS: dict[str, dict[str, Any]] = {
  "smoke": dict(width=64, depth=2, num_heads=2, text_width=32, text_depth=1, text_heads=2),
  "XS": dict(width=128, depth=4, num_heads=2, text_width=128, text_depth=1, text_heads=2),
  "S": dict(width=256, depth=6, num_heads=4, text_width=256, text_depth=2, text_heads=4),
  "B": dict(width=512, depth=12, num_heads=8, text_width=256, text_depth=4, text_heads=4),
  "L": dict(width=1024, depth=16, num_heads=16, text_width=512, text_depth=6, text_heads=8),
  "2B": dict(width=1536, depth=24, num_heads=24, text_width=768, text_depth=12, text_heads=12),
}


def model_config(variant: str = "smoke", **overrides: Any) -> MMDiTConfig:
  """The preset `variant` (a key of `VARIANTS`) with field overrides.

  Raises:
    ValueError: for an unknown variant. TypeError: for an unknown field.
  """
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; known: {list(VARIANTS)}.")
  return MMDiTConfig(**{**VARIANTS[variant], **overrides})


@struct.dataclass
class ContextCache:
  """Per-block keys/values of context tokens (captions + clean history) and their metadata.

  Attributes:
    kv: per unstacked block, in order, (keys [B, Lc, H, Dh] with RoPE applied, values
      [B, Lc, H, Dh]): every block, or with `scan_layers` only the last one.
    segment_ids, frames: int32 [B, Lc] mask metadata of the context ([text; history]).
    pooled_text: [B, Lt, D] pooled caption embedding at each text token.
    text_segment_ids: int32 [B, Lt].
    stacked_kv: with `scan_layers` and depth > 1, (keys, values) of the stacked blocks
      0..depth-2, each [depth - 1, B, Lc, H, Dh]; otherwise None. They precede `kv`.
  """

  kv: tuple[tuple[jax.Array, jax.Array], ...]
  segment_ids: jax.Array
  frames: jax.Array
  pooled_text: jax.Array
  text_segment_ids: jax.Array
  stacked_kv: tuple[jax.Array, jax.Array] | None = None


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
    self.qkv = attention.QKV(width, config.num_heads, **kw)
    if not pre_only:
      self.out = attention.attention_output(width, config.num_heads, **kw)
      self.mlp = Mlp(width, int(width * config.mlp_ratio), **kw)

  def modulate(self, c: jax.Array) -> jax.Array:
    """c: [B, L, D] conditioning -> [B, L, n_mod, D] modulation parameters."""
    return with_logical_constraint(self.modulation(jax.nn.silu(c)), _MOD)

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
    return with_logical_constraint(x, _ACT)


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
    mask: attention.MaskInfo,
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
    a = attention.dot_product_attention(q, k, v, mask, backend=self.attention_backend)
    x_video = self.video.post_attention(x_video, a[:, lt:], mod_v)
    if not self.text.pre_only:
      x_text = self.text.post_attention(x_text, a[:, :lt], mod_t)
    return x_text, x_video, (k, v)

  def decode(
    self,
    x_video: jax.Array,
    c_video: jax.Array,
    angles: jax.Array,
    mask: attention.MaskInfo,
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
    a = attention.dot_product_attention(
      apply_rope(qv, angles), k, v, mask, backend=self.attention_backend)
    return self.video.post_attention(x_video, a, mod_v)


# -- stacked (scanned) blocks ----------------------------------------------------------------------
# Initialisation uses NNX's lifted vmap, whose `transform_metadata` (applied by the graph-mode
# transforms only, hence graph=True, graph_updates=True) names the stacked axis. The forward pass
# uses plain `jax.lax.scan` / `jax.checkpoint` over the blocks' split state instead of the lifted
# transforms: those refuse modules whose arrays come from an enclosing trace, which is how the
# sampler calls the model (merged under `jax.jit`, run inside a `fori_loop`). Blocks hold no
# mutable state, so nothing has to be written back.
_GRAPH = {"graph": True, "graph_updates": True}


def _stacked_blocks(config: MMDiTConfig, num: int, rngs: nnx.Rngs) -> JointBlock:
  """`num` full (not pre-only) joint blocks as one module, parameters stacked on axis 0.

  Every block draws its own parameters (the RNG streams are split `num` ways); each parameter's
  logical names gain `LAYER_AXIS` in front.
  """

  @nnx.split_rngs(splits=num, **_GRAPH)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num,
            transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS}, **_GRAPH)
  def create(rngs: nnx.Rngs) -> JointBlock:
    return JointBlock(config, rngs=rngs)

  return create(rngs)


def _drop_layer_axis(state: nnx.State) -> nnx.State:
  """One layer's slice of stacked block state: `LAYER_AXIS` removed from the logical names."""

  def drop(v):
    names = v.get_metadata().get("out_sharding")
    if names and names[0] == LAYER_AXIS:
      return v.copy(out_sharding=tuple(names[1:]))
    return v

  return jax.tree.map(drop, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _block_fn(graphdef: nnx.GraphDef, policy: str, *, prevent_cse: bool):
  """fn(block_state, *args) = block(*args), under `jax.checkpoint` unless policy is "none"."""

  def fn(state, *args):
    return nnx.merge(graphdef, state)(*args)

  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=remat_policy(policy), prevent_cse=prevent_cse)


def _call_block(block: JointBlock, x_text, c_text, x_video, c_video, angles, mask, *,
                remat: str):
  """`block(...)` (see `JointBlock.__call__`), rematerialised with the named policy."""
  if remat == "none":
    return block(x_text, c_text, x_video, c_video, angles, mask)
  graphdef, state = nnx.split(block)
  fn = _block_fn(graphdef, remat, prevent_cse=True)
  return fn(state, x_text, c_text, x_video, c_video, angles, mask)


def _scan_blocks(blocks, x_text, c_text, x_video, c_video, angles, mask, *, remat: str,
                 collect_kv: bool):
  """Runs stacked joint blocks in order with `jax.lax.scan` (see `JointBlock.__call__`).

  Returns:
    (x_text, x_video, stacked_kv): the streams after the last stacked block, and with
    `collect_kv` the keys/values of every stacked block, each [n, B, Lt + L, H, Dh]
    (else None).
  """
  graphdef, state = nnx.split(blocks)
  # The scan already keeps the recomputation apart from the forward pass: no CSE barrier needed.
  fn = _block_fn(graphdef, remat, prevent_cse=False)

  def body(carry, layer_state):
    x_text, x_video = carry
    x_text, x_video, kv = fn(
      _drop_layer_axis(layer_state), x_text, c_text, x_video, c_video, angles, mask)
    return (x_text, x_video), (kv if collect_kv else None)

  (x_text, x_video), stacked_kv = jax.lax.scan(body, (x_text, x_video), state)
  return x_text, x_video, stacked_kv


def _scan_decode(blocks, x_video, c_video, angles, mask, stacked_kv):
  """`JointBlock.decode` of stacked blocks in order; stacked_kv: ([n, B, Lc, H, Dh],) * 2."""
  graphdef, state = nnx.split(blocks)

  def body(x_video, xs):
    layer_state, kv = xs
    block = nnx.merge(graphdef, _drop_layer_axis(layer_state))
    return block.decode(x_video, c_video, angles, mask, kv), None

  x_video, _ = jax.lax.scan(body, x_video, (state, stacked_kv))
  return x_video


def _child(tree: Mapping[Any, Any], index: int) -> Any:
  """tree[index], also when a restored checkpoint spells the integer key as a string."""
  return tree[index] if index in tree else tree[str(index)]


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Parameters of an unstacked `MMDiT` in the layout of `scan_layers=True`.

  Args:
    params: nested mapping of arrays laid out as `nnx.to_pure_dict(nnx.state(model, nnx.Param))`
      of a model with `scan_layers=False` (top-level "blocks" with keys 0..depth-1, ints or
      their strings); any pytree of params-shaped leaves per block (e.g. optimizer moments)
      works the same.

  Returns:
    the same tree with "blocks" replaced by "blocks" = blocks 0..depth-2 stacked on a new leading
    axis (absent for depth 1) and "last_block" = block depth-1. Load it into a model with
    `nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), stacked)` then `nnx.update`.
  """
  blocks = params["blocks"]
  depth = len(blocks)
  out = {k: v for k, v in params.items() if k != "blocks"}
  if depth > 1:
    out["blocks"] = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[_child(blocks, i) for i in range(depth - 1)])
  out["last_block"] = _child(blocks, depth - 1)
  return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `stack_layers`: scan-layout parameters -> "blocks" with keys 0..depth-1."""
  out = {k: v for k, v in params.items() if k not in ("blocks", "last_block")}
  stacked = params.get("blocks")
  blocks = {}
  if stacked is not None:
    num = jax.tree.leaves(stacked)[0].shape[0]
    blocks = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num)}
  blocks[len(blocks)] = params["last_block"]
  out["blocks"] = blocks
  return out


class FinalLayer(nnx.Module):
  """adaLN-modulated LayerNorm and a zero-initialised Linear to the patch features.

  Computed in float32 whatever the model's compute dtype: it is one small matmul per token, and
  the velocity it produces is regressed directly.
  """

  def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.float32, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    self.epsilon = config.norm_epsilon
    self.modulation = linear_general(
      config.width, (2, config.width), ("embed", None, "mlp"), kernel_init=zeros, **kw)
    self.linear = linear(
      config.width, config.patch_dim, ("embed", None), kernel_init=zeros, **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """x, c: [B, L, D] any float dtype -> float32 [B, L, patch_dim]."""
    x, c = x.astype(jnp.float32), c.astype(jnp.float32)
    mod = self.modulation(jax.nn.silu(c))
    h = layer_norm_no_affine(x, self.epsilon) * (1 + mod[:, :, 1]) + mod[:, :, 0]
    return self.linear(h)


class MMDiT(nnx.Module):
  """The pyramidal-flow MM-DiT: packed video tokens + captions -> velocity per video token.

  Source: Pyramidal Flow (Jin et al., ICLR 2025) Sec. 4.1 and Appendix B, on the MM-DiT of
  SD3-Medium (Esser et al., 2024); blockwise causal attention of Sec. 3.4.

  Joint blocks: `blocks`, an `nnx.List` of `depth` `JointBlock`s (the last one's text stream
  pre-only); with `config.scan_layers`, `blocks` is one `JointBlock` holding blocks 0..depth-2
  stacked on a leading "layers" axis (None for depth 1) and `last_block` the last block.

  Raises:
    ValueError: on inconsistent sizes, no text input, depth < 1 or an unknown remat_policy.
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
    remat_policy(config.remat_policy)  # Validates the name.
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width = config.width

    self.patch_embed = linear(config.patch_dim, width, (None, "embed"), **kw)
    self.time_embed = TimestepEmbedder(
      width, frequency_dim=config.time_frequency_dim, time_scale=config.time_scale, **kw)
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
    self.context_embed = linear(config.text_width, width, (None, "embed"), **kw)
    self.pooled_text_embed = MLPEmbedder(config.text_width, width, **kw)
    if config.scan_layers:
      self.blocks = _stacked_blocks(config, config.depth - 1, rngs) if config.depth > 1 else None
      self.last_block = JointBlock(config, text_pre_only=True, rngs=rngs)
    else:
      self.blocks = nnx.List([
        JointBlock(config, text_pre_only=(i == config.depth - 1), rngs=rngs)
        for i in range(config.depth)
      ])
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

  def __call__(
    self,
    video_tokens: jax.Array,
    video_t: jax.Array,
    video_segment_ids: jax.Array,
    frame_index: jax.Array,
    positions: jax.Array,
    text_tokens: jax.Array | None = None,
    text_segment_ids: jax.Array | None = None,
    text_t: jax.Array | None = None,
    *,
    text_embeddings: jax.Array | None = None,
    temporal_positions: jax.Array | None = None,
  ) -> jax.Array:
    """Predicts the velocity of every video token of a packed batch.

    Args:
      video_tokens: float [B, L, P] patchified noisy video tokens, P = config.patch_dim.
      video_t: float32 [B, L] each token's noise level in [0, 1] (0 = noise, 1 = data).
      video_segment_ids: int32 [B, L] packed sample id 1..S, 0 = padding.
      frame_index: int32 [B, L] the token's frame unit (0 = first): the blockwise causal mask
        lets a token see its own and earlier units. A whole clip generated at once
        (full-sequence mode) is one unit: bidirectional attention over its frames.
      positions: float32 [B, L, 2] (row, col) in patch units, fractional allowed.
      text_tokens: int32 [B, Lt] caption bytes + 2, 1 = BOS, 0 = padding.
      text_segment_ids: int32 [B, Lt] segment of each text token, 0 = padding. Required.
      text_t: float32 [B, Lt] noise level of the segment's current unit. Required.
      text_embeddings: float [B, Lt, config.text_embed_dim] precomputed caption embeddings,
        instead of text_tokens.
      temporal_positions: float32 [B, L] temporal RoPE position of each token in full-rate
        frames (TPDiff Eq. 14, stage-consistent); default ``frame_index``.

    Returns:
      float32 [B, L, P] velocity prediction; exactly zero at padding tokens.

    Raises:
      ValueError: if text_segment_ids or text_t is missing, or on a text input mismatch.
    """
    _, x_video, c_video = self._forward(
      video_tokens, video_t, video_segment_ids, frame_index, positions, text_tokens,
      text_segment_ids, text_t, text_embeddings, temporal_positions, collect_kv=False)
    return self._output(x_video, c_video, video_segment_ids)

  def encode_context(
    self,
    video_tokens: jax.Array,
    video_t: jax.Array,
    video_segment_ids: jax.Array,
    frame_index: jax.Array,
    positions: jax.Array,
    text_tokens: jax.Array | None = None,
    text_segment_ids: jax.Array | None = None,
    text_t: jax.Array | None = None,
    *,
    text_embeddings: jax.Array | None = None,
    temporal_positions: jax.Array | None = None,
  ) -> ContextCache:
    """Keys/values of tokens that later frame units only read: captions and clean history.

    Blockwise causality makes this exact: neither captions (frame -1) nor earlier frame units
    attend to a later unit, so their activations in every block are the same with or without the
    unit being generated. With ``text_time_conditioning=False`` they also do not depend on the
    sampling time, so one context serves every Euler step of a stage. Arguments as `__call__`,
    for the context tokens only (``video_*`` = the history, possibly empty or padded).

    Returns:
      a `ContextCache` for `decode`.
    """
    context, _, _ = self._forward(
      video_tokens, video_t, video_segment_ids, frame_index, positions, text_tokens,
      text_segment_ids, text_t, text_embeddings, temporal_positions, collect_kv=True)
    return context

  def decode(
    self,
    video_tokens: jax.Array,
    video_t: jax.Array,
    video_segment_ids: jax.Array,
    frame_index: jax.Array,
    positions: jax.Array,
    context: ContextCache,
    temporal_positions: jax.Array | None = None,
  ) -> jax.Array:
    """`__call__` for new video tokens that attend to a cached context and to themselves.

    Equals the output of `__call__` on [context; new tokens] at the new tokens, when the new
    tokens belong to frame units at or after every context frame. Shapes as `__call__`, for the
    new tokens only.
    """
    config = self.config
    x_video, c_video = self._embed_video(
      video_tokens, video_t, video_segment_ids, positions, context.pooled_text,
      context.text_segment_ids)
    mask = attention.MaskInfo(
      video_segment_ids, frame_index, jnp.concatenate([context.segment_ids, video_segment_ids], 1),
      jnp.concatenate([context.frames, frame_index], 1))
    angles = rope_angles(frame_index if temporal_positions is None else temporal_positions,
                         config.head_dim, config.rope_theta)
    if config.scan_layers:
      if self.blocks is not None:
        x_video = _scan_decode(self.blocks, x_video, c_video, angles, mask, context.stacked_kv)
      x_video = self.last_block.decode(x_video, c_video, angles, mask, context.kv[0])
    else:
      for block, kv in zip(self.blocks, context.kv):
        x_video = block.decode(x_video, c_video, angles, mask, kv)
    return self._output(x_video, c_video, video_segment_ids)

  # -- shared pieces ---------------------------------------------------------------------------

  def _embed_video(self, video_tokens, video_t, video_segment_ids, positions, pooled_text,
                   text_segment_ids):
    """Patch embedding + 2-D sinusoidal position; conditioning time + the segment's caption."""
    config = self.config
    x_video = self.patch_embed(video_tokens.astype(self.dtype)) + spatial_position_embedding(
      positions, config.width, config.position_max_period).astype(self.dtype)
    c_video = self.time_embed(video_t) + segment_mean(
      pooled_text, video_segment_ids, text_segment_ids)               # [B, L, D]
    return (with_logical_constraint(x_video, _ACT), with_logical_constraint(c_video, _ACT))

  def _forward(self, video_tokens, video_t, video_segment_ids, frame_index, positions,
               text_tokens, text_segment_ids, text_t, text_embeddings, temporal_positions=None,
               *, collect_kv: bool):
    """All blocks over [text; video] -> (ContextCache of every token, x_video, c_video).

    Without `collect_kv` the per-block keys/values are not kept (the cache holds none).
    """
    if text_segment_ids is None or text_t is None:
      raise ValueError("text_segment_ids and text_t are required.")
    config = self.config
    text = self.encode_text(text_tokens, text_segment_ids, text_embeddings)
    if not config.text_time_conditioning:
      text_t = jnp.ones_like(text_t)  # a caption is clean: its own noise level is t = 1

    # Per-token conditioning c = MLP(sin(t * 1000)) + MLP(pooled text of the token's segment).
    # The pooled MLP runs on text tokens; a video token then takes its segment's value.
    pooled = self.pooled_text_embed(
      segment_mean(text, text_segment_ids, text_segment_ids))        # [B, Lt, D]
    c_text = with_logical_constraint(self.time_embed(text_t) + pooled, _ACT)
    x_video, c_video = self._embed_video(
      video_tokens, video_t, video_segment_ids, positions, pooled, text_segment_ids)
    x_text = with_logical_constraint(self.context_embed(text), _ACT)

    # Joint sequence [text; video]: mask metadata (text at frame -1) and temporal RoPE angles
    # (text at position 0).
    segment_ids = jnp.concatenate([text_segment_ids, video_segment_ids], axis=1)
    frames = jnp.concatenate(
      [jnp.full_like(text_segment_ids, attention.TEXT_FRAME), frame_index], axis=1)
    mask = attention.MaskInfo.self_attention(segment_ids, frames)
    if temporal_positions is None:
      temporal_positions = frame_index
    angles = rope_angles(
      jnp.concatenate([jnp.zeros(text_segment_ids.shape, jnp.float32),
                       temporal_positions.astype(jnp.float32)], axis=1),
      config.head_dim, config.rope_theta)

    kv, stacked_kv = [], None
    if config.scan_layers:
      unstacked = [self.last_block]
      if self.blocks is not None:
        x_text, x_video, stacked_kv = _scan_blocks(
          self.blocks, x_text, c_text, x_video, c_video, angles, mask,
          remat=config.remat_policy, collect_kv=collect_kv)
    else:
      unstacked = list(self.blocks)
    for block in unstacked:
      x_text, x_video, block_kv = _call_block(
        block, x_text, c_text, x_video, c_video, angles, mask, remat=config.remat_policy)
      if collect_kv:
        kv.append(block_kv)
    context = ContextCache(kv=tuple(kv), segment_ids=segment_ids, frames=frames,
                           pooled_text=pooled, text_segment_ids=text_segment_ids,
                           stacked_kv=stacked_kv)
    return context, x_video, c_video

  def _output(self, x_video, c_video, video_segment_ids):
    out = self.final_layer(x_video, c_video).astype(jnp.float32)
    return jnp.where(video_segment_ids[..., None] != 0, out, 0.0)


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
