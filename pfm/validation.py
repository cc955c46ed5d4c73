"""Config validation: every check runs before anything is compiled, and names the field.

``validate(config)`` resolves the run spec (``pfm.spec.resolve``: each field on its own) and then
checks the fields against each other, against the data pipeline (``pfm.data.pipeline.check_spec``)
and against the devices of the run (mesh, logical rules, batch split, attention backend). The
commands call it first; nothing imports this module back.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from pfm import errors
from pfm import models
from pfm import parallel
from pfm import spec as spec_lib
from pfm.data import pipeline
from pfm.pyramid import diffusions


def validate(config: ml_collections.ConfigDict | spec_lib.RunSpec) -> spec_lib.RunSpec:
  """Checks a run config for consistency and returns its `RunSpec`.

  Raises:
    pfm.errors.ConfigError: (a ``ValueError``) with a message that names the offending
      ``config.`` field, e.g. a non-finite number (or one beyond float32, such as a learning rate
      of 1e39), a size that is not a whole number >= 1, a resolution that is not divisible by
      ``patch_size * 2^(K-1)``, stage boundaries that do not split [0, 1] into increasing
      windows, a worst-case sample that does not fit a packed row, or per-stage step lists of
      the wrong length.
  """
  try:
    spec = spec_lib.resolve(config)
    _check_fields(spec)
    pipeline.check_spec(spec)
    _check_scale_out(spec)
  except errors.ConfigError:
    raise
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e
  return spec


def _check_fields(spec: spec_lib.RunSpec) -> None:
  c, pyr = spec.config, spec.pyramid
  p = c.pyramid
  if spec.mode == "autoregressive" and (max(pyr.temporal_factors) > 1 or not p.spatial):
    raise ValueError("config.pyramid.frame_rate_schedule / spatial: the autoregressive mode "
                     "uses the spatial pyramid only (its temporal pyramid is the history); set "
                     "config.mode='full_sequence' for a frame-rate pyramid")
  if spec.mode == "full_sequence":
    for field, value in (("pyramid.compress_history", p.compress_history),
                         ("model.blockwise_causal", c.model.blockwise_causal)):
      if not value:
        raise ValueError(f"config.{field}=False applies to the autoregressive mode only (a "
                         "full-sequence clip has no history and is one attention block)")
  coarsest = pyr.spatial_factors[-1]
  factor = int(np.lcm(c.model.patch_size * coarsest, 2 * coarsest))
  f_s = c.latent.spatial_compression if spec.latent else 1
  for field, size in zip(("height", "width"), spec.frame_shape[:2]):
    if c.data[field] % f_s:
      raise ValueError(f"config.data.{field}={c.data[field]} is not divisible by the VAE's "
                       f"spatial compression config.latent.spatial_compression={f_s}")
    if size % factor:
      raise ValueError(
          f"config.data.{field}={c.data[field]}" + (f" (latent {size})" if spec.latent else "")
          + f" is not divisible by {factor * f_s}: the coarsest stage "
          f"(1/{coarsest} of the size) must tile into model.patch_size="
          f"{c.model.patch_size} patches with 2x2 blocks")
  prediction = c.model.prediction
  native = diffusions.get(p.diffusion).native_prediction
  if prediction not in ("clean", native):
    raise ValueError(f"config.model.prediction={prediction!r}: use 'clean' or '{native}' for "
                     f"{p.diffusion}")
  if p.time_distribution not in ("uniform", "logit_normal"):
    raise ValueError(f"config.pyramid.time_distribution={p.time_distribution!r}: use 'uniform' or "
                     "'logit_normal'")
  if not 0.0 <= p.history_noise_max <= 1.0:
    raise ValueError(f"config.pyramid.history_noise_max={p.history_noise_max} must be in [0, 1]")
  if not 0.0 <= c.model.caption_dropout < 1.0:
    raise ValueError(f"config.model.caption_dropout={c.model.caption_dropout} must be in "
                     "[0, 1)")
  step_fields = (("steps_per_stage",) if spec.mode == "full_sequence"
                 else ("first_frame_steps", "later_frame_steps"))
  for field in step_fields:
    steps = getattr(spec, field)
    if len(steps) != p.num_stages or min(steps) < 1:
      raise ValueError(f"config.sample.{field}={steps} must give >= 1 step for each of the "
                       f"{p.num_stages} stages")
  o = c.optimizer
  if o.learning_rate <= 0 or o.warmup_steps < 0 or not 0 <= o.ema_decay < 1:
    raise ValueError("config.optimizer: need learning_rate > 0, warmup_steps >= 0 and "
                     f"0 <= ema_decay < 1, got {o.learning_rate}, {o.warmup_steps}, {o.ema_decay}")


def _check_scale_out(spec: spec_lib.RunSpec) -> None:
  """Mesh, rules, batch split and numerics: the parts that depend on the devices of the run."""
  c = spec.config
  sizes = parallel.mesh_shape(c)
  parallel.logical_rules(c)
  rows, batch_split = c.data.batch_size, sizes["data"] * sizes["fsdp"]
  microbatches = c.train.microbatches
  if microbatches < 1 or rows % microbatches:
    raise ValueError(f"config.train.microbatches={microbatches} must be >= 1 and divide "
                     f"config.data.batch_size={rows}")
  if (rows // microbatches) % batch_split:
    raise ValueError(
        f"config.data.batch_size={rows} / config.train.microbatches={microbatches} rows per "
        f"microbatch must be divisible by config.mesh data x fsdp = {batch_split}")
  pipeline.data_shards(spec, jax.process_count())
  models.check_backend(c.model.attention)
  if c.model.remat_policy not in models.REMAT_POLICY_NAMES:
    raise ValueError(f"config.model.remat_policy={c.model.remat_policy!r} is not one of "
                     f"{models.REMAT_POLICY_NAMES}")
  if c.model.output_head not in models.OUTPUT_HEADS:
    raise ValueError(f"config.model.output_head={c.model.output_head!r} is not one of "
                     f"{models.OUTPUT_HEADS}")
  if c.model.output_head == "overlap" and c.model.patch_size % 2:
    raise ValueError(f"config.model.output_head='overlap' needs an even config.model.patch_size,"
                     f" got {c.model.patch_size}")
  for field in ("dtype", "param_dtype"):
    if c.model[field] not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"config.model.{field}={c.model[field]!r}: use float32, bfloat16 "
                       "or float16")
