"""Reading videos (PyAV) and images (Pillow) as uint8 RGB frames.

Frames come back as uint8 ``[N, H, W, 3]`` arrays. With ``size=(height, width)`` every frame is
center-cropped to the target aspect ratio and resized with Pillow's antialiased resampling, so
the clip is ready for ``pfm.data.layout`` after scaling to [-1, 1] (``to_float``).

``load_video`` keeps a per-process cache of decoded and resized files keyed by
``(path, size)``: each grain worker decodes a file once and cuts every later clip from memory.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import struct
import threading

import av
from etils import epath
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})

# Number of (path, size) entries ``load_video`` keeps per process. A 64x64 clip of 250 frames is
# 3 MiB, so the default bounds the cache to a few hundred MiB for small training resolutions.
CACHE_SIZE = 128

# How many packets ``probe`` feeds the decoder before giving up on getting a first frame.
_PROBE_DECODE_PACKETS = 64


# Why a file cannot be used: ``VideoReadError.reason``.
REASONS = ("missing", "unreadable", "truncated")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # The whole IEND chunk: length 0, type, CRC.


class VideoReadError(Exception):
  """A file is missing, cannot be opened, has no video stream, is truncated or fails to decode.

  Attributes:
    reason: one of ``REASONS``: ``"missing"`` (no such file), ``"truncated"`` (the file ends
      early, see ``is_truncated``, or holds fewer frames than its container declares) or
      ``"unreadable"`` (anything else: not a known format, corrupt data, no video stream).
  """

  def __init__(self, message: str, reason: str = "unreadable"):
    if reason not in REASONS:
      raise ValueError(f"VideoReadError: reason must be one of {REASONS}, got {reason!r}")
    super().__init__(message)
    self.reason = reason

  def __reduce__(self):  # Keeps ``reason`` across processes (grain workers pickle errors).
    return type(self), (str(self), self.reason)


@dataclasses.dataclass(frozen=True)
class MediaInfo:
  """What ``probe`` learns about a file.

  Attributes:
    path: the file probed.
    num_frames: frames that can be demuxed (packets with data for videos; 1 for images).
    height: frame height in pixels (before any resize).
    width: frame width in pixels.
    is_image: True for a still image read as a one-frame clip.
    fps: average frame rate (0.0 when unknown, 0.0 for images).
  """

  path: str
  num_frames: int
  height: int
  width: int
  is_image: bool
  fps: float = 0.0


def is_image_path(path: str) -> bool:
  """Whether ``path`` names a still image (by extension), which is read as one frame."""
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def truncation(path: str) -> str | None:
  """Whether a file's own structure shows that it ends early, and where.

  Decided from the bytes, not from decoder messages, for the formats whose end can be checked:

  - PNG: the file must end with the IEND chunk.
  - JPEG: the file must end with the EOI marker ``FF D9``.
  - GIF: the file must end with the trailer byte ``0x3B``.
  - ISO base media (mp4, mov, m4v; a ``"ftyp"`` box at offset 4): the top-level boxes (32-bit
    big-endian size and 4-character type; size 1: a 64-bit size follows, size 0: the box runs
    to the end of the file) must fit the file, and one of them must be ``"moov"``.

  Other files (another format, or boxes too malformed to walk) are never called truncated.

  Args:
    path: a local file.

  Returns:
    None if the file is complete (or its format cannot tell), else a short description of where
    it ends, e.g. ``"ends inside its 'mdat' box (4742 bytes declared at offset 40, 2771
    present)"``.

  Raises:
    OSError: if the file cannot be read.
  """
  with open(path, "rb") as f:
    head = f.read(12)
    file_size = f.seek(0, os.SEEK_END)
    f.seek(max(0, file_size - len(_PNG_IEND)))
    tail = f.read()
    if head.startswith(_PNG_SIGNATURE):
      return None if tail == _PNG_IEND else "PNG does not end with its IEND chunk"
    if head.startswith(b"\xff\xd8"):
      return None if tail.endswith(b"\xff\xd9") else "JPEG does not end with the FFD9 marker"
    if head.startswith((b"GIF87a", b"GIF89a")):
      return None if tail.endswith(b"\x3b") else "GIF does not end with its 0x3B trailer"
    if head[4:8] == b"ftyp":
      return _iso_bmff_truncation(f, file_size)
  return None


def is_truncated(path: str) -> bool:
  """Whether ``truncation(path)`` finds that the file ends early (same rules and errors)."""
  return truncation(path) is not None


def _iso_bmff_truncation(f, file_size: int) -> str | None:
  """Walks the top-level boxes of an open ISO base media file (see ``truncation``)."""
  offset, kinds = 0, set()
  while offset < file_size:
    f.seek(offset)
    header = f.read(8)
    if len(header) < 8:
      return f"ends inside a box header at offset {offset}"
    size, kind = struct.unpack(">I4s", header)
    name = kind.decode("latin-1")
    header_size = 8
    if size == 1:
      large = f.read(8)
      if len(large) < 8:
        return f"ends inside the header of its {name!r} box at offset {offset}"
      size, header_size = struct.unpack(">Q", large)[0], 16
    elif size == 0:  # The last box, running to the end of the file.
      kinds.add(kind)
      break
    if size < header_size:
      return None  # Malformed, not cut short: unreadable.
    if offset + size > file_size:
      return (f"ends inside its {name!r} box ({size} bytes declared at offset {offset}, "
              f"{file_size - offset} present)")
    kinds.add(kind)
    offset += size
  return None if b"moov" in kinds else "has no 'moov' box"


def _error(path: str, message: str) -> VideoReadError:
  """A ``VideoReadError`` for a file that failed to open or decode, with its ``reason``.

  The reason comes from the file itself: ``"missing"`` if there is no such file,
  ``"truncated"`` if ``truncation`` says it ends early (the message then says where), else
  ``"unreadable"``.
  """
  if not os.path.isfile(path):
    return VideoReadError(f"{path}: no such file", "missing")
  try:
    cut = truncation(path)
  except OSError:
    cut = None
  if cut is not None:
    return VideoReadError(f"{path}: truncated: {cut} ({message})", "truncated")
  return VideoReadError(f"{path}: {message}", "unreadable")


def probe(path: str) -> MediaInfo:
  """Checks that a file is readable and counts its frames, without decoding the whole file.

  A video is demuxed end to end (cheap: no decoding) to count its packets, and its first frame
  is decoded to make sure the codec works. A container that declares more frames than it holds
  is reported as truncated. An image is fully decoded with Pillow.

  Args:
    path: a video (any container FFmpeg reads) or an image (see ``IMAGE_EXTENSIONS``).

  Returns:
    ``MediaInfo`` for the file.

  Raises:
    VideoReadError: if the file is missing or unreadable, has no video stream, holds no frames,
      is truncated, or its first frame does not decode. Its ``reason`` is ``"missing"``,
      ``"truncated"`` (``truncation`` finds the file cut short, or the container declares more
      frames than it holds) or ``"unreadable"``.
  """
  if not os.path.isfile(path):
    raise VideoReadError(f"{path}: no such file", "missing")
  if is_image_path(path):
    try:
      with Image.open(path) as image:
        image.load()
        width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise _error(path, f"unreadable image ({e})") from e
    return MediaInfo(path, 1, height, width, is_image=True)
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise _error(path, "no video stream")
      stream = container.streams.video[0]
      declared = stream.frames
      fps = float(stream.average_rate) if stream.average_rate else 0.0
      num_packets, first_frame = 0, None
      for packet in container.demux(stream):
        if not packet.size:
          continue  # The flush packet at the end of the stream.
        num_packets += 1
        if first_frame is None and num_packets <= _PROBE_DECODE_PACKETS:
          frames = packet.decode()
          if frames:
            first_frame = frames[0]
      if first_frame is None and num_packets:  # A short file held back by decoder delay.
        frames = stream.codec_context.decode(None)
        if frames:
          first_frame = frames[0]
  except av.FFmpegError as e:
    raise _error(path, f"unreadable video ({e})") from e
  if num_packets == 0:
    raise _error(path, "no video frames")
  if first_frame is None:
    raise _error(path, "first frame does not decode")
  if declared and num_packets < declared:
    raise VideoReadError(
        f"{path}: truncated (container declares {declared} frames, holds {num_packets})",
        "truncated")
  return MediaInfo(path, num_packets, first_frame.height, first_frame.width, is_image=False,
                   fps=fps)


def crop_and_resize(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
  """Center-crops ``image`` to the aspect ratio of ``size`` and resizes it (antialiased).

  Args:
    image: a Pillow image (converted to RGB).
    size: ``(height, width)`` of the output.

  Returns:
    uint8 ``[height, width, 3]``.
  """
  height, width = size
  image = image.convert("RGB")
  src_w, src_h = image.size
  if src_w * height > src_h * width:  # Wider than the target: crop the sides.
    crop_w = src_h * width / height
    left = (src_w - crop_w) / 2
    box = (left, 0.0, left + crop_w, float(src_h))
  else:  # Taller than the target: crop top and bottom.
    crop_h = src_w * height / width
    top = (src_h - crop_h) / 2
    box = (0.0, top, float(src_w), top + crop_h)
  image = image.resize((width, height), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
  return np.asarray(image, dtype=np.uint8)


def read_frames(path: str, *, size: tuple[int, int] | None = None, start: int = 0,
                num_frames: int | None = None, stride: int = 1) -> np.ndarray:
  """Decodes frames ``start, start + stride, ...`` of a video (or the one frame of an image).

  Args:
    path: a video or image file.
    size: ``(height, width)`` to center-crop and resize to; None keeps the decoded size.
    start: index of the first frame to keep (>= 0).
    num_frames: how many frames to keep; None keeps every frame from ``start`` to the end.
    stride: keep every ``stride``-th frame (>= 1).

  Returns:
    uint8 ``[N, H, W, 3]`` RGB frames in [0, 255]; for an image N = 1 (``start``, ``stride``
    and ``num_frames`` must then select frame 0 only).

  Raises:
    VideoReadError: if the file cannot be decoded, or holds fewer frames than requested (with a
      ``reason`` as in ``probe``).
    ValueError: on a negative ``start``, ``stride < 1`` or ``num_frames < 1``.
  """
  if start < 0 or stride < 1 or (num_frames is not None and num_frames < 1):
    raise ValueError(f"read_frames: bad range start={start} num_frames={num_frames} "
                     f"stride={stride}")
  wanted = None if num_frames is None else start + (num_frames - 1) * stride + 1
  if is_image_path(path):
    if start != 0 or (num_frames or 1) != 1:
      raise VideoReadError(f"{path}: an image has one frame, asked for {num_frames} from {start}")
    try:
      with Image.open(path) as image:
        image.load()
        frame = crop_and_resize(image, size) if size else np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise _error(path, f"unreadable image ({e})") from e
    return frame[None]
  frames = []
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise _error(path, "no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      for index, frame in enumerate(container.decode(stream)):
        if wanted is not None and index >= wanted:
          break
        if index >= start and (index - start) % stride == 0:
          image = frame.to_image()
          frames.append(crop_and_resize(image, size) if size else np.asarray(image))
  except av.FFmpegError as e:
    raise _error(path, f"decoding failed ({e})") from e
  if not frames or (num_frames is not None and len(frames) < num_frames):
    raise _error(path, f"asked for {num_frames or 'all'} frames from {start} at stride {stride}, "
                       f"decoded {len(frames)}")
  return np.stack(frames)


def read_image(path: str) -> np.ndarray:
  """Reads an image file (e.g. the first frame for image-to-video) as uint8 ``[H, W, 3]`` RGB.

  Raises:
    VideoReadError: if the file is missing or not a readable image (``reason`` as in ``probe``).
  """
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise _error(path, f"unreadable image ({e})") from e


def fit_frame(image, height: int, width: int) -> np.ndarray:
  """Center-crops and resizes one frame to ``(height, width)``, as the training data is.

  Args:
    image: uint8 ``[h, w, 3]`` array or a Pillow image.
    height: output height in pixels.
    width: output width in pixels.

  Returns:
    uint8 ``[height, width, 3]``.
  """
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image, dtype=np.uint8))
  return crop_and_resize(image, (height, width))


def write_mp4(path: str, frames: np.ndarray, *, fps: int = 8) -> None:
  """Writes uint8 ``[T, H, W, 3]`` RGB frames as an H.264 mp4 (yuv420p), creating the folder.

  H and W must be even (yuv420p). Falls back to MPEG-4 Part 2 where libx264 is not built in.
  ``path`` may be local or remote (``gs://...``, through ``etils.epath``): the video is encoded in
  memory and written in one piece.

  Raises:
    ValueError: if ``frames`` is not ``[T, H, W, 3]`` with T >= 1 and even H, W.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames) or frames.shape[1] % 2 or (
      frames.shape[2] % 2):
    raise ValueError(f"write_mp4: need uint8 [T, H, W, 3] with even H, W, got {frames.shape}")
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
  buffer = io.BytesIO()
  with av.open(buffer, "w", format="mp4") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    for frame in frames.astype(np.uint8):
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  path.write_bytes(buffer.getvalue())


