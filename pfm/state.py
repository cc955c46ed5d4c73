"""The train state: the MM-DiT, its AdamW optimizer, the EMA parameters, built from a run spec.

Shared by training (``pfm.train``), sampling (``pfm.sample``, which restores the EMA parameters
into `abstract_state`) and the benchmarks, so none of them imports another's loop.

A LoRA run (``spec.lora``, `pfm.lora`) trains adapters only: its state's parameters, optimizer
state and EMA are the adapters', and its frozen base weights, the EMA parameters of a checkpoint
of ``config.train.init_from``, are read apart (`read_lora_base`) and never checkpointed; each
checkpoint records which source checkpoint they came from (``LORA_BASE_STEP`` in its ``extra``).
"""

from __future__ import annotations

import functools
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from flax import nnx

from pfm import checkpointing
from pfm import errors
from pfm import lora as lora_lib
from pfm import models
from pfm import parallel
from pfm import spec as spec_lib

# A LoRA checkpoint's ``extra`` entry: the step of the ``train.init_from`` checkpoint whose EMA
# parameters are the base weights its adapters were trained on.
LORA_BASE_STEP = "lora_base_step"


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


def _trained_model(spec: spec_lib.RunSpec):
  """The MM-DiT, with LoRA adapters (`pfm.lora.add_adapters`) for a LoRA run."""
  model = build_model(spec, spec.config.seed)
  if spec.lora is None:
    return model
  return lora_lib.add_adapters(model, spec.lora, spec.config.seed)


def _split_trained(spec: spec_lib.RunSpec, model):
  """``(graphdef, trained parameters)``: every ``nnx.Param``, or a LoRA run's adapters (its base
  weights, random here, are dropped: they come from `read_lora_base`)."""
  if spec.lora is None:
    return nnx.split(model, nnx.Param)
  graphdef, adapters, _ = lora_lib.split(model)
  return graphdef, adapters


def init_state(spec: spec_lib.RunSpec):
  """Builds the model and the train state pytree (seed ``config.seed``).

  Returns:
    ``(graphdef, state)``; ``state`` is a dict with ``step`` (int32), ``params`` and
    ``ema_params`` (``nnx.State``), ``opt_state`` and ``rng`` (uint32 [2], the base key). For a
    LoRA run ``params``, ``ema_params`` and ``opt_state`` are the adapters' (``nnx.LoRAParam``)
    and the model is ``nnx.merge(graphdef, params, base)`` with the base of `read_lora_base`.
  """
  seed = spec.config.seed
  graphdef, params = _split_trained(spec, _trained_model(spec))
  tx = create_optimizer(spec)
  state = dict(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.PRNGKey(seed))
  return graphdef, state


def abstract_state(spec: spec_lib.RunSpec):
  """``(graphdef, state)`` with ``jax.ShapeDtypeStruct`` leaves: shapes only, nothing allocated."""
  model = nnx.eval_shape(lambda: _trained_model(spec))
  graphdef, params = _split_trained(spec, model)
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


def abstract_base(spec: spec_lib.RunSpec):
  """``(graphdef, params)`` of the MM-DiT without adapters, shapes only: a LoRA run's frozen base
  weights, and the model its merged weights sample with (the whole model of any other run)."""
  model = nnx.eval_shape(lambda: build_model(spec, spec.config.seed))
  return nnx.split(model, nnx.Param)


