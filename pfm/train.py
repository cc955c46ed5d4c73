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
from etils import epath
from ml_collections import config_flags
import numpy as np
import optax
from flax import nnx

from pfm import checkpointing
from pfm import config as config_lib
from pfm import distributed
from pfm import errors
from pfm import models
from pfm import objective
from pfm import parallel
from pfm import throughput
from pfm.data import pipeline

FLAGS = flags.FLAGS


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """The loss, the gradient norm or the updated state became NaN or infinite (divergence)."""


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
  optional = {name: m[name] for name in _OPTIONAL_MODEL_FIELDS if name in m}
  return models.build_model(
      models.model_config(m.variant, patch_size=m.patch_size, attention_backend=m.attention,
                          dtype=m.dtype,
                          text_time_conditioning=m.get("text_time_conditioning", True),
                          **optional),
      rngs=nnx.Rngs(seed))


# ``config.model`` fields passed to `MMDiTConfig` under the same name when a config has them.
_OPTIONAL_MODEL_FIELDS = ("param_dtype", "scan_layers", "remat_policy")


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


def microbatch_split(tree, microbatches: int):
  """``[B, ...]`` leaves -> ``[microbatches, B / microbatches, ...]``; microbatch i = rows i::m.

  Strided rows keep every device busy in every microbatch: the rows are sharded over the batch
  mesh axes in contiguous blocks, and each block holds ``B / (devices * m)`` rows of each
  microbatch.
  """
  def split(x):
    x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, tree)


def microbatch_merge(x: jax.Array) -> jax.Array:
  """Inverse of `microbatch_split` for one ``[m, B / m, ...]`` array."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _loss(params, inputs, target, weight, path, *, graphdef, obj: objective.ObjectiveConfig):
  """``(loss, per-token squared error)`` of the model on a corrupted packed batch."""
  model = nnx.merge(graphdef, params)
  prediction = objective.to_target(model(**inputs), inputs, path, obj)
  return objective.weighted_mse(prediction, target, weight)


def checkpoint_loss(params, rng, step, batch, *, graphdef, obj: objective.ObjectiveConfig):
  """The loss of (updated) ``params`` on ``batch`` with fresh noise: one forward pass.

  Run before a checkpoint is written: parameters that are finite but diverged (e.g. 1e30 after
  an absurd learning rate) give a non-finite loss here, and are not saved.

  Returns:
    float32 scalar.
  """
  key = jax.random.fold_in(jax.random.fold_in(rng, step), 0x636B7074)  # its own noise stream
  inputs, target, weight, path = objective.corrupt_packed_batch(key, batch, obj)
  return _loss(params, inputs, target, weight, path, graphdef=graphdef, obj=obj)[0]


def loss_and_grads(params, batch, key, *, graphdef, obj: objective.ObjectiveConfig,
                   microbatches: int = 1):
  """The loss of a packed batch and its gradient with respect to ``params``.

  With ``microbatches = m > 1`` the gradient is accumulated (float32, `jax.lax.scan`) over m
  microbatches of ``B / m`` rows, so activations are held for one microbatch at a time. The noise,
  times and per-token loss weights are drawn once for the whole batch before the split, and the
  loss is a weighted sum whose weights are normalised over the whole batch, so the accumulated
  loss and gradient equal the large batch's up to float summation order.

  Args:
    params: the model parameters (`nnx.State`).
    batch: the packed batch (``pfm.data.pipeline``), rows ``B`` divisible by ``microbatches``.
    key: the step's PRNG key (noise, times, caption dropout).

  Returns:
    ``(loss, err, weight, grads)``: the scalar loss, the per-token squared error and loss weight
    ``[B, L]``, and the gradient (same structure as ``params``).
  """
  inputs, target, weight, path = objective.corrupt_packed_batch(key, batch, obj)
  loss_fn = functools.partial(_loss, graphdef=graphdef, obj=obj)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (loss, err), grads = grad_fn(params, inputs, target, weight, path)
    return loss, err, weight, grads

  def accumulate(carry, microbatch):
    (loss_mb, err_mb), grads_mb = grad_fn(params, *microbatch)
    loss_sum, grad_sum = carry
    return (loss_sum + loss_mb, jax.tree.map(jnp.add, grad_sum, grads_mb)), err_mb

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (loss, grads), err = jax.lax.scan(
      accumulate, (jnp.zeros((), jnp.float32), zeros),
      microbatch_split((inputs, target, weight, path), microbatches))
  return loss, microbatch_merge(err), weight, grads


def train_step(state, batch, *, graphdef, tx, obj: objective.ObjectiveConfig, ema_decay: float,
               num_stages: int, microbatches: int = 1):
  """One optimisation step on a packed batch (`loss_and_grads`, AdamW, EMA). Pure; jit it with
  ``donate_argnums=0``.

  Returns:
    ``(new_state, metrics)``; metrics are scalars: ``loss``, ``loss_stage{k}``, ``grad_norm``,
    ``finite`` (1.0 when the loss, the gradients and the updated parameters are finite).
  """
  key = jax.random.fold_in(state["rng"], state["step"])
  loss, err, weight, grads = loss_and_grads(
      state["params"], batch, key, graphdef=graphdef, obj=obj, microbatches=microbatches)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
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


def make_train_step(config, graphdef, state_shardings=None):
  """The jitted `train_step` of ``config`` (state donated).

  Args:
    state_shardings: the state's shardings (`pfm.parallel.named_shardings`) to keep the new state
      in the same layout, or None (single device, or let XLA choose).
  """
  step = functools.partial(
      train_step, graphdef=graphdef, tx=create_optimizer(config), obj=objective_config(config),
      ema_decay=float(config.optimizer.ema_decay), num_stages=config.pyramid.num_stages,
      microbatches=int(config.train.get("microbatches", 1)))
  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, None))


def create_sharded_state(config, mesh: jax.sharding.Mesh, rules):
  """The train state created directly in its sharded layout, never whole on one device.

  ``jax.eval_shape`` gives the state's structure and logical names, the rules give each array's
  sharding, and the initialiser runs jitted with those ``out_shardings``, so every device computes
  only its own shards of the random initial parameters.

  Returns:
    ``(graphdef, state, shardings)``.
  """
  graphdef, abstract = abstract_state(config)
  shardings = parallel.named_shardings(abstract, mesh, rules)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    state = jax.jit(lambda: init_state(config)[1], out_shardings=shardings)()
  return graphdef, state, shardings


def sharded_abstract_state(abstract, shardings):
  """``jax.ShapeDtypeStruct`` leaves carrying their target shardings (for a sharded restore)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _write_config(config, workdir):
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_best_effort(indent=2))


