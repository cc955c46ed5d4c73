"""The resolved run spec: everything a run derives from its config, built once by `resolve`.

A run config (``configs/*.py``, ``workdir/config.json``) is a tree of plain fields. `resolve`
checks each field on its own (finite float32 numbers, whole-number sizes), fills the optional
fields that older workdirs lack from one table (`OPTIONAL_FIELDS`), and builds the objects every
layer needs: the pyramid (``pfm.pyramid.stages``), the MM-DiT config, the objective config and the
sampling steps per stage. The data pipeline, the train step, the sampler and the benchmarks take
the `RunSpec`; none rebuilds any of it. Checks that relate fields to each other (and to the
devices of the run) are in ``pfm.validation``, which returns the spec of a valid config.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath
import ml_collections
import numpy as np

from pfm import errors
from pfm import lora as lora_lib
from pfm import models
from pfm import objective
from pfm.pyramid import diffusions, stages

MODES = ("autoregressive", "full_sequence")

# Fields a config may leave out (configs written before the field existed): value when absent.
# The only place these defaults live; code reads the resolved fields, never ``.get``.
OPTIONAL_FIELDS: dict[str, Any] = {
    "mode": "autoregressive",
    "data.num_shards": 0,             # 0: one shard per process
    "data.num_threads": 2,            # threads making samples in each process
    "data.num_packing_bins": 0,       # rows packed at once; 0: 4 * batch_size
    "data.dataset": "",               # "": the manifest; "moving_digits"
    "data.moving_digits.num_clips": 1000,
    "data.moving_digits.max_digits": 2,
    "data.moving_digits.digit_size": 0,  # 0: half the frame height
    "data.moving_digits.speed": 1,
    "data.moving_digits.seed": 0,
    "pyramid.spatial": True,
    "pyramid.frame_rate_schedule": "",
    "pyramid.partition": "",
    "pyramid.correlation": None,      # None: the smallest valid correlation per jump
    "pyramid.diffusion": "flow_matching",
    "pyramid.align_noise": False,
    "pyramid.coupled_noise": True,
    "pyramid.compress_history": True,
    "model.blockwise_causal": True,
    "model.architecture": {},         # MMDiTConfig fields over the variant's (pfm.convert)
    "pyramid.timesteps": "noise_level",  # or "released": the model's stage-unique time ranges
    "sample.renoise": True,
    "sample.time_grid": "uniform",    # or "released": N - 1 even steps, then one of 0.001
    "sample.prompt_suffix": "",
    "text.clip_projection": True,
    "text.null_caption": "zeros",     # frozen encoders' null caption; "encoded": of "" (released)
    "sample.negative_prompt": "",     # the unconditional caption of guidance; "": the null one     # the CLIP towers' projected pooled state (SD3); False: FLUX
    "pyramid.stage_consistent_rope": True,
    "pyramid.stage_weights": (),      # checked against num_stages in pfm.validation
    "model.text_time_conditioning": True,
    "model.param_dtype": "float32",
    "model.scan_layers": False,
    "model.remat_policy": "none",
    "model.output_head": "patch",
    "train.microbatches": 1,
    "train.init_from": "",            # a pfm workdir whose EMA parameters start this run
    "train.inherit": False,           # take the model's fields from init_from (INHERITED_FIELDS)
    "train.lora.rank": 0,             # LoRA adapters' rank; 0: train every weight
    "train.lora.alpha": 8.0,          # their scale is alpha / rank
    "train.lora.targets": ("attention", "mlp"),  # pfm.lora.TARGETS names or module-path regexes
    "sample.steps_per_stage": (),     # full sequence; (): sample.total_steps split by partition
    "sample.total_steps": 30,
    # Latent space (configs/latent.py): "" trains on pixels; a pfm.extract folder trains on its
    # cached VAE latents and caption features, whose geometry the latent.* fields state.
    "data.features": "",
    "latent.vae": "",                   # the pfm.train_vae workdir (pfm.extract, pfm.sample)
    "latent.channels": 0,               # latent channels C of the VAE
    "latent.spatial_compression": 1,    # f_s: a latent pixel covers f_s x f_s pixels
    "latent.temporal_compression": 1,   # f_t: latent frame j >= 1 covers f_t pixel frames
    "latent.encode_window": 0,          # pfm.extract / image-to-video: causal chunk, 0 = whole
    "latent.decode_window": 0,          # sampling: latent frames per causal decode chunk
    "text.encoder": "byte",             # byte | t5 | t5_clip (frozen, cached by pfm.extract)
    "text.t5": "",                      # Hugging Face folder of a T5 v1.1 encoder
    "text.clip": (),                    # Hugging Face folders of CLIP text towers (pooled)
    "text.max_length": 128,             # T5 tokens per caption
    "model.text_embed_dim": 0,          # E of cached caption features; 0: the byte encoder
    "model.pooled_embed_dim": 0,        # Ep of a cached pooled embedding; 0: none
    "extract.clip_hop": 8,              # source frames between the starts of extracted clips
    "extract.batch_size": 4,            # clips encoded at once
    "extract.records_per_shard": 64,    # manifest records per array_record shard
}

TEXT_ENCODERS = ("byte", "t5", "t5_clip")

# Fields that count something and must be whole numbers >= 1.
POSITIVE_INT_FIELDS = (
    "data.height", "data.width", "data.num_frames", "data.frame_stride", "data.batch_size",
    "data.max_tokens", "data.max_text_tokens", "data.caption_length", "model.patch_size",
    "pyramid.num_stages", "sample.num_frames", "sample.total_steps", "train.num_steps",
    "train.log_every_steps", "train.checkpoint_every_steps", "train.sample_every_steps")

_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A run config with everything derived from it (hashable: jit may close over it).

  Attributes:
    config: the complete config, frozen (every optional field present): data, optimizer, train,
      sample, mesh and the raw pyramid/model fields.
    mode: ``"autoregressive"`` (frame unit by frame unit with a history, Pyramidal Flow Sec. 3.3)
      or ``"full_sequence"`` (the whole clip at once, bidirectional attention).
    pyramid: the stages (windows, spatial and frame-rate factors, jump correlations, diffusion).
    model: the MM-DiT's hyper-parameters (``config.model`` over its size preset).
    objective: the training objective's static settings.
    steps_per_stage: full-sequence sampling steps of each stage, coarsest first.
    first_frame_steps: autoregressive Euler steps per stage for the first frame unit.
    later_frame_steps: autoregressive Euler steps per stage for later units.
    lora: the LoRA adapters a run trains on the frozen weights of ``train.init_from``
      (``train.lora.rank > 0``), or None: every weight is trained.
  """

  config: ml_collections.FrozenConfigDict
  mode: str
  pyramid: stages.Pyramid
  model: models.MMDiTConfig
  objective: objective.ObjectiveConfig
  steps_per_stage: tuple[int, ...]
  first_frame_steps: tuple[int, ...]
  later_frame_steps: tuple[int, ...]
  lora: lora_lib.LoraConfig | None = None

  @property
  def num_stages(self) -> int:
    return self.pyramid.num_stages

  @property
  def latent(self) -> bool:
    """Whether the run trains on cached VAE latents (``config.data.features``), not pixels."""
    return bool(self.config.data.features)

  @property
  def frame_shape(self) -> tuple[int, int, int]:
    """``(height, width, channels)`` of one frame unit as the tokens see it: the pixels
    ``(data.height, data.width, 3)``, or the latent frame ``(data.height / f_s, data.width / f_s,
    latent.channels)``."""
    c = self.config
    if not self.latent:
      return c.data.height, c.data.width, 3
    f = c.latent.spatial_compression
    return c.data.height // f, c.data.width // f, c.latent.channels

  def pixel_frames(self, num_units: int) -> int:
    """Pixel frames of ``num_units`` frame units: the same, or ``1 + f_t (num_units - 1)`` latent
    frames' worth (the causal VAE encodes pixel frame 0 alone)."""
    if not self.latent:
      return num_units
    return 1 + self.config.latent.temporal_compression * (num_units - 1)


