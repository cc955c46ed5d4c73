"""The device mesh, the logical-axis rules, and sharded train state and batches.

One config section chooses the parallelism; the model never names a device:

    config.mesh.data = -1      # data parallel: batch rows (-1: the devices left over)
    config.mesh.fsdp = 1       # fully sharded data parallel: batch rows + parameters/optimizer
    config.mesh.sequence = 1   # sequence parallel: the token axis of the activations
    config.mesh.tensor = 1     # tensor parallel: attention heads and MLP hidden units
    config.mesh.rules = ()     # ((logical name, mesh axes), ...) placed before `DEFAULT_RULES`

`create_mesh` builds a `jax.sharding.Mesh` with the axes in `MESH_AXES` (outermost first, so
`tensor`, the most communication-hungry, is innermost: neighbouring devices on the fastest links,
and `data` spans hosts). Parameters carry logical axis names (`pfm.models.axes`); the rules
map them, and the names of the main activations, onto mesh axes. With the default rules:

- `data`: activations' batch axis only; parameters replicated.
- `fsdp`: activations' batch axis and every parameter's `embed` axis (and so the optimizer state
  and EMA), gathered by XLA for each matmul (ZeRO-3).
- `tensor`: parameters' `heads`/`mlp` axes and the activations' head/hidden axes (Megatron).
- `sequence`: activations' token axis; attention stays exact, XLA gathers keys and values.

The mesh axes are `AxisType.Auto`: shardings are given at the jit boundary (state, batch) and at
the logical constraints, and XLA's SPMD partitioner propagates them through the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from pfm.models import axes as logical_axes
from pfm.models import partitioning

# Outermost first; `tensor` innermost (fastest links), `data` outermost (spans hosts).
MESH_AXES = ("data", "fsdp", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes that split batch rows

# Logical name -> mesh axes. The first rule for a name wins, so `config.mesh.rules` entries,
# placed in front, override these.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  # Activations.
  ("activation_batch", BATCH_AXES),
  ("activation_length", "sequence"),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv", None),
  ("activation_mlp", "tensor"),
  # Parameters.
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("mlp", "tensor"),
  ("kv", None),
  ("vocab", None),
  ("norm", None),
  ("layers", None),
)


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int | None = None) -> dict[str, int]:
  """The size of each mesh axis, ``{"data": 4, "fsdp": 2, "sequence": 1, "tensor": 1}``.

  Args:
    config: a run config with ``mesh.{data, fsdp, sequence, tensor}``: positive sizes, or -1 for
      at most one axis, which takes the devices left over. A config without ``mesh`` is data
      parallel over all devices.
    num_devices: default ``jax.device_count()`` (all processes).

  Raises:
    ValueError: naming the ``config.mesh`` field, if a size is invalid or the sizes do not
      multiply to the number of devices.
  """
  if num_devices is None:
    num_devices = jax.device_count()
  mesh = config.get("mesh", None) or {}
  sizes = {axis: int(mesh.get(axis, -1 if axis == "data" else 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  bad = [axis for axis, size in sizes.items() if size < 1 and size != -1]
  if bad or len(fill) > 1:
    raise ValueError(f"config.mesh.{(bad or fill)[0]}={sizes[(bad or fill)[0]]}: mesh sizes must "
                     "be >= 1, with -1 (fill the remaining devices) for at most one axis")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % known:
      others = ", ".join(f"{a}={s}" for a, s in sizes.items() if s != -1)
      raise ValueError(
        f"config.mesh.{fill[0]}=-1: the other axes ({others}: {known} devices) do not divide "
        f"the {num_devices} devices")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
      f"config.mesh: {' x '.join(f'{a}={s}' for a, s in sizes.items())} = {known} devices, but "
      f"there are {num_devices}; set one axis to -1 to fill the rest")
  return sizes


def create_mesh(config: ml_collections.ConfigDict,
                devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The run's mesh over ``devices`` (default all devices of all processes), axes `MESH_AXES`.

  Raises:
    ValueError: see `mesh_shape`.
  """
  num_devices = len(devices) if devices is not None else None
  sizes = mesh_shape(config, num_devices)
  return jax.make_mesh(
    tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(config: ml_collections.ConfigDict | None = None) -> tuple:
  """``config.mesh.rules`` (overrides, first) followed by `DEFAULT_RULES`.

  Raises:
    ValueError: naming ``config.mesh.rules`` if an entry is not a (logical name, mesh axes) pair
      over known names and `MESH_AXES`.
  """
  overrides = tuple(((config or {}).get("mesh", None) or {}).get("rules", ()) or ())
  for rule in overrides:
    axes = rule[1] if len(rule) == 2 else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if (len(rule) != 2 or rule[0] not in logical_axes.LOGICAL_AXIS_NAMES
        or any(a not in MESH_AXES for a in axes)):
      raise ValueError(
        f"config.mesh.rules entry {rule!r}: need (logical name, mesh axis | tuple | None) with a "
        f"name of {list(logical_axes.LOGICAL_AXIS_NAMES)} and axes of {MESH_AXES}")
  return tuple((name, axes) for name, axes in overrides) + DEFAULT_RULES


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def partition_specs(tree: Any, rules: Sequence, mesh: jax.sharding.Mesh | None = None) -> Any:
  """A `PartitionSpec` per array of ``tree`` from the logical names on its `nnx.Variable`s.

  Args:
    tree: any pytree; `nnx.Variable` leaves (parameters, and optax states built from them, which
      keep the metadata) with ``out_sharding`` logical names are mapped by ``rules``; every other
      leaf (step, RNG key, optimizer counters) is replicated, ``P()``.
    rules: a rules table, e.g. `logical_rules(config)`.
    mesh: when given, mesh axes it lacks are dropped.

  Returns:
    ``tree`` with a `PartitionSpec` in place of each array (Variables are kept as containers).
  """
  axis_names = None if mesh is None else mesh.axis_names

  def spec(x):
    names = x.get_metadata().get("out_sharding") if _is_variable(x) else None
    if not names:
      return x.replace(jax.sharding.PartitionSpec()) if _is_variable(x) else (
        jax.sharding.PartitionSpec())
    return x.replace(partitioning.logical_to_mesh_axes(names, rules, axis_names))

  return jax.tree.map(spec, tree, is_leaf=_is_variable)


def named_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Sequence) -> Any:
  """`partition_specs` as `NamedSharding`s on ``mesh``; usable as jit ``out_shardings``."""
  return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s),
                      partition_specs(tree, rules, mesh),
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> jax.sharding.NamedSharding:
  """Rows over `BATCH_AXES` (data x fsdp), everything else replicated, for a rank-``ndim`` field.

  The token axis is not split here: the model's first logical constraint shards it over
  ``sequence``, so the host batch layout does not depend on the parallelism.
  """
  return jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def num_batch_shards(mesh: jax.sharding.Mesh) -> int:
  """How many ways batch rows are split: ``mesh.data * mesh.fsdp``."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Assembles the global batch from each process's rows (`jax.make_array_from_process_local_data`).

  Args:
    local_batch: this process's rows, a pytree (e.g. ``pfm.batch.PackedBatch``) of arrays
      ``[B_local, ...]``; processes hold consecutive row blocks in process order,
      ``B_local * process_count`` rows in all.
    mesh: the run's mesh.

  Returns:
    the same pytree of global `jax.Array`s ``[B_local * process_count, ...]``, rows sharded over
    `BATCH_AXES`.
  """
  def assemble(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, global_shape)
  return jax.tree.map(assemble, local_batch)