def resolve_workdir(workdir: str) -> str:
  """A local workdir made absolute; a remote one (``gs://bucket/run``) as given."""
  return workdir if "://" in workdir else os.path.abspath(workdir)


def _mean_metrics(history):
  """Per-step metric dicts -> (their means, the stacked host arrays)."""
  stacked = {name: np.stack([np.asarray(m[name]) for m in history]) for name in history[0]}
  return {name: float(np.mean(v)) for name, v in stacked.items()}, stacked


def _samples_written(workdir: str, step: int) -> bool:
  """Whether the training samples of ``step`` are complete (their score file comes last).

  Decided by process 0 and shared, so every process of a run agrees.
  """
  done = (epath.Path(workdir) / "samples" / f"step_{step:07d}" / "prompt_to_video.json").exists()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
  return done


def _restore(checkpointer: checkpointing.Checkpointer, state, data_iter,
             resume_step: int | None):
  """Resumes from ``resume_step`` or the newest intact checkpoint; sets the others aside.

  Damaged checkpoints newer than the one restored, and (with ``resume_step``) every later one,
  move to ``workdir/checkpoints_set_aside/`` so the resumed run saves its own under their steps.

  Returns:
    ``(state, restored step)``; ``(state, None)`` when there is no checkpoint yet.
  """
  if resume_step is None and not checkpointer.steps:
    return state, None
  # The fresh state's shapes and shardings are the restore target: no second abstract build.
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  state, restored = checkpointer.restore(target, data_iter, step=resume_step)
  for damaged in checkpointer.damaged:
    checkpointer.set_aside(damaged.step, "damaged")
  if resume_step is not None:
    for later in [s for s in checkpointer.steps if s > resume_step]:
      checkpointer.set_aside(later, "superseded")
  return state, restored


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       resume_step: int | None = None):
  """Trains (or resumes) the run in ``workdir``; returns the final train state.

  Args:
    config: the run config (validated first).
    workdir: checkpoints, logs and samples (local or ``gs://``).
    resume_step: resume from this checkpoint step instead of the newest intact one; later
      checkpoints are moved to ``workdir/checkpoints_set_aside/``.

  Raises:
    pfm.errors.ConfigError: for an invalid config (before anything is compiled).
    NonFiniteLossError: when the loss, the gradients or the updated state become NaN/inf, or the
      updated parameters give a non-finite loss at a checkpoint step; nothing bad is saved and
      the last checkpoint stays the last good one.
    pfm.checkpointing.CheckpointSaveError: as soon as a checkpoint fails to write (a full disk).
    pfm.checkpointing.CheckpointError: if ``resume_step`` does not exist or is damaged, or no
      checkpoint is intact.
  """
  from clu import metric_writers, parameter_overview

  config_lib.validate(config)
  mesh = parallel.create_mesh(config)
  rules = parallel.logical_rules(config)
  workdir = resolve_workdir(workdir)
  _write_config(config, workdir)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  logging.info("Mesh %s over %d devices of %d processes (%s).", dict(mesh.shape),
               jax.device_count(), jax.process_count(), jax.devices()[0].device_kind)

  data_iter = pipeline.ProcessBatches(
      config, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())

  graphdef, state, shardings = create_sharded_state(config, mesh, rules)
  parallel.check_sharding(state, mesh, rules)
  parameter_overview.log_parameter_overview(
      nnx.to_pure_dict(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    state["params"])),
      msg="MM-DiT parameters", include_stats=False)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_checkpoints)
  failed = True
  try:
    state = _train_loop(config, workdir, graphdef, state, shardings, mesh, rules, data_iter,
                        checkpointer, writer, num_params, resume_step)
    failed = False
  finally:
    checkpointer.close(check=not failed)
    writer.flush()
  return state


