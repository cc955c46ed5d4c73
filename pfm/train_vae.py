r"""Trains the causal video VAE: ``python -m pfm.train_vae --config=configs/vae.py --workdir=DIR``.

The loop of `pfm.train` for the autoencoder (`pfm.models.vae.CausalVideoVAE`):

* batches of video clips and single frames (`pfm.data.clips`), the last part of every video held
  out; the losses of `pfm.vae_objective` (L1/L2 + KL, optional LPIPS and PatchGAN with the
  adaptive weight and a start step), AdamW with warm-up and cosine decay for both networks;
* data parallel over ``config.mesh`` (parameters replicated, clips sharded over the data axes),
  on one CPU or many hosts (``--coordinator_address`` / ``--num_processes`` / ``--process_id``,
  as `pfm.train`);
* CLU scalars (losses, grad norms, steps/s; held-out ``eval/psnr``, ``eval/ssim`` and the first
  frame's ``eval/psnr_image`` every ``eval_every_steps``), reconstruction strips in TensorBoard
  and as ``WORKDIR/reconstructions/step_N.png`` (rows: clip, reconstruction) and side-by-side mp4s;
* orbax checkpoints with the grain iterator state, so a killed run resumes with the same data
  order and, from the same checkpoint, the same parameters; a NaN/inf loss, gradient or state
  stops the run before anything bad is saved (`pfm.train.NonFiniteLossError`).

Writes ``WORKDIR/config.json`` and ``WORKDIR/vae.json`` (the resolved `VAEConfig`, which the
feature extractor and the sampler read to rebuild the VAE).
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
import numpy as np
import optax
from etils import epath
from flax import nnx
from ml_collections import config_flags

from pfm import checkpointing
from pfm import distributed
from pfm import errors
from pfm.latent import VAE_FILE
from pfm import parallel
from pfm import vae_objective
from pfm.data import clips as clips_lib
from pfm.data import video as video_lib
from pfm.metrics import reconstruction
from pfm.models import discriminator as disc_lib
from pfm.models import vae as vae_lib
from pfm.train import NonFiniteLossError, resolve_workdir

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class VAERun:
  """A validated VAE training config: the resolved parts of ``config``."""
  config: ml_collections.ConfigDict
  vae: vae_lib.VAEConfig
  data: clips_lib.ClipSettings
  loss: vae_objective.VAELossConfig


def vae_from_config(section: ml_collections.ConfigDict | dict) -> vae_lib.VAEConfig:
  """``config.vae`` (a ``variant`` and any `VAEConfig` field) -> the `VAEConfig`.

  Raises:
    pfm.errors.ConfigError: naming an unknown field, an unknown variant or an inconsistent one.
  """
  section = dict(section)
  fields = {f.name for f in dataclasses.fields(vae_lib.VAEConfig)}
  unknown = sorted(set(section) - fields - {"variant"})
  if unknown:
    raise errors.ConfigError(f"config.vae.{unknown[0]} is not a VAE field; known: "
                             f"variant, {', '.join(sorted(fields))}")
  variant = section.pop("variant", "tiny")
  try:
    return vae_lib.vae_config(variant, **section)
  except (KeyError, ValueError, TypeError) as e:
    raise errors.ConfigError(f"config.vae: {e}") from e


def validate(config: ml_collections.ConfigDict) -> VAERun:
  """Checks a VAE training config before anything is built; ConfigError names the field."""
  vae = vae_from_config(config.vae)
  data = clips_lib.ClipSettings(**{f.name: config.data[f.name]
                                   for f in dataclasses.fields(clips_lib.ClipSettings)})
  try:
    vae.latent_frames(data.num_frames)
  except ValueError:
    raise errors.ConfigError(
      f"config.data.num_frames={data.num_frames}: a clip for this VAE has 1 + "
      f"{vae.temporal_factor} * k frames (its temporal factor is {vae.temporal_factor})") from None
  for name in ("height", "width"):
    if data.__dict__[name] % vae.spatial_factor or data.__dict__[name] < 11:
      raise errors.ConfigError(
        f"config.data.{name}={data.__dict__[name]} must be a multiple of the VAE's spatial "
        f"factor {vae.spatial_factor} and at least 11 (the SSIM window)")
  if not 0.0 <= data.holdout_fraction < 1.0:
    raise errors.ConfigError(f"config.data.holdout_fraction={data.holdout_fraction} must be in "
                             "[0, 1)")
  n = jax.device_count()
  for name in ("batch_size", "image_batch_size"):
    value = data.__dict__[name]
    if value < (1 if name == "batch_size" else 0):
      raise errors.ConfigError(f"config.data.{name}={value} must be >= "
                               f"{1 if name == 'batch_size' else 0}")
    if value and (value * jax.process_count()) % n:
      raise errors.ConfigError(
        f"config.data.{name}={value} clips per process x {jax.process_count()} processes do "
        f"not divide over the {n} devices")
  lc = config.loss
  if lc.reconstruction not in ("l1", "l2"):
    raise errors.ConfigError(f"config.loss.reconstruction={lc.reconstruction!r}: 'l1' or 'l2'")
  if lc.perceptual_weight and not lc.perceptual_weights:
    raise errors.ConfigError(
      "config.loss.perceptual_weight > 0 needs config.loss.perceptual_weights: a converted LPIPS "
      "(VGG) weight file, or 'random' (random weights, for tests)")
  if lc.perceptual_weights not in ("", "random") and not os.path.exists(lc.perceptual_weights):
    raise errors.ConfigError(f"config.loss.perceptual_weights={lc.perceptual_weights}: no such file")
  for name in ("kl_weight", "pixel_weight", "perceptual_weight", "disc_weight", "image_weight"):
    if lc[name] < 0:
      raise errors.ConfigError(f"config.loss.{name}={lc[name]} must be >= 0")
  if config.train.num_steps < 1:
    raise errors.ConfigError(f"config.train.num_steps={config.train.num_steps} must be >= 1")
  try:
    parallel.mesh_shape(config)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e
  loss = vae_objective.VAELossConfig(
    reconstruction=lc.reconstruction, pixel_weight=float(lc.pixel_weight),
    kl_weight=float(lc.kl_weight), perceptual_weight=float(lc.perceptual_weight),
    disc_weight=float(lc.disc_weight), disc_start=int(lc.disc_start))
  return VAERun(config=config, vae=vae, data=data, loss=loss)


def optimizer(learning_rate: float, train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (the official recipe's betas, weight decay and clip) with linear warm-up and cosine
  decay to a tenth of the rate at ``train.num_steps``."""
  warmup = max(train.warmup_steps, 1)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup, max(train.num_steps, warmup + 1), end_value=learning_rate / 10)
  return optax.chain(optax.clip_by_global_norm(train.grad_clip),
                     optax.adamw(schedule, b1=train.b1, b2=train.b2,
                                 weight_decay=train.weight_decay))