def read_ema_params(target, source: str, step: int | None = None):
  """The EMA parameters of a checkpoint of the pfm workdir ``source`` (``config.train.init_from``),
  read into the shapes and shardings of ``target``.

  A LoRA run's checkpoint holds its adapters only: its parameters are then its base weights (its
  own ``init_from``'s, from the checkpoint the adapters were trained on) with the adapters
  merged, W + (alpha / r) A B.

  Args:
    target: the plain model's parameters (`abstract_base`; arrays or ``jax.ShapeDtypeStruct``
      leaves, with shardings to restore into).
    source: the workdir.
    step: its checkpoint; default the newest intact one.

  Returns:
    ``(params, step)``.

  Raises:
    pfm.errors.ConfigError: naming ``config.train.init_from`` when ``source`` is not a workdir or
      its model's parameters differ from ``target``'s (the first differing one named).
    pfm.checkpointing.CheckpointError: if ``source`` has no intact checkpoint (or no ``step``).
  """
  path = epath.Path(source) / "config.json"
  if not path.exists():
    raise errors.ConfigError(f"config.train.init_from={source!r}: no config.json there (a pfm "
                             "workdir, e.g. one written by pfm.train or pfm.convert)")
  source_spec = spec_lib.resolve(ml_collections.ConfigDict(json.loads(path.read_text())))
  _, theirs = abstract_base(source_spec)
  ours = dict(nnx.to_flat_state(target))
  for name, leaf in nnx.to_flat_state(theirs):
    if name not in ours or tuple(ours[name].shape) != tuple(leaf.shape):
      here = tuple(ours[name].shape) if name in ours else "absent"
      raise errors.ConfigError(
          f"config.train.init_from={source!r}: its parameter {'/'.join(map(str, name))} has shape "
          f"{tuple(leaf.shape)}, this run's model {here} (config.model must match the source's)")
  if len(ours) != len(list(nnx.to_flat_state(theirs))):
    raise errors.ConfigError(f"config.train.init_from={source!r}: this run's model has "
                             "parameters the source's lacks (config.model must match)")
  if source_spec.lora is not None:
    _, adapters = abstract_state(source_spec)
    target_ema = {"ema_params": adapters["ema_params"]}
  else:
    target_ema = {"ema_params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        target)}
  checkpointer = checkpointing.Checkpointer(os.path.join(source, "checkpoints"))
  try:
    restored, step = checkpointer.restore(target_ema, step=step, partial=True)
  finally:
    checkpointer.close(check=False)
  params = restored["ema_params"]
  if source_spec.lora is not None:
    base, _ = _read_base(source_spec, checkpointer.restored_extra.get(LORA_BASE_STEP), target)
    _, params = merge_lora(source_spec, base, params)
  return params, step


def read_lora_base(spec: spec_lib.RunSpec, step: int | None = None, *,
                   mesh: jax.sharding.Mesh | None = None, rules=None):
  """A LoRA run's frozen base weights: the EMA parameters of ``config.train.init_from``.

  Args:
    spec: the LoRA run's spec.
    step: the source checkpoint (a LoRA checkpoint's ``extra[LORA_BASE_STEP]``, so a resumed run
      and its samplers see the weights its adapters were trained on); None: the newest intact.
    mesh: read each array straight into its sharding on this mesh (by ``rules``, default the
      config's), or None: unsharded.

  Returns:
    ``(base params, step)``, in `abstract_base`'s structure.

  Raises:
    pfm.errors.ConfigError, pfm.checkpointing.CheckpointError: as `read_ema_params`; the latter
      names the source checkpoint the adapters need when it cannot be read.
  """
  _, target = abstract_base(spec)
  if mesh is not None:
    rules = parallel.logical_rules(spec.config) if rules is None else rules
    target = sharded_abstract_state(target, parallel.named_shardings(target, mesh, rules))
  return _read_base(spec, step, target)


def _read_base(spec: spec_lib.RunSpec, step: int | None, target):
  """`read_lora_base` into ``target``."""
  source = spec.config.train.init_from
  try:
    base, step = read_ema_params(target, source, step)
  except checkpointing.CheckpointError as e:
    if step is None:
      raise
    raise checkpointing.CheckpointError(
        f"the LoRA adapters were trained on checkpoint {step} of config.train.init_from="
        f"{source!r}, which cannot be read: {e}") from e
  logging.info("LoRA base weights: the EMA parameters of step %d of %s", step, source)
  return base, step


@functools.partial(jax.jit, static_argnums=0)
def _merged(config: lora_lib.LoraConfig, base, adapters):
  return lora_lib.merge(base, adapters, config)


def merge_lora(spec: spec_lib.RunSpec, base, adapters):
  """``(graphdef, params)`` of the plain MM-DiT with a LoRA run's adapters merged into its base
  weights (`pfm.lora.merge`): what its samplers run. ``base`` from `read_lora_base`."""
  graphdef, _ = abstract_base(spec)
  return graphdef, _merged(spec.lora, base, adapters)
