"""Config validation: every check runs before anything is compiled, and names the field."""

from __future__ import annotations

import ml_collections
import numpy as np

from pfm import errors
from pfm import models
from pfm.pyramid import schedules, stages

MODES = ("autoregressive", "full_sequence")


def mode(config: ml_collections.ConfigDict) -> str:
  """``"autoregressive"`` (frame unit by frame unit with a history, Pyramidal Flow Sec. 3.3) or
  ``"full_sequence"`` (the whole clip at once, bidirectional attention)."""
  return config.get("mode", "autoregressive")


def pyramid(config: ml_collections.ConfigDict) -> stages.Pyramid:
  """The ``Pyramid`` of ``config.pyramid`` (``pfm.pyramid.stages.make_pyramid``).

  Fields: ``num_stages``; ``spatial`` (halve the resolution per stage, default True);
  ``frame_rate_schedule`` ("" none, "2", "4", "4-2", "2-4": TPDiff Table 2, coarsest jump first);
  ``partition`` ("" uniform, "1-1-1", "2-1-1", "1-1-2"); ``gamma`` (None: -1/(m - 1) per jump);
  ``diffusion`` ("flow_matching" or "ddim").
  """
  p = config.pyramid
  gamma = p.get("gamma", None)
  return stages.make_pyramid(
      p.num_stages, spatial=p.get("spatial", True),
      frame_rate_schedule=p.get("frame_rate_schedule", ""), partition=p.get("partition", ""),
      gamma=None if gamma is None else float(gamma),
      diffusion=p.get("diffusion", "flow_matching"))


def stage_windows(config: ml_collections.ConfigDict) -> np.ndarray:
  """The ``[K, 2]`` stage windows of ``config.pyramid`` (see ``pfm.pyramid.windows``)."""
  return np.asarray(pyramid(config).windows)


# Fields that count something and must be whole numbers >= 1.
POSITIVE_INT_FIELDS = (
    "data.height", "data.width", "data.num_frames", "data.frame_stride", "data.batch_size",
    "data.max_tokens", "data.max_text_tokens", "data.caption_length", "model.patch_size",
    "pyramid.num_stages", "sample.num_frames", "train.num_steps", "train.log_every_steps",
    "train.checkpoint_every_steps", "train.sample_every_steps")

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a run config for consistency.

  Raises:
    pfm.errors.ConfigError: (a ``ValueError``) with a message that names the offending
      ``config.`` field, e.g. a non-finite number (or one beyond float32, such as a learning rate
      of 1e39), a size that is not a whole number >= 1, a resolution that is not divisible by
      ``patch_size * 2^(K-1)``, stage boundaries that do not split [0, 1] into increasing
      windows, a worst-case sample that does not fit a packed row, or per-stage step lists of
      the wrong length.
  """
  try:
    check_values(config)
    _validate(config)
  except errors.ConfigError:
    raise
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e


def _check_finite(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Every float of ``config`` (nested, in sequences too) is finite in float32."""
  for key, value in config.items():
    name = f"{prefix}.{key}"
    if isinstance(value, ml_collections.ConfigDict):
      _check_finite(value, name)
      continue
    for v in (value if isinstance(value, (list, tuple)) else (value,)):
      if isinstance(v, (float, np.floating)) and not abs(v) <= _FLOAT32_MAX:
        raise errors.ConfigError(f"{name}={value}: need a finite number within float32 range "
                                 f"(|x| <= {_FLOAT32_MAX:.3g})")


