"""Logical axis names -> mesh axes: parameter initializers, partition specs, constraints.

Every parameter of the model carries logical axis names (e.g. `("embed", "mlp")`) as
`out_sharding` metadata on its `nnx.Param`, and the main activations pass through
`with_logical_constraint` with logical names (e.g. `("activation_batch",
"activation_length", "activation_embed")`); the names are those of `pfm.models.axes`. Neither
names a device: one rules table, a sequence of `(logical_name, mesh_axes)` pairs, maps them onto
the mesh axes `data`, `fsdp`, `tensor`, `sequence`, so changing the parallelism is a change of
rules, never of the model.

Parameters are created with `eager_sharding=False`, so building a model needs no mesh. To get
their physical layout, evaluate `nnx.get_partition_spec(nnx.state(model))` inside
`nnx.logical_axis_rules(rules)` (every name of `pfm.models.axes.LOGICAL_AXIS_NAMES` must then
appear in the rules, mapped to `None` when replicated), e.g. on an abstract model from
`nnx.eval_shape`.

Activation constraints are no-ops unless both a mesh is set (`jax.set_mesh`) and rules are
given, either explicitly or through `nnx.logical_axis_rules`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import spmd as flax_spmd

LogicalNames = Sequence[str | None]
Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def param_init(init: Callable[..., Any], names: LogicalNames) -> Callable[..., Any]:
  """Wraps an initializer so that its `nnx.Param` carries logical axis names.

  Args:
    init: an `nnx.initializers` function `(key, shape, dtype) -> array`.
    names: one logical name (or None: never sharded) per parameter dimension.

  Returns:
    An initializer usable as `kernel_init`/`bias_init`/`scale_init` of flax layers. The names
    are stored as the Param's `out_sharding` metadata; nothing is sharded at creation.
  """
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def current_rules() -> Rules:
  """The rules set by the innermost `nnx.logical_axis_rules(...)` context (may be empty)."""
  return flax_spmd.get_logical_axis_rules()


def logical_to_mesh_axes(
  names: LogicalNames,
  rules: Rules | None = None,
  mesh_axis_names: Sequence[str] | None = None,
) -> jax.sharding.PartitionSpec:
  """Maps logical axis names to a `PartitionSpec` over mesh axes.

  For each dimension, the first rule for its logical name is used. Names without a rule are not
  sharded. Mesh axes that are absent from `mesh_axis_names` (when given) or already used by an
  earlier dimension are dropped, so one rules table serves meshes of any subset of axes.

  Args:
    names: one logical name (or None) per array dimension.
    rules: `(logical_name, mesh_axis | tuple of mesh axes | None)` pairs; defaults to the rules
      of the current `nnx.logical_axis_rules` context.
    mesh_axis_names: the axes of the target mesh, or None to keep every mapped axis.

  Returns:
    A `PartitionSpec` with one entry per dimension.
  """
  if rules is None:
    rules = current_rules()
  table: dict[str, tuple[str, ...]] = {}
  for logical, physical in rules:
    if logical in table:
      continue
    if physical is None:
      table[logical] = ()
    elif isinstance(physical, str):
      table[logical] = (physical,)
    else:
      table[logical] = tuple(physical)
  used: set[str] = set()
  spec = []
  for name in names:
    axes = table.get(name, ()) if name is not None else ()
    axes = tuple(
      a for a in axes
      if a not in used and (mesh_axis_names is None or a in mesh_axis_names)
    )
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return jax.sharding.PartitionSpec(*spec)


def with_logical_constraint(
  x: jax.Array, names: LogicalNames, rules: Rules | None = None
) -> jax.Array:
  """`jax.lax.with_sharding_constraint` in terms of logical axis names.

  A no-op when no mesh is set (`jax.sharding.get_abstract_mesh()` is empty) or when there are
  no rules (neither `rules` nor an `nnx.logical_axis_rules` context), e.g. in single-device tests.

  Args:
    x: the activation, any shape and dtype.
    names: one logical name (or None) per dimension of `x`.
    rules: optional rules table, see `logical_to_mesh_axes`.

  Returns:
    `x`, with a sharding constraint when a mesh and rules are available.

  Raises:
    ValueError: if `len(names) != x.ndim`.
  """
  if len(names) != x.ndim:
    raise ValueError(f"{len(names)} logical names for an array of shape {x.shape}.")
  if rules is None:
    rules = current_rules()
  if not rules:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_mesh_axes(names, rules, mesh.axis_names)
  return jax.lax.with_sharding_constraint(x, spec)
