"""Position and noise-level embeddings of the MM-DiT.

Pyramidal Flow (Jin et al., ICLR 2025), Sec. 4.1: sinusoidal position encoding (Vaswani et al.,
2017) in the spatial dimensions and a 1-D rotary position embedding (RoPE, Su et al., 2024) on
the temporal dimension. The noise level t is embedded as in DiT/SD3: a sinusoidal feature of
t * 1000 followed by an MLP.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pfm.models.layers import linear


def sinusoidal_embedding(
  x: jax.Array, dim: int, max_period: float = 10_000.0
) -> jax.Array:
  """Sinusoidal features of a real-valued coordinate (Vaswani et al., 2017).

  Args:
    x: float [...] coordinates (any real value, fractional allowed).
    dim: even number of features.
    max_period: longest wavelength; frequencies are max_period^(-i / (dim / 2)).

  Returns:
    float32 [..., dim]: `[cos(x * f_i), sin(x * f_i)]` for dim / 2 frequencies f_i.

  Raises:
    ValueError: if dim is odd.
  """
  if dim % 2:
    raise ValueError(f"dim must be even, got {dim}.")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def spatial_position_embedding(
  positions: jax.Array, dim: int, max_period: float = 10_000.0
) -> jax.Array:
  """2-D sinusoidal embedding of (row, col) positions; Pyramidal Flow Sec. 4.1.

  Args:
    positions: float [..., 2] (row, col) in patch units; fractional positions (lower-resolution
      history placed on the current grid) are embedded exactly, not rounded.
    dim: output width, a multiple of 4 (half for rows, half for columns).
    max_period: see `sinusoidal_embedding`.

  Returns:
    float32 [..., dim].

  Raises:
    ValueError: if dim is not a multiple of 4.
  """
  if dim % 4:
    raise ValueError(f"dim must be a multiple of 4, got {dim}.")
  rows = sinusoidal_embedding(positions[..., 0], dim // 2, max_period)
  cols = sinusoidal_embedding(positions[..., 1], dim // 2, max_period)
  return jnp.concatenate([rows, cols], axis=-1)


def rope_angles(
  positions: jax.Array, head_dim: int, theta: float = 10_000.0
) -> jax.Array:
  """Rotation angles of a 1-D RoPE (Su et al., 2024); Pyramidal Flow Sec. 4.1.

  Args:
    positions: [B, L] temporal position of each token (frame index for video tokens, 0 for text
      tokens), int or float.
    head_dim: even attention head size.
    theta: RoPE base.

  Returns:
    float32 [B, L, head_dim / 2] angles `position * theta^(-2i / head_dim)`.
  """
  if head_dim % 2:
    raise ValueError(f"head_dim must be even, got {head_dim}.")
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  return positions.astype(jnp.float32)[..., None] * inv_freq


def rope_angles_axes(
  positions: jax.Array, axes_dims: tuple[int, ...], theta: float = 10_000.0
) -> jax.Array:
  """Angles of a RoPE over several position axes (FLUX's 3-axis RoPE; Pyramid Flow miniFLUX).

  Args:
    positions: [B, L, n] each token's position on n axes (e.g. frame, row, col), int or float.
    axes_dims: n even head-feature counts, one per axis, summing to the head size.
    theta: RoPE base, the same on every axis.

  Returns:
    float32 [B, L, sum(axes_dims) / 2]: the angles of axis 0 (`rope_angles` with head_dim
    axes_dims[0]), then of axis 1, and so on.

  Raises:
    ValueError: if the number of axes differs from positions' last axis, or an entry is odd.
  """
  if positions.shape[-1] != len(axes_dims):
    raise ValueError(f"{len(axes_dims)} RoPE axes {axes_dims} for positions with "
                     f"{positions.shape[-1]} axes.")
  return jnp.concatenate([rope_angles(positions[..., i], d, theta)
                          for i, d in enumerate(axes_dims)], axis=-1)


def table_position_embedding(
  positions: jax.Array, grid: jax.Array, dim: int, table_size: int, table_base: int
) -> jax.Array:
  """SD3's cropped sinusoid table, bilinearly resampled for lower-resolution units.

  Stable Diffusion 3 (Esser et al., 2024) adds a fixed 2-D sinusoidal table of
  ``table_size``^2 positions, centre-cropped to the token grid; Pyramid Flow's released models
  crop it to the current unit's grid and resize the crop bilinearly (``align_corners=False``) to
  a lower-resolution history unit's grid (``interp_condition_pos``). A history token at the
  centre-aligned fractional position ``p`` (`pfm.pyramid.tokens.grid_positions`) is exactly the
  sample point of that resize, so its embedding is the linear blend of the table rows
  ``floor(p)`` and ``floor(p) + 1`` (clamped to the crop); blending sinusoids is not the
  sinusoid of the blended position, which is why this differs from "sincos".

  The table's entry at (row i, col j) is ``[S(j / r), S(i / r)]`` (columns first), with
  ``r = table_size / table_base`` and ``S(x) = [sin(x w_k), cos(x w_k)]``,
  ``w_k = 10000^(-k / (dim / 4))``, k < dim / 4.

  Args:
    positions: float [B, L, 2] (row, col) on the current unit's grid, patch units.
    grid: [B, L, 2] (rows, cols) of the current unit's token grid at each token.
    dim: output width, a multiple of 4.
    table_size: side of the table (SD3's ``pos_embed_max_size``).
    table_base: SD3's ``base_size``.

  Returns:
    float32 [B, L, dim].

  Raises:
    ValueError: if dim is not a multiple of 4.
  """
  if dim % 4:
    raise ValueError(f"dim must be a multiple of 4, got {dim}.")
  ratio = table_size / table_base

  def axis(pos, n):
    offset = (table_size - n) // 2                   # the centre crop
    src = jnp.maximum(pos.astype(jnp.float32), 0.0)
    i0 = jnp.floor(src)
    lam = (src - i0)[..., None]
    i1 = jnp.minimum(i0 + 1.0, n - 1.0)
    def entry(i):
      cos_sin = sinusoidal_embedding((offset + i) / ratio, dim // 2)
      return jnp.concatenate([cos_sin[..., dim // 4:], cos_sin[..., :dim // 4]], axis=-1)
    return (1.0 - lam) * entry(i0) + lam * entry(i1)

  grid = grid.astype(jnp.float32)
  return jnp.concatenate([axis(positions[..., 1], grid[..., 1]),
                          axis(positions[..., 0], grid[..., 0])], axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates feature pairs (x_i, x_{i + D/2}) by `angles` (rotate-half RoPE).

  Args:
    x: [B, L, H, D] queries or keys, any float dtype.
    angles: float32 [B, L, D / 2] from `rope_angles`.

  Returns:
    [B, L, H, D] in x's dtype; computed in float32.
  """
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class MLPEmbedder(nnx.Module):
  """Linear -> SiLU -> Linear, mapping features to the model width (the SD3 embedders)."""

  def __init__(
    self,
    in_features: int,
    width: int,
    *,
    in_axis: str | None = "embed",
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    init = nnx.initializers.normal(0.02)
    self.fc1 = linear(
      in_features, width, (in_axis, "mlp"), dtype=dtype, param_dtype=param_dtype,
      kernel_init=init, rngs=rngs)
    self.fc2 = linear(
      width, width, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype,
      kernel_init=init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., in_features] -> [..., width] in the compute dtype."""
    return self.fc2(jax.nn.silu(self.fc1(x)))


class TimestepEmbedder(nnx.Module):
  """Per-token noise-level embedding: MLP(sinusoidal(t * time_scale)) (DiT / SD3).

  With ``noise_input`` it embeds ``(1 - t) * time_scale`` instead: the diffusers timestep, which
  counts noise at ``time_scale`` (Pyramid Flow's released models).
  """

  def __init__(
    self,
    width: int,
    *,
    frequency_dim: int = 256,
    time_scale: float = 1000.0,
    noise_input: bool = False,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.frequency_dim = frequency_dim
    self.time_scale = time_scale
    self.noise_input = noise_input
    self.dtype = dtype
    self.mlp = MLPEmbedder(
      frequency_dim, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    """Embeds noise levels.

    Args:
      t: float [...] noise level in [0, 1] (0 = pure noise, 1 = clean data).

    Returns:
      [..., width] in the compute dtype.
    """
    t = 1.0 - t if self.noise_input else t
    freqs = sinusoidal_embedding(t * self.time_scale, self.frequency_dim)
    return self.mlp(freqs.astype(self.dtype))
