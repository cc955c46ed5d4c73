r"""Feature extraction: ``python -m pfm.extract --config=configs/latent.py --output=features/demo``.

Reads the run's manifest (``config.data.manifest``; "" = the default videos), cuts every video
into clips of ``1 + f_t (data.num_frames - 1)`` frames at ``data.frame_stride`` (one clip every
``extract.clip_hop`` source frames, so each clip's first frame is encoded on its own and its
first latent frame is an image unit, as the causal VAE encodes a clip), encodes them with the VAE
of ``config.latent.vae`` (a ``pfm.train_vae`` workdir) and stores the posterior mean and standard
deviation, normalised (``CausalVideoVAE.normalize``); an image becomes one latent frame. Captions
are stored as text for the byte encoder, or encoded once by the frozen encoders of
``config.text`` (T5 token features; with ``t5_clip`` also the CLIP towers' pooled, projected
outputs, concatenated, as Pyramid Flow's SD3 text encoder does). The folder layout and record
format are in ``pfm.data.features``.

Work is split into shards of ``extract.records_per_shard`` manifest records; process ``p`` of
``P`` (``jax.distributed``, as ``pfm.train``) writes shards ``p, p + P, ...``. A rerun with the
same ``--output`` skips finished shards and resumes a partial one after its last finished record;
unreadable or too-short videos are skipped and counted (in the index and the summary line).
``--config.data.features=DIR`` then trains on the cache (``pfm.data.pipeline``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import serialization
from ml_collections import config_flags
from tqdm.auto import tqdm

from pfm import distributed
from pfm import errors
from pfm import latent
from pfm import spec as spec_lib
from pfm import validation
from pfm.data import features as features_lib
from pfm.data import manifest as manifest_lib
from pfm.data import video

FLAGS = flags.FLAGS


def extraction_settings(spec: spec_lib.RunSpec, vae_config=None) -> dict[str, Any]:
  """What a feature folder is made with: a rerun must match (``features.check_settings``) and a
  training run is checked against it (``pipeline.check_features``)."""
  c = spec.config
  settings = {
      "data.manifest": os.path.abspath(c.data.manifest) if c.data.manifest else "",
      "data.height": c.data.height, "data.width": c.data.width,
      "data.num_frames": c.data.num_frames, "data.frame_stride": c.data.frame_stride,
      "pixel_frames": spec.pixel_frames(c.data.num_frames),
      "extract.clip_hop": c.extract.clip_hop,
      "extract.records_per_shard": c.extract.records_per_shard,
      "latent.vae": os.path.abspath(c.latent.vae) if c.latent.vae else "",
      "latent.channels": c.latent.channels,
      "latent.spatial_compression": c.latent.spatial_compression,
      "latent.temporal_compression": c.latent.temporal_compression,
      "text.encoder": c.text.encoder, "text.t5": c.text.t5,
      "text.clip": list(latent.clip_paths(c)),
      "text.max_length": c.text.max_length,
      "model.text_embed_dim": c.model.text_embed_dim,
      "model.pooled_embed_dim": c.model.pooled_embed_dim,
  }
  if vae_config is not None:
    settings["normalization"] = {k: getattr(vae_config, k) for k in (
        "image_shift", "image_scale", "video_shift", "video_scale")}
  return settings


@dataclasses.dataclass
class ExtractionReport:
  """What one process did: shards written and skipped as finished, clips, skipped records."""
  shards_written: int = 0
  shards_finished_before: int = 0
  clips: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)


def manifest_records(config) -> tuple[list[dict], manifest_lib.SkipReport | None]:
  """The records ``pfm.extract`` reads: ``config.data.manifest``, or the default videos."""
  if config.data.manifest:
    return manifest_lib.load_manifest(config.data.manifest)
  return manifest_lib.default_manifest(), None


def clip_starts(num_frames: int, span: int, hop: int) -> list[int]:
  """First source frames of the clips cut from a ``num_frames`` video: every ``hop`` frames while a
  clip of ``span`` source frames fits."""
  return list(range(0, num_frames - span + 1, hop))


class _Encoder:
  """The VAE's posterior of pixel clips, normalised, in fixed-size batches (one compilation)."""

  def __init__(self, vae, batch_size: int, window: int | None):
    self.vae, self.batch_size, self.window = vae, batch_size, window
    c = vae.config
    self._first = np.float32(c.image_scale)
    self._later = np.float32(c.video_scale)

  def __call__(self, clips: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """float32 pixel clips [N, T, H, W, 3] -> per clip (mean, std), float32 [T', h, w, C]."""
    out = []
    for start in range(0, len(clips), self.batch_size):
      chunk = clips[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      posterior = self.vae.encode(jnp.asarray(chunk), window=self.window)
      mean = np.asarray(self.vae.normalize(posterior.mean))
      std = np.array(posterior.std)
      std[:, :1] *= self._first
      std[:, 1:] *= self._later
      out += [(mean[i], std[i]) for i in range(len(chunk) - pad)]
    return out


class _TooShort(Exception):
  reason = "too_short"


def _record_clips(record: dict, spec: spec_lib.RunSpec) -> list[tuple[str, np.ndarray]]:
  """(source name, uint8 frames [T, H, W, 3]) of each clip of a record.

  Raises:
    video.VideoReadError: if the file cannot be decoded.
  """
  c = spec.config
  path = manifest_lib.record_path(record)
  frames = video.load_video(path, (c.data.height, c.data.width))
  if "image" in record:
    return [(f"{path}#0", frames[:1])]
  length = spec.pixel_frames(c.data.num_frames)
  span = (length - 1) * c.data.frame_stride + 1
  if len(frames) < span:
    raise _TooShort(f"{path}: decoded {len(frames)} frames, a clip needs {span}")
  return [(f"{path}#{s}", frames[s:s + span:c.data.frame_stride])
          for s in clip_starts(len(frames), span, c.extract.clip_hop)]


def extract(config, output: str, *, process_index: int | None = None,
            process_count: int | None = None, progress: bool = True) -> ExtractionReport:
  """Extracts this process's shards of the feature cache into ``output`` (see the module
  docstring); process 0 then writes ``output/index.json`` once every shard is finished.

  Raises:
    pfm.errors.ConfigError: for an invalid config (before anything is read).
    pfm.data.features.FeatureCacheError: if ``output`` holds features made with other settings.
    pfm.errors.NotAWorkdirError: if ``config.latent.vae`` is not a ``pfm.train_vae`` workdir.
  """
  config = spec_lib.complete(config)
  config.data.features = output  # the latent geometry of the run, whatever the config named
  spec = validation.validate(config)
  c = spec.config
  if not c.latent.vae:
    raise errors.ConfigError("config.latent.vae is empty: pfm.extract encodes with a "
                             "pfm.train_vae workdir")
  vae = latent.load_vae(c.latent.vae)
  for field, have in (("channels", vae.config.latent_channels),
                      ("spatial_compression", vae.config.spatial_factor),
                      ("temporal_compression", vae.config.temporal_factor)):
    if c.latent[field] != have:
      raise errors.ConfigError(f"config.latent.{field}={c.latent[field]}, but the VAE in "
                               f"{c.latent.vae} has {have}")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  features_lib.check_settings(output, extraction_settings(spec, vae.config))
  captions = latent.CaptionEncoder.from_config(c) if c.text.encoder != "byte" else None
  encoder = _Encoder(vae, c.extract.batch_size, c.latent.encode_window or None)

  records, manifest_report = manifest_records(c)
  per_shard = c.extract.records_per_shard
  num_shards = -(-len(records) // per_shard)
  root = epath.Path(output)
  report = ExtractionReport()
  if manifest_report is not None and process_index == 0:
    report.skipped = dict(manifest_report.counts)
  mine = [j for j in range(num_shards) if j % process_count == process_index]
  todo = []
  for j in mine:
    if (root / f"{features_lib.shard_name(j)}.json").exists():
      report.shards_finished_before += 1
    else:
      todo.append(j)
  total = sum(len(records[j * per_shard:(j + 1) * per_shard]) for j in todo)
  bar = tqdm(total=total, desc="records", disable=not progress, unit="rec")
  for j in todo:
    shard_records = records[j * per_shard:(j + 1) * per_shard]
    meta = _extract_shard(j, shard_records, spec, root, encoder, captions, bar)
    report.shards_written += 1
    report.clips += len(meta["clips"])
    for reason, n in meta["skipped"].items():
      report.skipped[reason] = report.skipped.get(reason, 0) + n
  bar.close()
  if jax.process_count() > 1:  # every process's shards are written before the index
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("pfm.extract: shards written")
  if process_index == 0:
    index = features_lib.write_index(output, num_shards)
    if manifest_report is not None and manifest_report.skipped:
      for reason, n in manifest_report.counts.items():
        index["skipped"][reason] = index["skipped"].get(reason, 0) + n
      features_lib.write_json_atomic(root / features_lib.INDEX_FILE, index)
    logging.info("%s: %d clips in %d shards; skipped: %s", output, index["num_clips"],
                 num_shards, index["skipped"] or "none")
  return report


def _extract_shard(j: int, records: list[dict], spec, root: epath.Path, encoder: _Encoder,
                   captions: latent.CaptionEncoder | None, bar) -> dict:
  """Writes shard ``j`` (resuming its partial folder) and returns its metadata."""
  from array_record.python import array_record_module
  name = features_lib.shard_name(j)
  partial = root / "partial" / name
  partial.mkdir(parents=True, exist_ok=True)
  for r, record in enumerate(records):
    done = partial / f"record-{r:05d}.msgpack"
    if done.exists():
      bar.update(1)
      continue
    path = manifest_lib.record_path(record)
    try:
      clips = _record_clips(record, spec)
    except (video.VideoReadError, _TooShort) as e:
      logging.warning("Skipping %s: %s", path, e)
      item = {"skipped": e.reason, "source": path, "message": str(e)}
      _write_atomic(done, serialization.msgpack_serialize({"items": [], "meta": [], **item}))
      bar.update(1)
      continue
    text = record.get("text", "")
    extra = captions([text])[0] if captions is not None else {}
    items = []
    if clips:  # the clips of one record have one length: one batch shape
      moments = encoder(np.stack([video.to_float(f) for _, f in clips]))
      items = [dict(mean=mean, std=std, text=text, source=source, **extra)
               for (source, _), (mean, std) in zip(clips, moments)]
    _write_atomic(done, serialization.msgpack_serialize({
        "items": [features_lib.encode_clip(i) for i in items],
        "meta": [dict(source=i["source"], text=text, latent_frames=len(i["mean"]))
                 for i in items]}))
    bar.update(1)
  clips_meta, skipped = [], {}
  shard_path = root / f"{name}.array_record"
  tmp = root / f".{name}.array_record.tmp"
  writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
  for r in range(len(records)):
    stored = serialization.msgpack_restore((partial / f"record-{r:05d}.msgpack").read_bytes())
    if "skipped" in stored:
      skipped[stored["skipped"]] = skipped.get(stored["skipped"], 0) + 1
    for data in stored["items"]:
      writer.write(data)
    clips_meta += stored["meta"]
  writer.close()
  tmp.rename(shard_path)
  features_lib.write_json_atomic(root / f"{name}.json", dict(
      file=shard_path.name, records=len(records), clips=clips_meta, skipped=skipped))
  shutil.rmtree(os.fspath(partial), ignore_errors=True)
  partials = root / "partial"
  if partials.exists() and not any(partials.iterdir()):  # the last partial shard of them all
    try:
      partials.rmdir()
    except (OSError, ValueError):  # another process's shard appeared meanwhile
      pass
  return dict(clips=clips_meta, skipped=skipped)


def _write_atomic(path: epath.Path, data: bytes) -> None:
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_bytes(data)
  tmp.rename(path)


def main(argv):
  del argv
  errors.quiet_library_tracebacks()
  distributed.initialize_from_flags()
  config = FLAGS.config
  report = extract(config, FLAGS.output)
  skipped = ", ".join(f"{n} {r}" for r, n in sorted(report.skipped.items())) or "none"
  print(f"{FLAGS.output}: {report.clips} clips in {report.shards_written} new shards "
        f"({report.shards_finished_before} finished before); skipped records: {skipped}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Run config (the latent training config).",
                                  lock_config=False)
  flags.DEFINE_string("output", None, "The feature folder to write (or to complete).")
  distributed.define_flags()
  flags.mark_flags_as_required(["config", "output"])
  app.run(errors.exit_on_user_error(main, "pfm.extract"))
