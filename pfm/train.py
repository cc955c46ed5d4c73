r"""Training: ``python -m pfm.train --config=configs/default.py --workdir=runs/demo``.

The jitted train step is the pyramid maths (noise, endpoints, x̂_t, target; ``pfm.objective``) +
the MM-DiT + the loss. Around it: CLU metric writers and progress reports, orbax checkpoints that
hold the grain iterator (a restarted run resumes with the same data order), periodic sample videos,
and a stop with a clear error on a non-finite loss before any bad state is checkpointed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
from pfm import distributed
from pfm import errors
from pfm import evaluate
from pfm import objective
from pfm import parallel
from pfm import sample as sample_lib
from pfm import spec as spec_lib
from pfm import state as state_lib
from pfm import throughput
from pfm import validation
from pfm.data import pipeline
from pfm.data import video as video_lib
from pfm.metrics import digits as digits_lib

FLAGS = flags.FLAGS


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """The loss, the gradient norm or the updated state became NaN or infinite (divergence)."""


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


def _loss(params, inputs, target, weight, path, *, graphdef, obj: objective.ObjectiveConfig,
          frozen=None):
  """``(loss, per-token squared error)`` of the model on a corrupted packed batch.

  ``frozen``: a LoRA run's base weights (``params`` are then its adapters), else None.
  """
  model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
  prediction = objective.to_target(model(*inputs), inputs[0], path, obj)
  return objective.weighted_mse(prediction, target, weight)


def checkpoint_loss(params, rng, step, batch, frozen=None, *, graphdef,
                    obj: objective.ObjectiveConfig):
  """The loss of (updated) ``params`` on ``batch`` with fresh noise: one forward pass.

  Run before a checkpoint is written: parameters that are finite but diverged (e.g. 1e30 after
  an absurd learning rate) give a non-finite loss here, and are not saved.

  Returns:
    float32 scalar.
  """
  key = jax.random.fold_in(jax.random.fold_in(rng, step), 0x636B7074)  # its own noise stream
  inputs, target, weight, path = objective.corrupt_packed_batch(key, batch, obj)
  return _loss(params, inputs, target, weight, path, graphdef=graphdef, obj=obj,
               frozen=frozen)[0]


def loss_and_grads(params, batch, key, *, graphdef, obj: objective.ObjectiveConfig,
                   microbatches: int = 1, frozen=None):
  """The loss of a packed batch and its gradient with respect to ``params``.

  With ``microbatches = m > 1`` the gradient is accumulated (float32, `jax.lax.scan`) over m
  microbatches of ``B / m`` rows, so activations are held for one microbatch at a time. The noise,
  times and per-token loss weights are drawn once for the whole batch before the split, and the
  loss is a weighted sum whose weights are normalised over the whole batch, so the accumulated
  loss and gradient equal the large batch's up to float summation order.

  Args:
    params: the trained parameters (`nnx.State`): all of the model's, or a LoRA run's adapters.
    batch: the packed batch (``pfm.data.pipeline``), rows ``B`` divisible by ``microbatches``.
    key: the step's PRNG key (noise, times, caption dropout).
    frozen: a LoRA run's base weights (no gradient is taken for them), else None.

  Returns:
    ``(loss, err, weight, grads)``: the scalar loss, the per-token squared error and loss weight
    ``[B, L]``, and the gradient (same structure as ``params``).
  """
  inputs, target, weight, path = objective.corrupt_packed_batch(key, batch, obj)
  loss_fn = functools.partial(_loss, graphdef=graphdef, obj=obj, frozen=frozen)
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


def train_step(state, batch, frozen=None, *, graphdef, tx, obj: objective.ObjectiveConfig,
               ema_decay: float, num_stages: int, microbatches: int = 1):
  """One optimisation step on a packed batch (`loss_and_grads`, AdamW, EMA). Pure; jit it with
  ``donate_argnums=0``.

  ``frozen``: a LoRA run's base weights (``pfm.state.read_lora_base``; the state then holds the
  adapters, the only parameters optimised, averaged and checkpointed), else None.

  Returns:
    ``(new_state, metrics)``; metrics are scalars: ``loss``, ``loss_stage{k}``, ``grad_norm``,
    ``finite`` (1.0 when the loss, the gradients and the updated parameters are finite).
  """
  key = jax.random.fold_in(state["rng"], state["step"])
  loss, err, weight, grads = loss_and_grads(
      state["params"], batch, key, graphdef=graphdef, obj=obj, microbatches=microbatches,
      frozen=frozen)
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
  stage = batch.stage
  for k in range(num_stages):
    w = weight * (stage == k)
    metrics[f"loss_stage{k}"] = jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1e-12)
  return new_state, metrics


def make_train_step(spec: spec_lib.RunSpec, graphdef, state_shardings=None):
  """The jitted `train_step` of a run spec (state donated): ``step_fn(state, batch[, frozen])``.

  Args:
    state_shardings: the state's shardings (`pfm.parallel.named_shardings`) to keep the new state
      in the same layout, or None (single device, or let XLA choose).
  """
  step = functools.partial(
      train_step, graphdef=graphdef, tx=state_lib.create_optimizer(spec), obj=spec.objective,
      ema_decay=float(spec.config.optimizer.ema_decay), num_stages=spec.num_stages,
      microbatches=spec.config.train.microbatches)
  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, None))


def _write_config(spec: spec_lib.RunSpec, workdir: str) -> None:
  """``workdir/config.json``: the complete config (optional fields filled in)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(spec.config.to_json_best_effort(indent=2))


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
  done = (epath.Path(workdir) / "samples" / f"step_{step:07d}" / evaluate.METRICS_FILE).exists()
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


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the loop of one run works with, built once by `train_and_evaluate`."""
  spec: spec_lib.RunSpec
  workdir: str
  mesh: jax.sharding.Mesh
  rules: tuple
  graphdef: nnx.GraphDef
  shardings: object
  checkpointer: checkpointing.Checkpointer
  writer: object
  num_params: int


def train_and_evaluate(config: ml_collections.ConfigDict | spec_lib.RunSpec, workdir: str, *,
                       resume_step: int | None = None):
  """Trains (or resumes) the run in ``workdir``; returns the final train state.

  Args:
    config: the run config (validated first), or its validated `pfm.spec.RunSpec`.
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
  from clu import metric_writers, parameter_overview  # CLU's writers import TensorFlow

  spec = validation.validate(config)
  config = spec.config
  mesh = parallel.create_mesh(config)
  rules = parallel.logical_rules(config)
  workdir = resolve_workdir(workdir)
  _write_config(spec, workdir)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  logging.info("Mesh %s over %d devices of %d processes (%s).", dict(mesh.shape),
               jax.device_count(), jax.process_count(), jax.devices()[0].device_kind)

  data_iter = pipeline.ProcessBatches(
      spec, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())

  graphdef, state, shardings = state_lib.create_sharded_state(spec, mesh, rules)
  parallel.check_sharding(state, mesh, rules)
  parameter_overview.log_parameter_overview(
      nnx.to_pure_dict(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    state["params"])),
      msg="MM-DiT parameters" if spec.lora is None else "LoRA adapters", include_stats=False)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_checkpoints)
  run = _Run(spec=spec, workdir=workdir, mesh=mesh, rules=rules, graphdef=graphdef,
             shardings=shardings, checkpointer=checkpointer, writer=writer,
             num_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"])))
  failed = True
  try:
    state = _train_loop(run, state, data_iter, resume_step)
    failed = False
  finally:
    checkpointer.close(check=not failed)
    writer.flush()
  return state


IMAGES_WRITTEN = 4  # samples shown as frame strips in TensorBoard at each sample step


def write_training_samples(sampler: sample_lib.Sampler, records: list[dict], workdir: str,
                           step: int, writer, classifier=None) -> dict:
  """Samples the captions of ``records`` (``pfm.evaluate.evaluation_records``) and scores them
  (``pfm.evaluate.score``).

  Writes ``workdir/samples/step_N/sample_i.mp4``, the first frame strips and the ``eval/...``
  scalars to the metric writer, and ``metrics.json`` beside the videos (last, so its presence
  marks the step's samples complete).
  """
  videos = evaluate.generate(sampler, records)
  result = evaluate.score(sampler.spec, records, videos, classifier=classifier)
  out_dir = os.path.join(workdir, "samples", f"step_{step:07d}")
  if jax.process_index() == 0:
    for n, frames in enumerate(videos):
      video_lib.write_mp4(os.path.join(out_dir, f"sample_{n}.mp4"), frames)
    (epath.Path(out_dir) / evaluate.METRICS_FILE).write_text(json.dumps(result, indent=2))
    writer.write_images(step, {f"samples/{n}": np.concatenate(list(v), axis=1)[None]
                               for n, v in enumerate(videos[:IMAGES_WRITTEN])})
    writer.write_scalars(step, evaluate.scalars(result))
  logging.info("Step %d samples (%s) in %s", step, evaluate.summary(result), out_dir)
  return result


def initialise_from(spec: spec_lib.RunSpec, state, source: str):
  """``state`` with the parameters of another run (``config.train.init_from``): the EMA
  parameters of the newest intact checkpoint of the pfm workdir ``source`` (merged, for a LoRA
  run) become both the parameters and the EMA of step 0; the optimizer state stays fresh
  (fine-tuning).

  Raises:
    pfm.errors.ConfigError: naming ``config.train.init_from`` when ``source`` is not a workdir or
      its model's parameters differ from this run's (the first differing one named).
    pfm.checkpointing.CheckpointError: if ``source`` has no intact checkpoint.
  """
  params, step = state_lib.read_ema_params(state["ema_params"], source)
  logging.info("Initialised from the EMA parameters of step %d of %s", step, source)
  return dict(state, params=params, ema_params=jax.tree.map(jnp.copy, params))


def _train_loop(run: _Run, state, data_iter, resume_step: int | None):
  """The loop of `train_and_evaluate`: restore, steps, checks, checkpoints, samples."""
  from clu import periodic_actions  # imports TensorFlow

  spec, config, workdir, mesh, rules = run.spec, run.spec.config, run.workdir, run.mesh, run.rules
  checkpointer, writer = run.checkpointer, run.writer
  if (config.train.init_from and spec.lora is None and resume_step is None
      and not checkpointer.steps):
    state = initialise_from(spec, state, config.train.init_from)
  state, restored = _restore(checkpointer, state, data_iter, resume_step)
  if restored is not None:
    parallel.check_sharding(state, mesh, rules)
    logging.info("Resumed from step %d in %s", restored, workdir)
  frozen, base_step = _read_lora_base(run, restored)
  start_step = int(state["step"])
  last_good = restored

  step_fn = make_train_step(spec, run.graphdef, run.shardings)
  loss_after_update = jax.jit(functools.partial(checkpoint_loss, graphdef=run.graphdef,
                                                obj=spec.objective))
  learning_rate = state_lib.learning_rate_schedule(spec)
  num_steps = config.train.num_steps
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.train.log_every_steps)
  if start_step == 0:
    writer.write_hparams(spec_lib.flatten(config) | {"num_params": run.num_params})

  def is_sample_step(step):
    return config.sample.num_videos and (
        step % config.train.sample_every_steps == 0 or step == num_steps)

  @functools.cache
  def sample_records():  # read and probed once, at the first sample step
    return evaluate.evaluation_records(spec, config.sample.num_videos)

  @functools.cache
  def classifier():  # Moving Digits: the digit reader, cached in the workdir
    if not evaluate.is_moving_digits(spec):
      return None
    return digits_lib.load_or_train(os.path.join(workdir, digits_lib.FILENAME),
                                    evaluate.classifier_settings(spec))

  sample_seconds = 0.0

  def write_samples(step, state):
    nonlocal sample_seconds
    t0 = time.time()
    with report.timed("sample"):
      graphdef, params = run.graphdef, state["ema_params"]
      if frozen is not None:  # LoRA: the adapters merged into the base weights
        graphdef, params = state_lib.merge_lora(spec, frozen, params)
      sampler = sample_lib.Sampler(spec, graphdef, parallel.replicated(params, mesh))
      write_training_samples(sampler, sample_records(), workdir, step, writer, classifier())
    sample_seconds += time.time() - t0

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
  meter = throughput.ThroughputMeter(spec.model, num_devices=jax.local_device_count(), peak=peak)
  # Training compute so far, for metric-against-compute curves: the model FLOPs of every global
  # batch (analytic, useful FLOPs; each process counts its rows) and the loop's wall time
  # without sampling, saved with each checkpoint so that a resumed run continues the count.
  prior = checkpointer.restored_extra if restored is not None else {}
  train_flops = float(prior.get("train_flops", 0.0))
  seconds_before = float(prior.get("train_seconds", 0.0))
  t_start = t_interval = time.time()
  for step in range(start_step + 1, num_steps + 1):
    with report.timed("data", wait_jax_async_dispatch=False):
      batch = next(data_iter)
    pad_fractions.append(pipeline.padding_fraction(batch))
    train_flops += meter.add(batch)["train_useful"] * jax.process_count()
    with report.timed("train_step", wait_jax_async_dispatch=False):
      with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        device_batch = parallel.global_batch(batch, mesh)
        state, metrics = step_fn(state, device_batch, frozen)
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
      scalars["learning_rate"] = float(learning_rate(step - 1))  # the rate the last update used
      scalars["padding_fraction"] = float(np.mean(pad_fractions))
      if meter.steps:  # the metrics were fetched above: the interval's steps are done
        scalars |= meter.metrics(time.time() - t_interval)
      t_interval = time.time()
      scalars |= {f"data/skipped_{k}": v for k, v in pipeline.skip_counts().items()}
      scalars["compute/train_pflop"] = train_flops / 1e15
      scalars["compute/train_seconds"] = (
          seconds_before + time.time() - t_start - sample_seconds)
      writer.write_scalars(step, scalars)
      pending, pad_fractions = [], []
    if checkpoint_now:
      # The state itself is checked before it is saved: every value finite, and the updated
      # parameters' loss on this batch finite (one forward pass).
      state_report = checkpointing.inspect_state(state)
      with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        loss = float(loss_after_update(state["params"], state["rng"], step, device_batch,
                                       frozen))
      if state_report.num_nonfinite or not np.isfinite(loss):
        what = (f"holds {state_report.nonfinite_summary()}" if state_report.num_nonfinite
                else f"gives a loss of {loss} with its updated parameters")
        raise NonFiniteLossError(f"the train state after step {step} {what}: diverged, not "
                                 f"checkpointed; {_last_good(last_good, workdir)}")
      compute = {"train_flops": train_flops,
                 "train_seconds": seconds_before + time.time() - t_start - sample_seconds}
      if base_step is not None:
        compute[state_lib.LORA_BASE_STEP] = base_step
      _stop_on_failed_save(
          functools.partial(checkpointer.save, step, state, data_iter, report=state_report,
                            extra=compute), step)
      last_good = step
    if is_sample_step(step):
      write_samples(step, state)
  logging.info("Trained %d steps in %.1f s", num_steps - start_step, time.time() - t_start)
  return state


def _read_lora_base(run: _Run, restored: int | None):
  """``(base weights, source step)`` of a LoRA run, in the run's shardings: the EMA parameters of
  the ``train.init_from`` checkpoint its restored adapters were trained on (the newest intact one
  for a new run); ``(None, None)`` for other runs."""
  if run.spec.lora is None:
    return None, None
  extra = run.checkpointer.restored_extra if restored is not None else {}
  base, step = state_lib.read_lora_base(run.spec, extra.get(state_lib.LORA_BASE_STEP),
                                        mesh=run.mesh, rules=run.rules)
  parallel.check_sharding(base, run.mesh, run.rules)
  return base, step


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
  distributed.initialize_from_flags()
  if jax.process_index() > 0:  # one log for the run: process 0's; the others report problems
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  train_and_evaluate(config, FLAGS.workdir, resume_step=FLAGS.resume_step)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
  distributed.define_flags()
  flags.DEFINE_integer("resume_step", None,
                       "Resume from this checkpoint step (default: the newest intact one); later "
                       "checkpoints move to WORKDIR/checkpoints_set_aside/.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(errors.exit_on_user_error(main, "pfm.train"))