def write_frame_grid(path: str, videos, *, every: int = 1, scale: int = 1) -> None:
  """Writes videos as one PNG, a row per video of its every ``every``-th frame (lossless, unlike
  the mp4), each pixel enlarged to ``scale`` x ``scale`` (nearest), creating the folder.

  Args:
    path: the PNG's path (local or remote, through ``etils.epath``).
    videos: uint8 ``[T, H, W, 3]`` videos of one size.
    every: frame stride, >= 1.
    scale: enlargement, >= 1.

  Raises:
    ValueError: for no videos, videos of different sizes, or ``every`` or ``scale`` below 1.
  """
  videos = [np.asarray(v, np.uint8) for v in videos]
  if not videos or len({v[::every].shape for v in videos}) != 1 or every < 1 or scale < 1:
    raise ValueError(f"write_frame_grid: need videos of one size and every, scale >= 1, got "
                     f"{[v.shape for v in videos]}, every={every}, scale={scale}")
  grid = np.concatenate([np.concatenate(list(v[::every]), axis=1) for v in videos], axis=0)
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(grid).save(buffer, format="PNG")
  path.write_bytes(buffer.getvalue())


_cache: collections.OrderedDict[tuple[str, tuple[int, int]], np.ndarray] = (
    collections.OrderedDict())
