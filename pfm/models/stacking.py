"""Stacked (scanned) joint blocks, their remat policies, and the checkpoint layout converters.

With `MMDiTConfig.scan_layers` the first depth - 1 (identical) blocks are stored stacked and run
in one `jax.lax.scan`, so the traced program and compile time do not grow with depth;
`MMDiTConfig.remat_policy` recomputes each block's activations in the backward pass
(`jax.checkpoint`). `stack_layers` / `unstack_layers` convert parameters (or any params-shaped
tree) between the unstacked (`blocks/<i>/...`) and stacked (`blocks/...`, `last_block/...`)
layouts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pfm.models.axes import LAYER_AXIS
from pfm.models.blocks import JointBlock, SingleBlock
from pfm.models.presets import MMDiTConfig

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


# -- stacked (scanned) blocks ----------------------------------------------------------------------
# Initialisation uses NNX's lifted vmap, whose `transform_metadata` (applied by the graph-mode
# transforms only, hence graph=True, graph_updates=True) names the stacked axis. The forward pass
# uses plain `jax.lax.scan` / `jax.checkpoint` over the blocks' split state instead of the lifted
# transforms: those refuse modules whose arrays come from an enclosing trace, which is how the
# sampler calls the model (merged under `jax.jit`, run inside a `fori_loop`). Blocks hold no
# mutable state, so nothing has to be written back.
_GRAPH = {"graph": True, "graph_updates": True}


def _stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
  """`num` modules ``make(rngs)`` as one, parameters stacked on axis 0: every one draws its own
  parameters (the RNG streams are split `num` ways); each parameter's logical names gain
  `LAYER_AXIS` in front."""

  @nnx.split_rngs(splits=num, **_GRAPH)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num,
            transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS}, **_GRAPH)
  def create(rngs: nnx.Rngs) -> nnx.Module:
    return make(rngs)

  return create(rngs)


def stacked_blocks(config: MMDiTConfig, num: int, rngs: nnx.Rngs) -> JointBlock:
  """`num` full (not pre-only) joint blocks as one module, parameters stacked on axis 0."""
  return _stacked(lambda r: JointBlock(config, rngs=r), num, rngs)


def stacked_single_blocks(config: MMDiTConfig, num: int, rngs: nnx.Rngs) -> SingleBlock:
  """`num` single-stream blocks as one module, parameters stacked on axis 0."""
  return _stacked(lambda r: SingleBlock(config, rngs=r), num, rngs)


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


def call_block(block: JointBlock, x_text, c_text, x_video, c_video, angles, mask, *,
                remat: str):
  """`block(...)` (see `JointBlock.__call__`), rematerialised with the named policy."""
  if remat == "none":
    return block(x_text, c_text, x_video, c_video, angles, mask)
  graphdef, state = nnx.split(block)
  fn = _block_fn(graphdef, remat, prevent_cse=True)
  return fn(state, x_text, c_text, x_video, c_video, angles, mask)


def call_single_block(block, x, c, angles, mask, *, remat: str):
  """`block(x, c, angles, mask)` of a `blocks.SingleBlock`, rematerialised like `call_block`."""
  if remat == "none":
    return block(x, c, angles, mask)
  graphdef, state = nnx.split(block)
  return _block_fn(graphdef, remat, prevent_cse=True)(state, x, c, angles, mask)


def scan_blocks(blocks, x_text, c_text, x_video, c_video, angles, mask, *, remat: str,
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


def scan_single_blocks(blocks: SingleBlock, x, c, angles, mask, *, remat: str):
  """Runs stacked single-stream blocks in order with `jax.lax.scan` (`SingleBlock.__call__`)."""
  graphdef, state = nnx.split(blocks)
  fn = _block_fn(graphdef, remat, prevent_cse=False)

  def body(x, layer_state):
    return fn(_drop_layer_axis(layer_state), x, c, angles, mask), None

  x, _ = jax.lax.scan(body, x, state)
  return x


def scan_decode(blocks, x_video, c_video, angles, mask, stacked_kv):
  """`JointBlock.decode` of stacked blocks in order; stacked_kv: ([n, B, Lc, H, Dh],) * 2."""
  graphdef, state = nnx.split(blocks)

  def body(x_video, xs):
    layer_state, kv = xs
    block = nnx.merge(graphdef, _drop_layer_axis(layer_state))
    return block.decode(x_video, c_video, angles, mask, kv), None

  x_video, _ = jax.lax.scan(body, x_video, (state, stacked_kv))
  return x_video


# -- checkpoint layouts ----------------------------------------------------------------------------


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
    axis (absent for depth 1) and "last_block" = block depth-1, and "single_blocks" (if any)
    all stacked. Load it into a model with
    `nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), stacked)` then `nnx.update`.
  """
  blocks = params["blocks"]
  depth = len(blocks)
  out = {k: v for k, v in params.items() if k != "blocks"}
  if depth > 1:
    out["blocks"] = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[_child(blocks, i) for i in range(depth - 1)])
  out["last_block"] = _child(blocks, depth - 1)
  singles = params.get("single_blocks")
  if singles:
    out["single_blocks"] = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[_child(singles, i) for i in range(len(singles))])
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
  singles = params.get("single_blocks")
  if singles:
    num = jax.tree.leaves(singles)[0].shape[0]
    out["single_blocks"] = {i: jax.tree.map(lambda x, i=i: x[i], singles) for i in range(num)}
  return out