def resolve(config: ml_collections.ConfigDict | RunSpec) -> RunSpec:
  """The `RunSpec` of ``config`` (a spec is returned as it is).

  Raises:
    pfm.errors.ConfigError: naming the field, for a non-finite number (or one beyond float32,
      such as a learning rate of 1e39), a size that is not a whole number >= 1, stage weights
      that are not numbers, an unknown mode, diffusion or model variant, pyramid settings
      (spatial / frame_rate_schedule / partition / correlation) that make no valid stage windows,
      or LoRA settings that cannot be used (`_lora_config`).
  """
  if isinstance(config, RunSpec):
    return config
  config = complete(config)
  check_values(config)
  c = config
  if c.mode not in MODES:
    raise errors.ConfigError(f"config.mode={c.mode!r} is not one of {MODES}")
  p = c.pyramid
  if p.diffusion not in diffusions.NAMES:
    raise errors.ConfigError(f"config.pyramid.diffusion={p.diffusion!r} is not one of "
                             f"{diffusions.NAMES}")
  try:
    pyramid = stages.make_pyramid(
        p.num_stages, spatial=p.spatial, frame_rate_schedule=p.frame_rate_schedule,
        partition=p.partition, correlation=None if p.correlation is None else float(p.correlation),
        diffusion=p.diffusion, timesteps=p.timesteps)
  except ValueError as e:
    raise errors.ConfigError(
        f"config.pyramid (spatial / frame_rate_schedule / partition / correlation): {e}; the "
        "windows must cover [0, 1] with s_{K-1} = 0 and e_0 = 1") from None
  m = c.model
  if m.variant not in models.VARIANTS:
    raise errors.ConfigError(f"config.model.variant={m.variant!r} is not one of "
                             f"{sorted(models.VARIANTS)}")
  model = models.model_config(
      m.variant, patch_size=m.patch_size, attention_backend=m.attention, dtype=m.dtype,
      param_dtype=m.param_dtype, text_time_conditioning=m.text_time_conditioning,
      scan_layers=m.scan_layers, remat_policy=m.remat_policy, output_head=m.output_head,
      **_feature_fields(c), **_architecture_fields(m))
  try:
    model.validate_options()
  except ValueError as e:
    raise errors.ConfigError(f"config.model.architecture: {e}") from None
  obj = objective.ObjectiveConfig(
      windows=pyramid.windows, timestep_windows=pyramid.timestep_windows,
      time_distribution=p.time_distribution,
      history_noise_max=float(p.history_noise_max), caption_dropout=float(m.caption_dropout),
      prediction=m.prediction, patch_size=int(m.patch_size), diffusion=pyramid.diffusion,
      spatial_jump=pyramid.spatial_factors[1] if pyramid.num_stages > 1 else 1,
      coupled_noise=bool(p.coupled_noise))
  s = c.sample
  steps = tuple(int(n) for n in s.steps_per_stage) or stages.split_steps(
      s.total_steps, p.partition, p.num_stages)
  return RunSpec(
      config=ml_collections.FrozenConfigDict(config), mode=c.mode, pyramid=pyramid, model=model,
      objective=obj, steps_per_stage=steps,
      first_frame_steps=tuple(int(n) for n in s.first_frame_steps),
      later_frame_steps=tuple(int(n) for n in s.later_frame_steps), lora=_lora_config(c))