_cache_lock = threading.Lock()
_key_locks: dict[tuple[str, tuple[int, int]], threading.Lock] = {}


def load_video(path: str, size: tuple[int, int]) -> np.ndarray:
  """All frames of ``path`` at ``size``, decoded once per process (an LRU cache of CACHE_SIZE).

  Thread-safe: concurrent calls for the same file wait for one decode instead of repeating it.

  Args:
    path: a video or image file.
    size: ``(height, width)``; frames are center-cropped and resized as in ``read_frames``.

  Returns:
    read-only uint8 ``[N, height, width, 3]`` (shared with the cache: copy before writing).

  Raises:
    VideoReadError: if the file cannot be decoded (failures are not cached).
  """
  key = (os.fspath(path), (int(size[0]), int(size[1])))
  with _cache_lock:
    if key in _cache:
      _cache.move_to_end(key)
      return _cache[key]
    key_lock = _key_locks.setdefault(key, threading.Lock())
  with key_lock:
    with _cache_lock:
      if key in _cache:
        return _cache[key]
    try:
      frames = read_frames(key[0], size=key[1])
    except BaseException:
      with _cache_lock:
        _key_locks.pop(key, None)
      raise
    frames.setflags(write=False)
    with _cache_lock:
      _cache[key] = frames
      _key_locks.pop(key, None)
      while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
  return frames


def clear_cache() -> None:
  """Empties this process's ``load_video`` cache."""
  with _cache_lock:
    _cache.clear()


def to_float(frames: np.ndarray) -> np.ndarray:
  """uint8 pixels in [0, 255] -> float32 in [-1, 1] (same shape)."""
  return frames.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


def to_uint8(frames) -> np.ndarray:
  """float pixels in [-1, 1] -> uint8 in [0, 255] (clipped, rounded; inverse of ``to_float``)."""
  frames = np.asarray(frames, np.float32)
  return np.clip((frames + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
