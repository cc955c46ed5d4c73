"""Loss and gradients of every parallel layout on 8 CPU devices, against one device.

Run by ``tests/test_parallel.py`` in a subprocess (the device count is fixed when JAX starts):

  JAX_NUM_CPU_DEVICES=8 python -m tests.layouts_check

Prints one JSON object: per layout the loss, the largest gradient error relative to the largest
gradient, the per-device share of the parameter bytes, and after two train steps the largest
parameter difference; plus the outcome of the under-sharding checks.
"""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from pfm import parallel, train  # noqa: E402
from pfm import spec as spec_lib  # noqa: E402
from pfm import state as state_lib  # noqa: E402
from pfm.data import pipeline  # noqa: E402

# Mesh sizes per layout; "single" runs on the first device only.
LAYOUTS = {
  "single": dict(data=1),
  "data": dict(data=8),
  "fsdp": dict(data=1, fsdp=8),
  "tensor": dict(data=4, tensor=2),
  "sequence": dict(data=2, sequence=4),
  "fsdp_sequence_tensor": dict(data=1, fsdp=2, sequence=2, tensor=2),
}
STEP_LAYOUTS = ("single", "fsdp_sequence_tensor")  # also run two full train steps


# These create the train state with the sharded initialiser; the others place a host copy.
SHARDED_INIT_LAYOUTS = ("single", "fsdp", "fsdp_sequence_tensor")


@functools.cache
def _initial_state():
  return jax.device_get(state_lib.init_state(spec_lib.resolve(_config({})))[1])


def _config(layout):
  config = default.get_config("smoke")
  config.data.batch_size = 8
  for axis in parallel.MESH_AXES:
    config.mesh[axis] = layout.get(axis, 1)
  return config


def _host(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def run_layout(name, batches):
  config = _config(LAYOUTS[name])
  devices = jax.devices()[:1] if name == "single" else None
  mesh = parallel.create_mesh(config, devices)
  rules = parallel.logical_rules(config)
  if name in SHARDED_INIT_LAYOUTS:
    graphdef, state, shardings = state_lib.create_sharded_state(
        spec_lib.resolve(config), mesh, rules)
  else:  # the same initial state, laid out on this mesh (cheaper than compiling the init again)
    graphdef, abstract = state_lib.abstract_state(spec_lib.resolve(config))
    shardings = parallel.named_shardings(abstract, mesh, rules)
    state = jax.device_put(_initial_state(), shardings)
  parallel.check_sharding(state, mesh, rules, min_fsdp_bytes=1 << 14)
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
  per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state["params"]))
  out = dict(mesh=dict(mesh.shape), param_share_per_device=per_device / params_bytes)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    grad_fn = jax.jit(functools.partial(
      train.loss_and_grads, graphdef=graphdef, obj=spec_lib.resolve(config).objective))
    loss, _, _, grads = grad_fn(state["params"], parallel.global_batch(batches[0], mesh),
                                jax.random.key(1))
    out |= dict(loss=float(loss), grads=_host(grads))
    if name in STEP_LAYOUTS:
      step_fn = train.make_train_step(spec_lib.resolve(config), graphdef, shardings)
      for batch in batches:
        state, metrics = step_fn(state, parallel.global_batch(batch, mesh))
      out |= dict(step_loss=float(metrics["loss"]), params=_host(state["params"]))
  return out


def per_shard_attention_error():
  """`kernels.per_shard` (the splash wrapper) around the einsum backend on the mixed mesh.

  Returns the largest difference to the unwrapped backend, in value and in the gradient, relative
  to the largest entry of each.
  """
  from pfm.models import kernels, masks

  config = _config(LAYOUTS["fsdp_sequence_tensor"])
  mesh = parallel.create_mesh(config)
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((4, 64, 2, 16)).astype(np.float32) for _ in range(3))
  segments = np.repeat(np.array([[1] * 40 + [2] * 20 + [0] * 4]), 4, axis=0).astype(np.int32)
  frames = np.tile(np.arange(64, dtype=np.int32) // 16, (4, 1))
  mask = masks.MaskInfo.self_attention(segments, frames)
  wrapped = kernels.per_shard(kernels.xla_attention)

  def loss(fn, q, k, v):
    out = fn(q, k, v, mask, scale=0.25)
    return jnp.sum(out * out), out

  reference = jax.jit(jax.value_and_grad(functools.partial(loss, kernels.xla_attention),
                                         argnums=(0, 1, 2), has_aux=True))(q, k, v)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.logical_rules(config)):
    sharded = jax.jit(jax.value_and_grad(functools.partial(loss, wrapped), argnums=(0, 1, 2),
                                         has_aux=True))(q, k, v)
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(a))))
             for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(sharded)))


def under_sharding_errors(batch):
  """The messages of `check_sharding` for two layouts that are less sharded than asked."""
  del batch
  messages = {}
  config = _config(LAYOUTS["fsdp"])
  mesh = parallel.create_mesh(config)
  # 1. Rules that keep the embed axis replicated while the mesh asks for fsdp = 8.
  config.mesh.rules = (("embed", None),)
  rules = parallel.logical_rules(config)
  _, state, _ = state_lib.create_sharded_state(spec_lib.resolve(config), mesh, rules)
  try:
    parallel.check_sharding(state, mesh, rules, min_fsdp_bytes=1 << 14)
  except ValueError as e:
    messages["replicated_rules"] = str(e)
  # 2. The right rules, but arrays that were replicated on the way (e.g. a jit without shardings).
  rules = parallel.logical_rules(_config(LAYOUTS["fsdp"]))
  _, state, _ = state_lib.create_sharded_state(
      spec_lib.resolve(_config(LAYOUTS["fsdp"])), mesh, rules)
  state = parallel.replicated(state, mesh)
  try:
    parallel.check_sharding(state, mesh, rules)
  except ValueError as e:
    messages["replicated_arrays"] = str(e)
  return messages


def main():
  config = _config({})
  data = pipeline.create_dataset(spec_lib.resolve(config), seed=0)
  iterator = iter(data)
  batches = [next(iterator) for _ in range(2)]
  results = {name: run_layout(name, batches) for name in LAYOUTS}
  reference = results["single"]
  report = {}
  for name, r in results.items():
    scale = max(np.max(np.abs(g)) for g in reference["grads"])
    entry = dict(
      mesh=r["mesh"], loss=r["loss"], param_share_per_device=r["param_share_per_device"],
      grad_error=max(float(np.max(np.abs(g - h))) for g, h in zip(r["grads"],
                                                                 reference["grads"])) / scale)
    if "params" in r:
      entry["step_loss"] = r["step_loss"]
      entry["param_error"] = max(float(np.max(np.abs(p - q))) for p, q in zip(
        r["params"], reference["params"]))
    report[name] = entry
  report["under_sharding"] = under_sharding_errors(batches[0])
  report["per_shard_attention_error"] = per_shard_attention_error()
  report["num_devices"] = jax.device_count()
  print(json.dumps(report))


if __name__ == "__main__":
  main()
