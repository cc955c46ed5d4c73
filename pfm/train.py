r"""Training: ``python -m pfm.train --config=configs/default.py --workdir=runs/demo``.

The jitted train step is the pyramid maths (noise, endpoints, x̂_t, target; ``pfm.objective``) +
the MM-DiT + the loss. Around it: CLU metric writers and progress reports, orbax checkpoints that
hold the grain iterator (a restarted run resumes with the same data order), periodic sample videos,
and a stop with a clear error on a non-finite loss before any bad state is checkpointed.
"""

from __future__ import annotations

import functools
import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
from flax import nnx

from pfm import checkpointing
from pfm import config as config_lib
from pfm import models
from pfm import objective
from pfm.data import pipeline

FLAGS = flags.FLAGS


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient norm became NaN or infinite."""


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to ``optimizer.learning_rate``, then constant (paper Table 4)."""
  o = config.optimizer
  warmup = max(o.warmup_steps, 1)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, o.learning_rate, warmup),
       optax.constant_schedule(o.learning_rate)], [warmup])


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW of the paper's Table 4 with global-norm gradient clipping."""
  o = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                  weight_decay=o.weight_decay))


def build_model(config: ml_collections.ConfigDict, seed: int = 0) -> models.MMDiT:
  """The MM-DiT of ``config.model`` for ``3 * patch_size^2``-dim patch tokens."""
  m = config.model
  return models.build_model(
      models.model_config(m.variant, patch_size=m.patch_size, attention_backend=m.attention,
                          dtype=m.dtype,
                          text_time_conditioning=m.get("text_time_conditioning", True)),
      rngs=nnx.Rngs(seed))


