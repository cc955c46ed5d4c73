"""Flax NNX layers with logical axis names on every parameter.

Thin constructors over `nnx.Linear` / `nnx.LinearGeneral` / `nnx.RMSNorm` that attach logical
names (see `pfm.models.partitioning`) and keep the compute dtype (`dtype`) separate from the
parameter dtype (`param_dtype`, float32 by default) for mixed precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pfm.models.axes import ACT_MLP
from pfm.models.partitioning import LogicalNames, param_init, with_logical_constraint

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def linear(
  in_features: int,
  out_features: int,
  names: LogicalNames,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  use_bias: bool = True,
  kernel_init: Callable[..., Any] = xavier_uniform,
  bias_init: Callable[..., Any] = zeros,
  rngs: nnx.Rngs,
) -> nnx.Linear:
  """`nnx.Linear` with kernel [in, out] named `names` and bias [out] named `names[1:]`."""
  return nnx.Linear(
    in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
    kernel_init=param_init(kernel_init, names),
    bias_init=param_init(bias_init, tuple(names)[1:]), rngs=rngs)


def linear_general(
  in_features: int | Sequence[int],
  out_features: int | Sequence[int],
  names: LogicalNames,
  *,
  axis: int | Sequence[int] = -1,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  use_bias: bool = True,
  kernel_init: Callable[..., Any] = xavier_uniform,
  bias_init: Callable[..., Any] = zeros,
  rngs: nnx.Rngs,
) -> nnx.LinearGeneral:
  """`nnx.LinearGeneral` with kernel [*in, *out] named `names`, bias [*out] named likewise.

  The initializer sees the kernel flattened to [prod(in), prod(out)], so fan-in/fan-out are
  those of the equivalent 2-D matrix.
  """
  n_out = 1 if isinstance(out_features, int) else len(out_features)
  return nnx.LinearGeneral(
    in_features, out_features, axis=axis, use_bias=use_bias, dtype=dtype,
    param_dtype=param_dtype, kernel_init=param_init(kernel_init, names),
    bias_init=param_init(bias_init, tuple(names)[-n_out:]), rngs=rngs)


def rms_norm(
  num_features: int,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  epsilon: float = 1e-6,
  rngs: nnx.Rngs,
) -> nnx.RMSNorm:
  """`nnx.RMSNorm` over the last axis with a learned scale named `("norm",)`."""
  return nnx.RMSNorm(
    num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
    scale_init=param_init(ones, ("norm",)), rngs=rngs)


def layer_norm_no_affine(x: jax.Array, epsilon: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis without scale or bias (adaLN supplies them).

  Args:
    x: [..., D] any float dtype.
    epsilon: variance floor.

  Returns:
    [..., D] in x's dtype; statistics computed in float32.
  """
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


class Mlp(nnx.Module):
  """Transformer feed-forward block: Linear(D -> hidden) -> GELU(tanh) -> Linear(hidden -> D)."""

  def __init__(
    self,
    width: int,
    hidden: int,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.fc1 = linear(
      width, hidden, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = linear(
      hidden, width, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, D] in the compute dtype."""
    h = jax.nn.gelu(self.fc1(x), approximate=True)
    h = with_logical_constraint(h, ACT_MLP)
    return self.fc2(h)