def check_values(config: ml_collections.ConfigDict) -> None:
  """Field-by-field checks that need no other field: finite float32 numbers, positive sizes.

  Raises:
    pfm.errors.ConfigError: naming the field.
  """
  _check_finite(config)
  for field in POSITIVE_INT_FIELDS:
    section, key = field.split(".")
    if section not in config or key not in config[section]:
      continue
    value = config[section][key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise errors.ConfigError(f"config.{field}={value!r}: need a whole number >= 1")
  weights = config.pyramid.get("stage_weights", ())
  if not all(isinstance(w, (int, float, np.number)) and not isinstance(w, bool)
             for w in weights):
    raise errors.ConfigError(f"config.pyramid.stage_weights={weights!r}: need one number per "
                             "stage, e.g. 1,2,1")


def _validate(config: ml_collections.ConfigDict) -> None:
  from pfm.data import pipeline  # imports this module

  p = config.pyramid
  if p.num_stages < 1:
    raise ValueError(f"config.pyramid.num_stages must be >= 1, got {p.num_stages}")
  if mode(config) not in MODES:
    raise ValueError(f"config.mode={mode(config)!r} is not one of {MODES}")
  if p.get("diffusion", "flow_matching") not in schedules.DIFFUSIONS:
    raise ValueError(f"config.pyramid.diffusion={p.diffusion!r} is not one of "
                     f"{schedules.DIFFUSIONS}")
  try:
    pyr = pyramid(config)
  except ValueError as e:
    raise ValueError(f"config.pyramid (spatial / frame_rate_schedule / partition / gamma): {e}; "
                     "the windows must cover [0, 1] with s_{K-1} = 0 and e_0 = 1") from None
  if mode(config) == "autoregressive" and (max(pyr.temporal_factors) > 1
                                           or not p.get("spatial", True)):
    raise ValueError("config.pyramid.frame_rate_schedule / spatial: the autoregressive mode "
                     "uses the spatial pyramid only (its temporal pyramid is the history); set "
                     "config.mode='full_sequence' for a frame-rate pyramid")
  coarsest = pyr.spatial_factors[-1]
  factor = int(np.lcm(config.model.patch_size * coarsest, 2 * coarsest))
  for field in ("height", "width"):
    size = config.data[field]
    if size % factor:
      raise ValueError(
          f"config.data.{field}={size} is not divisible by {factor}: the coarsest stage "
          f"(1/{coarsest} of the size) must tile into model.patch_size="
          f"{config.model.patch_size} patches with 2x2 blocks")
  prediction = config.model.prediction
  native = "epsilon" if p.get("diffusion", "flow_matching") == "ddim" else "velocity"
  if prediction not in ("clean", native):
    raise ValueError(f"config.model.prediction={prediction!r}: use 'clean' or '{native}' for "
                     f"{p.get('diffusion', 'flow_matching')}")
  if p.time_distribution not in ("uniform", "logit_normal"):
    raise ValueError(f"config.pyramid.time_distribution={p.time_distribution!r}: use 'uniform' or "
                     "'logit_normal'")
  if not 0.0 <= p.history_noise_max <= 1.0:
    raise ValueError(f"config.pyramid.history_noise_max={p.history_noise_max} must be in [0, 1]")
  if config.model.variant not in models.VARIANTS:
    raise ValueError(f"config.model.variant={config.model.variant!r} is not one of "
                     f"{sorted(models.VARIANTS)}")
  if not 0.0 <= config.model.caption_dropout < 1.0:
    raise ValueError(f"config.model.caption_dropout={config.model.caption_dropout} must be in "
                     "[0, 1)")
  pipeline.check_config(config)
  step_fields = (("steps_per_stage",) if mode(config) == "full_sequence"
                 else ("first_frame_steps", "later_frame_steps"))
  for field in step_fields:
    steps = tuple(config.sample[field])
    if len(steps) != p.num_stages or min(steps) < 1:
      raise ValueError(f"config.sample.{field}={steps} must give >= 1 step for each of the "
                       f"{p.num_stages} stages")
  o = config.optimizer
  if o.learning_rate <= 0 or o.warmup_steps < 0 or not 0 <= o.ema_decay < 1:
    raise ValueError("config.optimizer: need learning_rate > 0, warmup_steps >= 0 and "
                     f"0 <= ema_decay < 1, got {o.learning_rate}, {o.warmup_steps}, {o.ema_decay}")
  for field in ("num_steps", "log_every_steps", "checkpoint_every_steps", "sample_every_steps"):
    if config.train[field] < 1:
      raise ValueError(f"config.train.{field} must be >= 1, got {config.train[field]}")
  _validate_scale_out(config)


def _validate_scale_out(config: ml_collections.ConfigDict) -> None:
  """Mesh, rules, batch split and numerics: the parts that depend on the devices of the run."""
  import jax

  from pfm import parallel

  sizes = parallel.mesh_shape(config)
  parallel.logical_rules(config)
  rows, batch_split = config.data.batch_size, sizes["data"] * sizes["fsdp"]
  microbatches = int(config.train.get("microbatches", 1))
  if microbatches < 1 or rows % microbatches:
    raise ValueError(f"config.train.microbatches={microbatches} must be >= 1 and divide "
                     f"config.data.batch_size={rows}")
  if (rows // microbatches) % batch_split:
    raise ValueError(
        f"config.data.batch_size={rows} / config.train.microbatches={microbatches} rows per "
        f"microbatch must be divisible by config.mesh data x fsdp = {batch_split}")
  from pfm.data import pipeline

  pipeline.data_shards(config, jax.process_count())
  models.attention.check_backend(config.model.attention)
  from pfm.models import mmdit

  remat = config.model.get("remat_policy", "none")
  if remat not in mmdit.REMAT_POLICY_NAMES:
    raise ValueError(f"config.model.remat_policy={remat!r} is not one of "
                     f"{mmdit.REMAT_POLICY_NAMES}")
  for field in ("dtype", "param_dtype"):
    if config.model.get(field, "float32") not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"config.model.{field}={config.model[field]!r}: use float32, bfloat16 "
                       "or float16")


def flatten(config: ml_collections.ConfigDict) -> dict[str, object]:
  """``{"data.height": 64, ...}`` with sequences as strings: hyper-parameters for TensorBoard."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat |= {f"{key}.{k}": v for k, v in flatten(value).items()}
    else:
      flat[key] = str(tuple(value)) if isinstance(value, (list, tuple)) else value
  return flat