def _lora_config(c: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
  """``config.train.lora`` resolved: None for rank 0, else the adapters' `pfm.lora.LoraConfig`.

  Raises:
    pfm.errors.ConfigError: naming the field, for a rank that is not a whole number >= 0, an
      alpha that is not > 0, LoRA without ``train.init_from`` (the weights it adapts), or targets
      that are neither `pfm.lora.TARGETS` names nor valid regexes.
  """
  lora = c.train.lora
  rank, alpha = lora.rank, lora.alpha
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
    raise errors.ConfigError(f"config.train.lora.rank={rank!r}: need a whole number >= 0 (0: no "
                             "LoRA, every weight is trained)")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not alpha > 0:
    raise errors.ConfigError(f"config.train.lora.alpha={alpha!r}: need a number > 0 (the "
                             "adapters' output is scaled by alpha / rank)")
  if rank == 0:
    return None
  if not c.train.init_from:
    raise errors.ConfigError(
        f"config.train.lora.rank={rank} adapts the weights of another run: set "
        "config.train.init_from to its workdir")
  try:
    path = lora_lib.module_path(lora.targets)
  except ValueError as e:
    raise errors.ConfigError(f"config.train.lora.targets={lora.targets!r}: {e}") from None
  return lora_lib.LoraConfig(rank=int(rank), alpha=float(alpha), module_path=path)


_ARCHITECTURE_FIELDS = frozenset(f.name for f in dataclasses.fields(models.MMDiTConfig)) - {
    "patch_size", "attention_backend", "dtype", "param_dtype", "text_time_conditioning",
    "scan_layers", "remat_policy", "output_head",  # those have their own config.model fields
    "channels", "text_embed_dim", "pooled_embed_dim", "text_depth"}  # from latent / text


def _architecture_fields(m: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config.model.architecture``: `MMDiTConfig` fields over the variant's (a converted
  released model's sizes and options, ``pfm.convert``).

  Raises:
    pfm.errors.ConfigError: naming an entry that is not an `MMDiTConfig` field (or one with its
      own ``config.model`` field).
  """
  fields = {}
  for key, value in m.architecture.items():
    if key not in _ARCHITECTURE_FIELDS:
      raise errors.ConfigError(
          f"config.model.architecture.{key} is not a field of pfm.models.MMDiTConfig (or it has "
          f"its own config.model field); known: {sorted(_ARCHITECTURE_FIELDS)}")
    fields[key] = tuple(value) if isinstance(value, list) else value
  return fields


def _feature_fields(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """The MM-DiT fields a latent / frozen-text run changes: latent channels, caption features."""
  fields = {}
  if c.data.features:
    if c.latent.channels < 1 or c.latent.spatial_compression < 1 or (
        c.latent.temporal_compression < 1):
      raise errors.ConfigError(
          f"config.data.features={c.data.features!r} needs config.latent.channels, "
          "spatial_compression and temporal_compression >= 1 (the VAE's latent geometry), got "
          f"{c.latent.channels}, {c.latent.spatial_compression}, {c.latent.temporal_compression}")
    fields["channels"] = int(c.latent.channels)
  if c.text.encoder not in TEXT_ENCODERS:
    raise errors.ConfigError(f"config.text.encoder={c.text.encoder!r} is not one of "
                             f"{TEXT_ENCODERS}")
  if c.text.encoder != "byte":
    if not c.data.features:
      raise errors.ConfigError(f"config.text.encoder={c.text.encoder!r} reads caption features "
                               "cached by pfm.extract: set config.data.features")
    if c.model.text_embed_dim < 1:
      raise errors.ConfigError(f"config.text.encoder={c.text.encoder!r} needs "
                               "config.model.text_embed_dim (the T5 width, 4096 for T5-XXL)")
    if (c.text.encoder == "t5_clip") != (c.model.pooled_embed_dim > 0):
      raise errors.ConfigError(
          f"config.model.pooled_embed_dim={c.model.pooled_embed_dim}: set it to the pooled "
          "CLIP width (2048 for CLIP-L + bigG) with text.encoder='t5_clip', and only then")
    fields.update(text_embed_dim=int(c.model.text_embed_dim), text_depth=0,
                  pooled_embed_dim=int(c.model.pooled_embed_dim) or None)
  return fields


# What a fine-tuning run takes from its source's config.json with ``train.inherit``: the fields
# that make the model and its inputs what the source's parameters were trained for.
INHERITED_FIELDS = (
    "mode", "model.variant", "model.patch_size", "model.architecture", "model.text_embed_dim",
    "model.pooled_embed_dim", "model.output_head", "model.prediction",
    "model.text_time_conditioning", "model.blockwise_causal", "model.scan_layers", "latent",
    "text", "pyramid", "extract", "data.height", "data.width", "data.frame_stride",
    "data.caption_length", "sample.time_grid", "sample.prompt_suffix", "sample.negative_prompt")


def _set_field(config, field: str, value) -> None:
  *sections, key = field.split(".")
  node = config
  for section in sections:
    if section not in node:
      node[section] = ml_collections.ConfigDict()
    node = node[section]
  node[key] = value


def _tuples(value):
  """JSON's lists as tuples, nested (ml_collections refuses to freeze a list that becomes the
  empty tuple when another field already holds it)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def inherit_from_source(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with `INHERITED_FIELDS` taken from the config.json of ``train.init_from`` (and
  its ``data.features`` where this config has none), when ``train.inherit`` is set: so
  ``--config=configs/finetune_lora.py --config.train.init_from=runs/miniflux768`` fine-tunes a
  converted released model without restating its architecture. The result has ``train.inherit``
  off (it is complete).

  Raises:
    pfm.errors.ConfigError: naming ``config.train.init_from`` when it has no config.json.
  """
  if not (config.train.get("inherit", False) and config.train.init_from):
    return config
  path = epath.Path(config.train.init_from) / "config.json"
  if not path.exists():
    raise errors.ConfigError(f"config.train.init_from={config.train.init_from!r}: no config.json "
                             "(a pfm workdir, or a pfm.convert output, is expected)")
  source = ml_collections.ConfigDict(json.loads(path.read_text()))
  for field in INHERITED_FIELDS:
    node = source
    for key in field.split("."):
      node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
    if node is not None:
      _set_field(config, field, _tuples(node.to_dict() if isinstance(
          node, ml_collections.ConfigDict) else node))
  if not config.data.get("features") and source.get("data", {}).get("features"):
    config.data.features = source.data.features
  config.train.inherit = False
  return config


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with every absent `OPTIONAL_FIELDS` entry at its default, and the
  fields a fine-tuning run inherits (`inherit_from_source`).

  Raises:
    pfm.errors.ConfigError: see `inherit_from_source`.
  """
  config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
  for field, default in OPTIONAL_FIELDS.items():
    *sections, key = field.split(".")
    node = config
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    if key not in node:
      node[key] = default
  return inherit_from_source(config)


def _check_finite(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Every float of ``config`` (nested, in sequences too) is finite in float32."""
  for key, value in config.items():
    name = f"{prefix}.{key}"
    if isinstance(value, ml_collections.ConfigDict):  # FrozenConfigDict too
      _check_finite(value, name)
      continue
    for v in (value if isinstance(value, (list, tuple)) else (value,)):
      if isinstance(v, (float, np.floating)) and not abs(v) <= _FLOAT32_MAX:
        raise errors.ConfigError(f"{name}={value}: need a finite number within float32 range "
                                 f"(|x| <= {_FLOAT32_MAX:.3g})")


def check_values(config: ml_collections.ConfigDict) -> None:
  """Field-by-field checks of a complete config (`complete`): finite float32 numbers, positive
  sizes, numeric stage weights.

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
  weights = config.pyramid.stage_weights
  if not all(isinstance(w, (int, float, np.number)) and not isinstance(w, bool)
             for w in weights):
    raise errors.ConfigError(f"config.pyramid.stage_weights={weights!r}: need one number per "
                             "stage, e.g. 1,2,1")


def flatten(config) -> dict[str, object]:
  """``{"data.height": 64, ...}`` with sequences as strings: hyper-parameters for TensorBoard."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):  # FrozenConfigDict too
      flat |= {f"{key}.{k}": v for k, v in flatten(value).items()}
    else:
      flat[key] = str(tuple(value)) if isinstance(value, (list, tuple)) else value
  return flat