def _train_loop(config, workdir, graphdef, state, shardings, mesh, rules, data_iter,
                checkpointer, writer, num_params, resume_step):
  """The loop of `train_and_evaluate`: restore, steps, checks, checkpoints, samples."""
  from clu import periodic_actions
  from pfm import sample as sample_lib

  state, restored = _restore(checkpointer, state, data_iter, resume_step)
  if restored is not None:
    parallel.check_sharding(state, mesh, rules)
    logging.info("Resumed from step %d in %s", restored, workdir)
  start_step = int(state["step"])
  last_good = restored

  step_fn = make_train_step(config, graphdef, shardings)
  obj = objective_config(config)
  loss_after_update = jax.jit(functools.partial(checkpoint_loss, graphdef=graphdef, obj=obj))
  schedule = learning_rate_schedule(config)
  num_steps = config.train.num_steps
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.train.log_every_steps)
  if start_step == 0:
    writer.write_hparams(config_lib.flatten(config) | {"num_params": num_params})

  def is_sample_step(step):
    return config.sample.num_videos and (
        step % config.train.sample_every_steps == 0 or step == num_steps)

  def write_samples(step, state):
    with report.timed("sample"):
      sampler = sample_lib.Sampler(config, graphdef, parallel.replicated(state["ema_params"], mesh))
      sample_lib.write_training_samples(sampler, config, workdir, step, writer)

  # A run killed after a checkpoint but before that step's samples were written (the final
  # samples above all) writes them now.
  if restored is not None and is_sample_step(start_step) and not _samples_written(
      workdir, start_step):
    logging.info("Writing the samples of step %d, which the previous run did not finish",
                 start_step)
    write_samples(start_step, state)

  pending, pad_fractions = [], []
  # Model FLOPs of this process's rows (analytic, from the token counts of every stage and
  # history) against its devices' peak: the datasheet figure, or a matmul rate measured now.
  peak, peak_source = throughput.default_peak(config.model.dtype)
  if jax.devices()[0].platform == "cpu":  # the host's CPU devices share its cores
    peak /= jax.local_device_count()
  logging.info("MFU peak: %.1f TFLOP/s per device (%s)", peak / 1e12, peak_source)
  meter = throughput.ThroughputMeter(throughput.mmdit_config(config),
                                     num_devices=jax.local_device_count(), peak=peak)
  t_start = t_interval = time.time()
  for step in range(start_step + 1, num_steps + 1):
    with report.timed("data", wait_jax_async_dispatch=False):
      batch = next(data_iter)
    pad_fractions.append(pipeline.padding_fraction(batch))
    meter.add(batch)
    with report.timed("train_step", wait_jax_async_dispatch=False):
      with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        device_batch = parallel.global_batch(batch, mesh)
        state, metrics = step_fn(state, device_batch)
    pending.append(metrics)
    report(step)
    _stop_on_failed_save(checkpointer.check, step)  # now, not one checkpoint later
    if step == start_step + 1:  # the first step compiles: keep it out of the rates
      jax.block_until_ready(metrics)
      meter.metrics(1.0)
      t_interval = time.time()
    is_last = step == num_steps
    checkpoint_now = step % config.train.checkpoint_every_steps == 0 or is_last
    if step % config.train.log_every_steps == 0 or checkpoint_now:
      scalars, stacked = _mean_metrics(pending)
      if np.any(stacked["finite"] < 1.0):
        bad = step - len(pending) + 1 + int(np.argmin(stacked["finite"]))
        raise NonFiniteLossError(
            f"loss, gradient or parameters became NaN/inf at step {bad} "
            f"(loss={scalars['loss']:.4g}, grad_norm={scalars['grad_norm']:.4g}); "
            f"{_last_good(last_good, workdir)}")
      scalars.pop("finite")
      scalars["learning_rate"] = float(schedule(step - 1))  # the rate the last update used
      scalars["padding_fraction"] = float(np.mean(pad_fractions))
      if meter.steps:  # the metrics were fetched above: the interval's steps are done
        scalars |= meter.metrics(time.time() - t_interval)
      t_interval = time.time()
      scalars |= {f"data/skipped_{k}": v for k, v in pipeline.skip_counts().items()}
      writer.write_scalars(step, scalars)
      pending, pad_fractions = [], []
    if checkpoint_now:
      # The state itself is checked before it is saved: every value finite, and the updated
      # parameters' loss on this batch finite (one forward pass).
      state_report = checkpointing.inspect_state(state)
      with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        loss = float(loss_after_update(state["params"], state["rng"], step, device_batch))
      if state_report.num_nonfinite or not np.isfinite(loss):
        what = (f"holds {state_report.nonfinite_summary()}" if state_report.num_nonfinite
                else f"gives a loss of {loss} with its updated parameters")
        raise NonFiniteLossError(f"the train state after step {step} {what}: diverged, not "
                                 f"checkpointed; {_last_good(last_good, workdir)}")
      _stop_on_failed_save(
          functools.partial(checkpointer.save, step, state, data_iter, report=state_report), step)
      last_good = step
    if is_sample_step(step):
      write_samples(step, state)
  logging.info("Trained %d steps in %.1f s", num_steps - start_step, time.time() - t_start)
  return state


def _stop_on_failed_save(fn, step: int):
  """Runs ``fn``; a `CheckpointSaveError` is re-raised saying where training stopped."""
  try:
    return fn()
  except checkpointing.CheckpointSaveError as e:
    raise checkpointing.CheckpointSaveError(f"{e}; training stopped at step {step}") from e


def _last_good(step: int | None, workdir: str) -> str:
  if step is None:
    return f"no checkpoint was written in {workdir}/checkpoints"
  return f"the last good checkpoint is step {step} in {workdir}/checkpoints"


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  jax.config.update("jax_threefry_partitionable", True)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if jax.process_index() > 0:  # one log for the run: process 0's; the others report problems
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  train_and_evaluate(config, FLAGS.workdir, resume_step=FLAGS.resume_step)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for a multi-process run (or JAX_COORDINATOR_ADDRESS;"
                      " detected on TPU slices and under SLURM).")
  flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.DEFINE_integer("resume_step", None,
                       "Resume from this checkpoint step (default: the newest intact one); later "
                       "checkpoints move to WORKDIR/checkpoints_set_aside/.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(errors.exit_on_user_error(main, "pfm.train"))