class Networks(nnx.Module):
  """The trained networks: the VAE and, with ``loss.disc_weight`` > 0, the discriminator."""

  def __init__(self, run: VAERun, *, rngs: nnx.Rngs):
    self.vae = vae_lib.CausalVideoVAE(run.vae, rngs=rngs)
    lc = run.config.loss
    self.discriminator = (disc_lib.PatchDiscriminator(
      channels=lc.disc_channels, num_layers=lc.disc_layers, rngs=rngs) if lc.disc_weight else None)


def init_state(run: VAERun):
  """``(graphdefs, state)``: state = {step, rng, vae, vae_opt, disc, disc_opt} (``disc`` entries
  empty dicts without a discriminator)."""
  seed = run.config.seed
  nets = Networks(run, rngs=nnx.Rngs(seed))
  vae_def, vae_params = nnx.split(nets.vae, nnx.Param)
  state = dict(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(seed), vae=vae_params,
               vae_opt=optimizer(run.config.train.learning_rate, run.config.train).init(vae_params),
               disc={}, disc_opt={})
  disc_def = None
  if nets.discriminator is not None:
    disc_def, disc_params = nnx.split(nets.discriminator, nnx.Param)
    state["disc"] = disc_params
    state["disc_opt"] = optimizer(run.config.train.disc_learning_rate,
                                  run.config.train).init(disc_params)
  return (vae_def, disc_def), state