def shard_shapes(tree: Any, shardings: Any) -> list[tuple[str, tuple, tuple]]:
  """``(path, global shape, per-device shape)`` of every array under ``shardings``."""
  out = []
  for (path, x), s in zip(jax.tree.leaves_with_path(tree), jax.tree.leaves(shardings)):
    out.append((jax.tree_util.keystr(path), tuple(x.shape), tuple(s.shard_shape(x.shape))))
  return out


def check_sharding(tree: Any, mesh: jax.sharding.Mesh, rules: Sequence, *,
                   min_fsdp_bytes: int = 1 << 20) -> None:
  """Fails a run whose arrays are less sharded than its layout asks.

  Two checks, both on the arrays' actual shardings (so a restore, a jit or an init that silently
  returned replicated arrays is caught before it costs memory on a pod):

  1. every array's per-device shape is no larger than the one ``rules`` give it on ``mesh``;
  2. with ``fsdp > 1``, every array of at least ``min_fsdp_bytes`` bytes is split across the
     ``fsdp`` axis (a rules table that maps no dimension of a large parameter to ``fsdp`` would
     keep a full copy on every device).

  Args:
    tree: a pytree of `jax.Array`s (e.g. the train state) with nnx Variable metadata.
    mesh, rules: the run's mesh and rules.
    min_fsdp_bytes: size from which check 2 applies.

  Raises:
    ValueError: listing the first offending arrays with their actual and asked-for per-device
      shapes, and naming ``config.mesh``.
  """
  expected = named_shardings(tree, mesh, rules)
  problems = []
  for (path, x), want in zip(jax.tree.leaves_with_path(tree), jax.tree.leaves(expected)):
    name = jax.tree_util.keystr(path)
    have = tuple(x.sharding.shard_shape(x.shape))
    asked = tuple(want.shard_shape(x.shape))
    if math.prod(have) > math.prod(asked):
      problems.append(f"{name}: per-device shape {have}, the layout asks for {asked}")
    elif (mesh.shape["fsdp"] > 1 and x.size * x.dtype.itemsize >= min_fsdp_bytes
          and not _split_over(x.sharding, "fsdp", x.size // max(math.prod(have), 1))):
      problems.append(f"{name} ({x.size * x.dtype.itemsize / 2**20:.1f} MiB): not split over "
                      f"fsdp={mesh.shape['fsdp']} (per-device shape {have})")
  if problems:
    raise ValueError(
      f"{len(problems)} arrays are less sharded than config.mesh "
      f"({dict(mesh.shape)}) and its rules ask:\n  " + "\n  ".join(problems[:10]))


def _split_over(sharding, axis: str, num_shards: int) -> bool:
  """Whether an array with this sharding is split over mesh ``axis``."""
  spec = getattr(sharding, "spec", None)
  if spec is None:  # not a NamedSharding: judge by the number of distinct shards
    return num_shards >= sharding.mesh.shape[axis] if hasattr(sharding, "mesh") else False
  used = {a for entry in spec if entry is not None
          for a in ((entry,) if isinstance(entry, str) else entry)}
  return axis in used


def replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """``tree`` with every array replicated on ``mesh`` (a jitted identity; collective)."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda t: t, out_shardings=sharding)(tree)
