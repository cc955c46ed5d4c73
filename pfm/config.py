"""Config validation: every check runs before anything is compiled, and names the field."""

from __future__ import annotations

import ml_collections

from pfm import models
from pfm.data import pipeline
from pfm.pyramid import windows as windows_lib


def stage_windows(config: ml_collections.ConfigDict):
  """The ``[K, 2]`` stage windows of ``config.pyramid`` (see ``pfm.pyramid.windows``)."""
  p = config.pyramid
  return windows_lib.stage_windows(p.num_stages, tuple(p.boundaries) or None, p.gamma)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a run config for consistency.

  Raises:
    ValueError: with a message that names the offending ``config.`` field, e.g. a resolution that
      is not divisible by ``patch_size * 2^(K-1)``, stage boundaries that do not split [0, 1] into
      increasing windows, a worst-case sample that does not fit a packed row, or per-stage step
      lists of the wrong length.
  """
  p = config.pyramid
  if p.num_stages < 1:
    raise ValueError(f"config.pyramid.num_stages must be >= 1, got {p.num_stages}")
  factor = config.model.patch_size * 2 ** (p.num_stages - 1)
  for field in ("height", "width"):
    size = config.data[field]
    if size % factor:
      raise ValueError(
          f"config.data.{field}={size} is not divisible by model.patch_size * "
          f"2^(pyramid.num_stages - 1) = {config.model.patch_size} * "
          f"{2 ** (p.num_stages - 1)} = {factor}")
  try:
    stage_windows(config)
  except ValueError as e:
    raise ValueError(f"config.pyramid.boundaries / gamma: {e}; the windows must cover [0, 1] "
                     "with s_{K-1} = 0 and e_0 = 1") from None
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
  for field in ("first_frame_steps", "later_frame_steps"):
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


def flatten(config: ml_collections.ConfigDict) -> dict[str, object]:
  """``{"data.height": 64, ...}`` with sequences as strings: hyper-parameters for TensorBoard."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat |= {f"{key}.{k}": v for k, v in flatten(value).items()}
    else:
      flat[key] = str(tuple(value)) if isinstance(value, (list, tuple)) else value
  return flat
