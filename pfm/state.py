"""The train state: the MM-DiT, its AdamW optimizer, the EMA parameters, built from a run spec.

Shared by training (``pfm.train``), sampling (``pfm.sample``, which restores the EMA parameters
into `abstract_state`) and the benchmarks, so none of them imports another's loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pfm import models
from pfm import parallel
from pfm import spec as spec_lib


def learning_rate_schedule(spec: spec_lib.RunSpec) -> optax.Schedule:
  """Linear warm-up to ``optimizer.learning_rate``, then constant (Pyramidal Flow Table 4)."""
  o = spec.config.optimizer
  warmup = max(o.warmup_steps, 1)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, o.learning_rate, warmup),
       optax.constant_schedule(o.learning_rate)], [warmup])


def create_optimizer(spec: spec_lib.RunSpec) -> optax.GradientTransformation:
  """AdamW of Pyramidal Flow's Table 4 with global-norm gradient clipping."""
  o = spec.config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip_norm),
      optax.adamw(learning_rate_schedule(spec), b1=o.b1, b2=o.b2, eps=o.eps,
                  weight_decay=o.weight_decay))


def build_model(spec: spec_lib.RunSpec, seed: int = 0) -> models.MMDiT:
  """The MM-DiT of ``spec.model`` for ``3 * patch_size^2``-dim patch tokens."""
  return models.build_model(spec.model, rngs=nnx.Rngs(seed))


def init_state(spec: spec_lib.RunSpec):
  """Builds the model and the train state pytree (seed ``config.seed``).

  Returns:
    ``(graphdef, state)``; ``state`` is a dict with ``step`` (int32), ``params`` and
    ``ema_params`` (``nnx.State``), ``opt_state`` and ``rng`` (uint32 [2], the base key).
  """
  seed = spec.config.seed
  model = build_model(spec, seed)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = create_optimizer(spec)
  state = dict(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.PRNGKey(seed))
  return graphdef, state


def abstract_state(spec: spec_lib.RunSpec):
  """``(graphdef, state)`` with ``jax.ShapeDtypeStruct`` leaves: shapes only, nothing allocated."""
  model = nnx.eval_shape(lambda: build_model(spec, spec.config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = create_optimizer(spec)
  state = dict(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      opt_state=jax.eval_shape(tx.init, params), ema_params=params,
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  return graphdef, state


def create_sharded_state(spec: spec_lib.RunSpec, mesh: jax.sharding.Mesh, rules):
  """The train state created directly in its sharded layout, never whole on one device.

  ``jax.eval_shape`` gives the state's structure and logical names, the rules give each array's
  sharding, and the initialiser runs jitted with those ``out_shardings``, so every device computes
  only its own shards of the random initial parameters.

  Returns:
    ``(graphdef, state, shardings)``.
  """
  graphdef, abstract = abstract_state(spec)
  shardings = parallel.named_shardings(abstract, mesh, rules)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    state = jax.jit(lambda: init_state(spec)[1], out_shardings=shardings)()
  return graphdef, state, shardings


def sharded_abstract_state(abstract, shardings):
  """``jax.ShapeDtypeStruct`` leaves carrying their target shardings (for a sharded restore)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