def perceptual_network(run: VAERun):
  """The frozen LPIPS network's (graphdef, params), or None when the perceptual term is off."""
  lc = run.config.loss
  if not lc.perceptual_weight:
    return None
  net = disc_lib.LPIPS(rngs=nnx.Rngs(run.config.seed + 1))
  if lc.perceptual_weights != "random":
    net.load(lc.perceptual_weights)
  return nnx.split(net, nnx.Param)


def train_step(state, batch, lpips_params, *, graphdefs, lpips_def, run: VAERun):
  """One step of both networks. Pure; jit with ``donate_argnums=0``.

  Returns ``(new_state, metrics)``: video_/image_ loss parts, ``grad_norm``, discriminator terms,
  and ``finite`` (1.0 when every loss, gradient and updated parameter is finite).
  """
  vae_def, disc_def = graphdefs
  config, loss_config = run.config, run.loss
  step = state["step"] + 1
  key = jax.random.fold_in(state["rng"], state["step"])
  perceptual = nnx.merge(lpips_def, lpips_params) if lpips_def is not None else None
  disc = nnx.merge(disc_def, state["disc"]) if disc_def is not None else None
  parts = [("video", batch["video"], 1.0)]
  if "image" in batch:
    parts.append(("image", batch["image"], float(config.loss.image_weight)))

  def vae_loss(params):
    vae = nnx.merge(vae_def, params)
    conv_out = vae.decoder.conv_out
    total, metrics, recons = 0.0, {}, {}
    for i, (name, x, weight) in enumerate(parts):
      posterior = vae.encode(x)
      z = posterior.sample(jax.random.fold_in(key, i))
      features = vae.decoder.features(z, vae_lib.TemporalContext())
      loss, m = vae_objective.generator_loss(
        x, features, conv_out.apply_kernel, conv_out.conv.kernel[...], posterior.kl(), step,
        loss_config, perceptual=perceptual, discriminator=disc)
      total = total + weight * loss
      metrics |= {f"{name}_{k}": v for k, v in m.items()}
      recons[name] = conv_out.apply_kernel(features, conv_out.conv.kernel[...])
    return total, (metrics, recons)

  (loss, (metrics, recons)), grads = jax.value_and_grad(vae_loss, has_aux=True)(state["vae"])
  tx = optimizer(config.train.learning_rate, config.train)
  updates, vae_opt = tx.update(grads, state["vae_opt"], state["vae"])
  vae_params = optax.apply_updates(state["vae"], updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = dict(state, step=step, vae=vae_params, vae_opt=vae_opt)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
  if disc is not None:
    def d_loss(params):
      d = nnx.merge(disc_def, params)
      total, out = 0.0, {}
      for name, x, weight in parts:
        loss, m = vae_objective.discriminator_loss(x, recons[name], step, loss_config, d)
        total = total + weight * loss
        out |= {f"{name}_{k}": v for k, v in m.items()}
      return total, out

    (dl, dm), dgrads = jax.value_and_grad(d_loss, has_aux=True)(state["disc"])
    dtx = optimizer(config.train.disc_learning_rate, config.train)
    dupdates, disc_opt = dtx.update(dgrads, state["disc_opt"], state["disc"])
    new |= dict(disc=optax.apply_updates(state["disc"], dupdates), disc_opt=disc_opt)
    metrics |= dm | {"disc_grad_norm": optax.global_norm(dgrads)}
    finite &= jnp.isfinite(dl) & jnp.isfinite(optax.global_norm(dgrads))
  finite &= jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new)
                                 if jnp.issubdtype(p.dtype, jnp.floating)]))
  metrics["finite"] = finite.astype(jnp.float32)
  return new, metrics


@functools.partial(jax.jit, static_argnums=0)
def reconstruct(vae_def, params, clips: jax.Array) -> jax.Array:
  """Posterior-mean reconstructions of clips [N, T, H, W, 3], clipped to [-1, 1] (jitted)."""
  vae = nnx.merge(vae_def, params)
  return jnp.clip(vae.decode(vae.encode(clips).mean), -1.0, 1.0)


_psnr = jax.jit(reconstruction.psnr)
_ssim = jax.jit(reconstruction.ssim)


