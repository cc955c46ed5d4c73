"""Attention projection layers: query/key/value with QK-normalisation, and the output projection.

The attention itself (masks and kernels) is in `pfm.models.masks` and `pfm.models.kernels`;
these layers map the [B, L, D] streams to and from the [B, L, H, Dh] heads layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pfm.models.axes import ACT_HEADS
from pfm.models.layers import linear_general, rms_norm
from pfm.models.partitioning import with_logical_constraint


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
    epsilon: float = 1e-6,
    rngs: nnx.Rngs,
  ):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
    head_dim = width // num_heads
    kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    names = ("embed", "heads", "kv")
    self.q = linear_general(width, (num_heads, head_dim), names, **kw)
    self.k = linear_general(width, (num_heads, head_dim), names, **kw)
    self.v = linear_general(width, (num_heads, head_dim), names, **kw)
    self.q_norm = rms_norm(head_dim, epsilon=epsilon, **kw)
    self.k_norm = rms_norm(head_dim, epsilon=epsilon, **kw)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, L, D] -> (q, k, v), each [B, L, H, Dh] in the compute dtype."""
    q = with_logical_constraint(self.q_norm(self.q(x)), ACT_HEADS)
    k = with_logical_constraint(self.k_norm(self.k(x)), ACT_HEADS)
    v = with_logical_constraint(self.v(x), ACT_HEADS)
    return q, k, v


def attention_output(
  width: int,
  num_heads: int,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  kernel_init: Callable[..., Any] | None = None,
  use_bias: bool = True,
  rngs: nnx.Rngs,
) -> nnx.LinearGeneral:
  """Output projection [B, L, H, Dh] -> [B, L, D] (kernel named heads, kv, embed)."""
  kw = {} if kernel_init is None else {"kernel_init": kernel_init}
  return linear_general(
    (num_heads, width // num_heads), width, ("heads", "kv", "embed"), axis=(-2, -1),
    dtype=dtype, param_dtype=param_dtype, use_bias=use_bias, rngs=rngs, **kw)