def init_state(config: ml_collections.ConfigDict):
  """Builds the model and the train state pytree.

  Returns:
    ``(graphdef, state)``; ``state`` is a dict with ``step`` (int32), ``params`` and
    ``ema_params`` (``nnx.State``), ``opt_state`` and ``rng`` (uint32 [2], the base key).
  """
  model = build_model(config, config.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = create_optimizer(config)
  state = dict(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.PRNGKey(config.seed))
  return graphdef, state


def abstract_state(config: ml_collections.ConfigDict):
  """``(graphdef, state)`` with ``jax.ShapeDtypeStruct`` leaves: shapes only, nothing allocated."""
  model = nnx.eval_shape(lambda: build_model(config, config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = create_optimizer(config)
  state = dict(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      opt_state=jax.eval_shape(tx.init, params), ema_params=params,
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  return graphdef, state


def objective_config(config) -> objective.ObjectiveConfig:
  pyramid = config_lib.pyramid(config)
  return objective.ObjectiveConfig(
      windows=pyramid.windows,
      time_distribution=config.pyramid.time_distribution,
      history_noise_max=float(config.pyramid.history_noise_max),
      caption_dropout=float(config.model.caption_dropout),
      prediction=config.model.prediction, patch_size=int(config.model.patch_size),
      diffusion=pyramid.diffusion,
      spatial_jump=pyramid.spatial_factors[1] if pyramid.num_stages > 1 else 1)


def train_step(state, batch, *, graphdef, tx, obj: objective.ObjectiveConfig, ema_decay: float,
               num_stages: int):
  """One optimisation step on a packed batch. Pure; jit it with ``donate_argnums=0``.

  Returns:
    ``(new_state, metrics)``; metrics are scalars: ``loss``, ``loss_stage{k}``, ``grad_norm``,
    ``finite`` (1.0 when loss and gradients are finite).
  """
  key = jax.random.fold_in(state["rng"], state["step"])
  inputs, target, weight, path = objective.corrupt_packed_batch(key, batch, obj)

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    prediction = objective.to_target(model(**inputs), inputs, path, obj)
    loss, err = objective.weighted_mse(prediction, target, weight)
    return loss, err

  (loss, err), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # Warm EMA: the decay ramps up so early samples are not dominated by the random init.
  decay = jnp.minimum(ema_decay, (1.0 + state["step"]) / (10.0 + state["step"]))
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema_params"], params)
  new_state = dict(step=state["step"] + 1, params=params, opt_state=opt_state, ema_params=ema,
                   rng=state["rng"])
  metrics = dict(loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
  stage = batch["stage"]
  for k in range(num_stages):
    w = weight * (stage == k)
    metrics[f"loss_stage{k}"] = jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1e-12)
  return new_state, metrics


def make_train_step(config, graphdef):
  return jax.jit(
      functools.partial(
          train_step, graphdef=graphdef, tx=create_optimizer(config), obj=objective_config(config),
          ema_decay=float(config.optimizer.ema_decay), num_stages=config.pyramid.num_stages),
      donate_argnums=0)


def _write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def _mean_metrics(history):
  """Per-step metric dicts -> (their means, the stacked host arrays)."""
  stacked = {name: np.stack([np.asarray(m[name]) for m in history]) for name in history[0]}
  return {name: float(np.mean(v)) for name, v in stacked.items()}, stacked


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains (or resumes) the run in ``workdir``; returns the final train state.

  Raises:
    ValueError: for an invalid config (before anything is compiled).
    NonFiniteLossError: when the loss becomes NaN/inf; the last checkpoint stays the last good one.
  """
  from clu import metric_writers, parameter_overview, periodic_actions
  from pfm import sample as sample_lib

  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  _write_config(config, workdir)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)

  dataset = pipeline.create_dataset(
      config, seed=config.seed, shard_index=jax.process_index(),
      shard_count=jax.process_count())
  data_iter = iter(dataset)

  graphdef, state = init_state(config)
  parameter_overview.log_parameter_overview(
      nnx.to_pure_dict(state["params"]), msg="MM-DiT parameters", include_stats=False)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_checkpoints)
  if checkpointer.latest_step is not None:
    state, restored = checkpointer.restore(state, data_iter)
    logging.info("Resumed from step %d in %s", restored, workdir)
  start_step = int(state["step"])
  last_good = checkpointer.latest_step

  step_fn = make_train_step(config, graphdef)
  schedule = learning_rate_schedule(config)
  num_steps = config.train.num_steps
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.train.log_every_steps)
  if start_step == 0:
    writer.write_hparams(config_lib.flatten(config) | {"num_params": num_params})
  pending, pad_fractions = [], []
  t_start = time.time()
  for step in range(start_step + 1, num_steps + 1):
    with report.timed("data", wait_jax_async_dispatch=False):
      batch = next(data_iter)
    pad_fractions.append(pipeline.padding_fraction(batch))
    with report.timed("train_step", wait_jax_async_dispatch=False):
      state, metrics = step_fn(state, batch)
    pending.append(metrics)
    report(step)
    is_last = step == num_steps
    checkpoint_now = step % config.train.checkpoint_every_steps == 0 or is_last
    if step % config.train.log_every_steps == 0 or checkpoint_now:
      scalars, stacked = _mean_metrics(pending)
      if np.any(stacked["finite"] < 1.0):
        bad = step - len(pending) + 1 + int(np.argmin(stacked["finite"]))
        checkpointer.close()
        raise NonFiniteLossError(
            f"loss or gradient became NaN/inf at step {bad} (loss={scalars['loss']}); the last "
            f"good checkpoint is step {last_good} in {workdir}/checkpoints")
      scalars.pop("finite")
      scalars["learning_rate"] = float(schedule(step - 1))  # the rate the last update used
      scalars["padding_fraction"] = float(np.mean(pad_fractions))
      scalars |= {f"data/skipped_{k}": v for k, v in pipeline.skip_counts().items()}
      writer.write_scalars(step, scalars)
      pending, pad_fractions = [], []
    if checkpoint_now:
      checkpointer.save(step, state, data_iter)
      last_good = step
    if config.sample.num_videos and (step % config.train.sample_every_steps == 0 or is_last):
      with report.timed("sample"):
        sampler = sample_lib.Sampler(config, graphdef, state["ema_params"])
        sample_lib.write_training_samples(sampler, config, workdir, step, writer)
  checkpointer.close()
  writer.flush()
  logging.info("Trained %d steps in %.1f s", num_steps - start_step, time.time() - t_start)
  return state


class _QuietLibraries:
  """An absl log filter that keeps INFO lines of pfm and drops those of chatty libraries."""

  def filter(self, record) -> bool:
    return record.levelno > logging.converter.STANDARD_INFO or "orbax" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  jax.config.update("jax_threefry_partitionable", True)
  config = FLAGS.config
  train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