def evaluate_reconstructions(vae_def, params, clips: np.ndarray, *, batch_size: int = 2
                             ) -> tuple[dict[str, float], np.ndarray]:
  """Held-out PSNR (dB) and SSIM, mean over frames and clips, and the first frame's PSNR.

  Returns ``(scalars, reconstructions [N, T, H, W, 3] float32)``.
  """
  recons = np.concatenate([
    np.asarray(reconstruct(vae_def, params, jnp.asarray(clips[i:i + batch_size])))
    for i in range(0, len(clips), batch_size)])
  psnr = np.asarray(_psnr(clips, recons))
  ssim = np.asarray(_ssim(clips, recons))
  return {"eval/psnr": float(psnr.mean()), "eval/ssim": float(ssim.mean()),
          "eval/psnr_image": float(psnr[:, 0].mean())}, recons


def write_reconstructions(workdir: str, step: int, clips: np.ndarray, recons: np.ndarray,
                          writer=None) -> None:
  """``reconstructions/step_N.png`` (per clip a row of its frames, then one of the
  reconstruction) and ``reconstructions/step_N_i.mp4`` (clip | reconstruction side by side)."""
  folder = os.path.join(workdir, "reconstructions")
  rows = []
  for clip, recon in zip(clips, recons):
    rows += [video_lib.to_uint8(clip), video_lib.to_uint8(recon)]
  video_lib.write_frame_grid(os.path.join(folder, f"step_{step:07d}.png"), rows)
  for i, (clip, recon) in enumerate(zip(clips, recons)):
    side = np.concatenate([video_lib.to_uint8(clip), video_lib.to_uint8(recon)], axis=2)
    video_lib.write_mp4(os.path.join(folder, f"step_{step:07d}_{i}.mp4"), side)
  if writer is not None:
    strip = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    writer.write_images(step, {"reconstructions": strip[None]})


def save_vae_config(workdir: str, vae: vae_lib.VAEConfig) -> None:
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / VAE_FILE).write_text(json.dumps(dataclasses.asdict(vae), indent=2))


def latent_statistics(vae: vae_lib.CausalVideoVAE, clips: np.ndarray) -> dict[str, float]:
  """The latent normalisation constants of a trained VAE, measured on pixel clips
  [N, T, H, W, 3]: shift = mean and scale = 1 / std of the posterior means, for the first latent
  frame (the image constants) and the later ones (the video constants) apart, so that the DiT
  sees latents of zero mean and unit variance (as the released VAE's constants do for its data).
  """
  means = [np.asarray(vae.encode(jnp.asarray(clip[None])).mean[0]) for clip in clips]
  first = np.stack([m[:1] for m in means])
  later = np.stack([m[1:] for m in means])
  return dict(image_shift=float(first.mean()), image_scale=float(1.0 / first.std()),
              video_shift=float(later.mean()), video_scale=float(1.0 / later.std()))


def train_vae(config: ml_collections.ConfigDict, workdir: str, *, resume_step: int | None = None):
  """Trains (or resumes) the VAE run in ``workdir``; returns the final state.

  Raises:
    pfm.errors.ConfigError: for an invalid config, before anything is compiled.
    NonFiniteLossError: when a loss, gradient or the state becomes NaN/inf (nothing is saved).
  """
  from clu import metric_writers, periodic_actions  # CLU's writers import TensorFlow

  run = validate(config)
  workdir = resolve_workdir(workdir)
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  save_vae_config(workdir, run.vae)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0,
                                                asynchronous=True)
  mesh = parallel.create_mesh(config)
  records, report = clips_lib.load_records(run.data)
  if report.skipped:
    logging.warning("%s", report.summary())
  heldout = clips_lib.holdout_clips(run.data, records, config.eval.clips_per_video)
  seed = (config.seed + 1_000_003 * jax.process_index()) % 2**32
  data_iter = iter(clips_lib.vae_dataset(run.data, seed=seed, records=records))
  graphdefs, state = init_state(run)
  logging.info("VAE: %d parameters, %dx spatial, %dx temporal, %d latent channels; "
               "%d held-out clips", sum(x.size for x in jax.tree.leaves(state["vae"])),
               run.vae.spatial_factor, run.vae.temporal_factor, run.vae.latent_channels,
               len(heldout))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(state, replicated)
  lpips = perceptual_network(run)
  lpips_def, lpips_params = (lpips if lpips is not None else (None, {}))
  step_fn = jax.jit(functools.partial(train_step, graphdefs=graphdefs, lpips_def=lpips_def,
                                      run=run), donate_argnums=0,
                    out_shardings=(replicated, None))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            max_to_keep=config.train.max_checkpoints)
  failed = True
  try:
    restored = None
    if resume_step is not None or checkpointer.steps:
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
      state, restored = checkpointer.restore(target, data_iter, step=resume_step)
      logging.info("Resumed from step %d in %s", restored, workdir)
    prior = checkpointer.restored_extra if restored is not None else {}
    seconds_before = float(prior.get("train_seconds", 0.0))
    start = int(state["step"])
    num_steps = config.train.num_steps
    report_progress = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=writer, every_steps=config.train.log_every_steps)
    pending, t_start, eval_seconds = [], time.time(), 0.0
    for step in range(start + 1, num_steps + 1):
      batch = parallel.global_batch(next(data_iter), mesh)
      state, metrics = step_fn(state, batch, lpips_params)
      if pending:  # at most one step in flight: bounded memory, and truthful steps/s
        jax.block_until_ready(pending[-1])
      pending.append(metrics)
      report_progress(step)
      is_last = step == num_steps
      checkpoint_now = step % config.train.checkpoint_every_steps == 0 or is_last
      if step % config.train.log_every_steps == 0 or checkpoint_now:
        stacked = {k: np.stack([np.asarray(m[k]) for m in pending]) for k in pending[0]}
        if np.any(stacked["finite"] < 1.0):
          bad = step - len(pending) + 1 + int(np.argmin(stacked["finite"]))
          last = checkpointer.latest_step
          raise NonFiniteLossError(
            f"loss, gradient or parameters became NaN/inf at step {bad} "
            f"(loss={float(np.mean(stacked['loss'])):.4g}); "
            + (f"the last good checkpoint is step {last} in {workdir}/checkpoints"
               if last else f"no checkpoint was written in {workdir}/checkpoints"))
        scalars = {k: float(np.mean(v)) for k, v in stacked.items() if k != "finite"}
        scalars["train_seconds"] = seconds_before + time.time() - t_start - eval_seconds
        writer.write_scalars(step, scalars)
        pending = []
      if step % config.train.eval_every_steps == 0 or is_last:
        t0 = time.time()
        with report_progress.timed("eval"):
          scores, recons = evaluate_reconstructions(graphdefs[0], state["vae"], heldout)
        writer.write_scalars(step, scores)
        if jax.process_index() == 0:
          n = config.eval.videos_written
          write_reconstructions(workdir, step, heldout[:n], recons[:n], writer)
        eval_seconds += time.time() - t0
      if checkpoint_now:
        state_report = checkpointing.inspect_state(state)
        if state_report.num_nonfinite:
          raise NonFiniteLossError(f"the train state after step {step} holds "
                                   f"{state_report.nonfinite_summary()}: not checkpointed")
        checkpointer.save(step, state, data_iter, report=state_report, extra={
          "train_seconds": seconds_before + time.time() - t_start - eval_seconds})
    logging.info("Trained %d steps in %.1f s", num_steps - start, time.time() - t_start)
    if config.eval.latent_statistics_batches:
      stats_iter = iter(clips_lib.vae_dataset(run.data, seed=seed + 7, records=records))
      batches = [next(stats_iter)["video"] for _ in range(config.eval.latent_statistics_batches)]
      vae = nnx.merge(graphdefs[0], state["vae"])
      normalization = latent_statistics(vae, np.concatenate(batches))
      save_vae_config(workdir, dataclasses.replace(run.vae, **normalization))
      logging.info("Latent normalisation of %d training clips: %s", sum(map(len, batches)),
                   normalization)
    failed = False
  finally:
    checkpointer.close(check=not failed)
    writer.flush()
  return state


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  jax.config.update("jax_threefry_partitionable", True)
  distributed.initialize_from_flags()
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)
  train_vae(FLAGS.config, FLAGS.workdir, resume_step=FLAGS.resume_step)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "VAE training config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reconstructions.")
  distributed.define_flags()
  flags.DEFINE_integer("resume_step", None, "Resume from this checkpoint step.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(errors.exit_on_user_error(main, "pfm.train_vae"))
